"""Shared test settings.

- One torch thread per test process (the suite runs with pytest-xdist on 2 cores).
- Hypothesis profiles: ``ci`` is derandomised (the examples are a fixed function of each test, so a CI run
  cannot fail on a draw that the previous run did not make; no example database) and prints the blob that
  reproduces a failure; it is loaded when the environment variable ``CI`` is set, as CI services do.
  ``dev`` (the default elsewhere) keeps exploring new examples on every run, with the local example
  database replaying past failures first. ``HYPOTHESIS_PROFILE=ci|dev`` chooses explicitly. Tests keep
  their own ``max_examples``; the profile sets only how the examples are drawn and reported.
"""

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# both from hypothesis' own defaults (under CI it has already loaded its built-in "ci" profile)
_base = settings.get_profile("default")
settings.register_profile("ci", parent=_base, derandomize=True, database=None, print_blob=True)
settings.register_profile("dev", parent=_base, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))


#: a tiny scenes run with every task kind, for the tests that need a trained run folder (export, serving)
SIX_TASKS_TINY = {
    "data.image_size": 32,
    "data.train_size": 8,
    "data.val_size": 4,
    "data.test_size": 4,
    "train.epochs": 1,
    "train.batch_size": 4,
    "train.progress": False,
    "train.device": "cpu",
    "model.backbone": "test_resnet",
    "tasks": ["count", "colors", "segmentation", "depth", "normals", "detection"],
}


@pytest.fixture(scope="session")
def six_task_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:data:`SIX_TASKS_TINY` trained once per test process (export and serving share it)."""
    from mtlvision import api

    return api.train("scenes", SIX_TASKS_TINY, out=tmp_path_factory.mktemp("six-task-runs"), name="scenes").path


@pytest.fixture(autouse=True)
def _cache_home(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Caches the library writes (``balancer.jacobian=auto``'s measured paths) go under the tests' temp dir."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-cache"))
