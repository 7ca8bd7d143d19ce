"""A fast start (#16.11): the command line's module, ``--help`` and ``list KIND`` import no torch, and the
static catalog that ``list`` reads equals the live registries (so it cannot go stale)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mtlvision.engine.catalog import live_catalog, static_catalog
from mtlvision.registry import REGISTRY_KINDS

HEAVY = ("torch", "torchvision", "timm", "numpy", "matplotlib")


def _modules_after(code: str) -> set[str]:
    """The heavy modules imported by ``code`` in a fresh interpreter."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=300)
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def test_importing_the_cli_imports_no_torch() -> None:
    assert _modules_after("import mtlvision.cli") == set()


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["list", "balancers"], ["list", "backbones"]])
def test_help_version_and_list_import_no_torch(argv) -> None:
    code = f"from mtlvision.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass"
    assert _modules_after(code) == set()


def test_the_shipped_catalog_equals_the_live_registries() -> None:
    """If this fails, a registry changed: run `python -m mtlvision.engine.catalog` and commit catalog.json."""
    assert static_catalog() == live_catalog()
    assert set(static_catalog()["kinds"]) == set(REGISTRY_KINDS)


def test_list_prints_every_entry_of_the_catalog(capsys) -> None:
    from mtlvision.cli import main

    assert main(["list", "merges"]) == 0
    printed = capsys.readouterr().out
    assert all(entry["name"] in printed for entry in static_catalog()["kinds"]["merges"])
