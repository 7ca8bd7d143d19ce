"""The balancer registry (``mtlvision list balancers``)."""

from __future__ import annotations

from mtlvision.balancers.base import Balancer
from mtlvision.registry import Registry

BALANCERS: Registry[type[Balancer]] = Registry("balancer")
