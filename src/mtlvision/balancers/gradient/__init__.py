"""Gradient-balancing methods, one module per method or family; importing this package registers them.

What ``Update.weights`` holds (the engine logs them and applies them to the task-specific parameters):
methods whose update is ``Σ_t w_t g_t`` (``needs = GRAMIAN``) return those ``w``. The three methods that
return a ``direction`` return the weights their paper gives the task-specific parameters: GradDrop ones
(it only acts on the shared gradients), MoCo ``λ`` (its direction is ``Yᵀλ`` over the tracked gradients),
IMTL the loss scales ``e^{s_t}``.
"""

from __future__ import annotations

from mtlvision.balancers.gradient._base import GradientBalancer, GramianBalancer
from mtlvision.balancers.gradient._solvers import NonFiniteGramianError, SolverError
from mtlvision.balancers.gradient.aligned_mtl import AlignedMTL, AlignedMTLUB
from mtlvision.balancers.gradient.cagrad import CAGrad
from mtlvision.balancers.gradient.conflict_free import ConFIG
from mtlvision.balancers.gradient.cr_mogm import CRMOGM
from mtlvision.balancers.gradient.fairgrad import FairGrad
from mtlvision.balancers.gradient.graddrop import GradDrop
from mtlvision.balancers.gradient.gradvac import GradVac
from mtlvision.balancers.gradient.imgrad import IMGrad
from mtlvision.balancers.gradient.imtl import IMTL, IMTLG
from mtlvision.balancers.gradient.mgda import MGDA, MGDAUB
from mtlvision.balancers.gradient.moco import MoCo
from mtlvision.balancers.gradient.modo import MoDo
from mtlvision.balancers.gradient.nash_mtl import NashMTL
from mtlvision.balancers.gradient.ntkmtl import NTKMTL
from mtlvision.balancers.gradient.pcgrad import PCGrad
from mtlvision.balancers.gradient.robust import Krum, TrimmedMean
from mtlvision.balancers.gradient.sdmgrad import SDMGrad
from mtlvision.balancers.gradient.upgrad import DualProj, UPGrad

__all__ = [
    "IMTL",
    "IMGrad",
    "IMTLG",
    "MGDA",
    "MGDAUB",
    "NTKMTL",
    "AlignedMTL",
    "AlignedMTLUB",
    "CAGrad",
    "CRMOGM",
    "ConFIG",
    "DualProj",
    "FairGrad",
    "GradDrop",
    "GradVac",
    "GradientBalancer",
    "GramianBalancer",
    "Krum",
    "MoCo",
    "MoDo",
    "NashMTL",
    "NonFiniteGramianError",
    "PCGrad",
    "SDMGrad",
    "SolverError",
    "TrimmedMean",
    "UPGrad",
]
