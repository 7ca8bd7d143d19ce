"""Merging rules, one module each, registered in :data:`MERGE_RULES` (``mtlvision list merges``)."""

from mtlvision.engine.merging import adamerging, arithmetic, dare, fisher, iso, model_stock, regmean, ties, tsv
from mtlvision.engine.merging.adamerging import AdaMerging
from mtlvision.engine.merging.arithmetic import TaskArithmetic, WeightAverage
from mtlvision.engine.merging.base import (
    MERGE_RULES,
    DataRule,
    DataUse,
    FlatRule,
    LearnedRule,
    MergeRule,
    Objective,
    TensorRule,
    make_rule,
)
from mtlvision.engine.merging.dare import DareTaskArithmetic, DareTies
from mtlvision.engine.merging.fisher import FisherMerging
from mtlvision.engine.merging.iso import IsoC, IsoCTS
from mtlvision.engine.merging.model_stock import ModelStock
from mtlvision.engine.merging.regmean import RegMean
from mtlvision.engine.merging.ties import Ties
from mtlvision.engine.merging.tsv import TaskSingularVectors

__all__ = [
    "MERGE_RULES",
    "AdaMerging",
    "DareTaskArithmetic",
    "DareTies",
    "DataRule",
    "DataUse",
    "FisherMerging",
    "FlatRule",
    "IsoC",
    "IsoCTS",
    "LearnedRule",
    "MergeRule",
    "ModelStock",
    "Objective",
    "RegMean",
    "TaskArithmetic",
    "TaskSingularVectors",
    "TensorRule",
    "Ties",
    "WeightAverage",
    "adamerging",
    "arithmetic",
    "dare",
    "fisher",
    "iso",
    "make_rule",
    "model_stock",
    "regmean",
    "ties",
    "tsv",
]
