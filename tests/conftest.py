"""Shared test settings: one torch thread per test process (the suite runs with pytest-xdist on 2 cores)."""

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
