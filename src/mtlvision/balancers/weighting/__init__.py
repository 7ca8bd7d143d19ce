"""Loss-weighting methods, one module per method or family; importing this package registers them."""

from __future__ import annotations

from mtlvision.balancers.weighting._common import LossWeighting, WeightingError
from mtlvision.balancers.weighting.baseline import EqualWeights, FixedWeights
from mtlvision.balancers.weighting.db_mtl import DBMTL
from mtlvision.balancers.weighting.dwa import DWA
from mtlvision.balancers.weighting.excess_mtl import ExcessMTL
from mtlvision.balancers.weighting.famo import FAMO
from mtlvision.balancers.weighting.gls import GLS
from mtlvision.balancers.weighting.go4align import GO4Align
from mtlvision.balancers.weighting.gradnorm import GradNorm
from mtlvision.balancers.weighting.ldc_mtl import LDCMTL
from mtlvision.balancers.weighting.preference import COSMOS, PBI
from mtlvision.balancers.weighting.rlw import RLW
from mtlvision.balancers.weighting.stch import STCH
from mtlvision.balancers.weighting.uncertainty import IMTLL, UncertaintyWeighting

__all__ = [
    "COSMOS",
    "PBI",
    "DBMTL",
    "DWA",
    "FAMO",
    "GLS",
    "GO4Align",
    "IMTLL",
    "LDCMTL",
    "RLW",
    "STCH",
    "EqualWeights",
    "ExcessMTL",
    "FixedWeights",
    "GradNorm",
    "LossWeighting",
    "UncertaintyWeighting",
    "WeightingError",
]
