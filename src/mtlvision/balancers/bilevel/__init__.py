"""Bilevel methods: task weights learnt from a validation batch by a meta-step before each training step
(the trainer runs it; see :class:`BilevelProblem`); importing this package registers them."""

from __future__ import annotations

from mtlvision.balancers.bilevel._base import BilevelBalancer, BilevelProblem
from mtlvision.balancers.bilevel.auto_lambda import AutoLambda
from mtlvision.balancers.bilevel.forum import FORUM
from mtlvision.balancers.bilevel.moml import MOML

__all__ = ["FORUM", "MOML", "AutoLambda", "BilevelBalancer", "BilevelProblem"]
