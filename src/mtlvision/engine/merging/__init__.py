"""Merging rules, one module each, registered in :data:`MERGE_RULES` (``mtlvision list merges``)."""

from mtlvision.engine.merging import (
    adamerging,
    arithmetic,
    dare,
    emr,
    fisher,
    iso,
    model_stock,
    regmean,
    ties,
    tsv,
    wemoe,
)
from mtlvision.engine.merging.adamerging import AdaMerging
from mtlvision.engine.merging.arithmetic import TaskArithmetic, WeightAverage
from mtlvision.engine.merging.base import (
    MERGE_RULES,
    DataRule,
    DataUse,
    FlatRule,
    LearnedRule,
    MergeRule,
    ModulatedRule,
    Objective,
    TaskModulation,
    TensorRule,
    make_rule,
)
from mtlvision.engine.merging.dare import DareTaskArithmetic, DareTies
from mtlvision.engine.merging.emr import EmrMerging
from mtlvision.engine.merging.fisher import FisherMerging
from mtlvision.engine.merging.iso import IsoC, IsoCTS
from mtlvision.engine.merging.model_stock import ModelStock
from mtlvision.engine.merging.regmean import RegMean
from mtlvision.engine.merging.ties import Ties
from mtlvision.engine.merging.tsv import TaskSingularVectors
from mtlvision.engine.merging.wemoe import WEMoE

__all__ = [
    "MERGE_RULES",
    "AdaMerging",
    "DareTaskArithmetic",
    "DareTies",
    "DataRule",
    "DataUse",
    "EmrMerging",
    "FisherMerging",
    "FlatRule",
    "IsoC",
    "IsoCTS",
    "LearnedRule",
    "MergeRule",
    "ModelStock",
    "ModulatedRule",
    "Objective",
    "RegMean",
    "TaskArithmetic",
    "TaskModulation",
    "TaskSingularVectors",
    "TensorRule",
    "Ties",
    "WEMoE",
    "WeightAverage",
    "adamerging",
    "arithmetic",
    "dare",
    "emr",
    "fisher",
    "iso",
    "make_rule",
    "model_stock",
    "regmean",
    "ties",
    "tsv",
    "wemoe",
]
