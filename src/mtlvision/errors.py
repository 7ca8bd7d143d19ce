"""User-facing errors.

Every error a user can cause (a bad config value, a missing file, a corrupt image, an unknown name) is a
:class:`MtlvisionError`. The CLI prints its message as one paragraph, without a traceback; the Python API
lets it propagate like any other exception. A broken internal contract (a bug, not the user's doing) is an
:class:`InternalError` instead, which the CLI lets through with its traceback.
"""

from __future__ import annotations


class MtlvisionError(Exception):
    """An error caused by the user's input, with a message that names what is wrong and how to fix it."""


class ConfigError(MtlvisionError):
    """A configuration value is missing, malformed or out of its allowed range."""


class DataError(MtlvisionError):
    """A dataset file or sample cannot be read or holds an invalid label."""


class UnknownNameError(ConfigError):
    """A name (task, balancer, backbone, architecture, dataset, ...) is not registered."""


class CheckpointError(MtlvisionError):
    """A checkpoint or weights file is missing, unsafe, or does not match the model."""


class InternalError(RuntimeError):
    """A broken internal contract: a bug in mtlvision or in code plugged into it (e.g. a balancer that returns
    weights of the wrong shape), not a user mistake. Deliberately not a :class:`MtlvisionError`, so that it
    is reported with its traceback."""
