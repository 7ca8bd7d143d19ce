"""``balancer.jacobian=auto``: the path chosen by timing (a fake clock here), cached in memory and on disk."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from mtlvision.balancers import GradientEngine, LayerTaps
from mtlvision.balancers import get as get_balancer
from mtlvision.balancers.jacobian import BY_MEMORY, PATHS, choice

#: what the fake clock advances for each path's timed run: "loop" is fastest, then "layers", then "batched"
COSTS = {"loop": 1.0, "layers": 2.0, "batched": 3.0}


@pytest.fixture
def fake_clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """A clock that advances by the cost of the path being run; yields the paths run, in order."""
    ran: list[str] = []
    clock = [0.0]
    monkeypatch.setattr(choice, "now", lambda: clock[0])
    monkeypatch.setattr(choice, "CHOSEN_PATHS", {})
    original = choice.choose_path

    def counting(key, candidates, run, cache_file=None):  # type: ignore[no-untyped-def]
        def timed(path: str) -> None:
            ran.append(path)
            run(path)
            clock[0] += COSTS[path]

        return original(key, candidates, timed, cache_file)

    monkeypatch.setattr("mtlvision.balancers.engine.choose_path", counting)
    yield ran


def net_and_losses(seed: int = 0) -> tuple[nn.Module, nn.ModuleList, LayerTaps, torch.Tensor]:
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.Flatten())
    heads = nn.ModuleList(nn.Linear(4 * 6 * 6, 1) for _ in range(3))
    taps = LayerTaps(trunk, list(trunk.parameters()))
    x = torch.randn(5, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    with taps.recording():
        features = trunk(x)
    losses = torch.stack([(head(features) ** 2).mean() * (i + 1) for i, head in enumerate(heads)])
    return trunk, heads, taps, losses


def step(jacobian: str, method: str, cache: Path) -> tuple[GradientEngine, list[torch.Tensor]]:
    trunk, heads, taps, losses = net_and_losses()
    engine = GradientEngine(
        list(trunk.parameters()),
        list(heads.parameters()),
        jacobian=jacobian,
        taps=taps,
        cache_file=cache,  # type: ignore[arg-type]
    )
    engine.backward(losses, get_balancer(method))
    return engine, [p.grad.clone() for p in [*trunk.parameters(), *heads.parameters()]]  # type: ignore[union-attr]


@pytest.mark.parametrize("method", ["upgrad", "pcgrad"])  # a Gramian method and one that reads G's blocks
def test_auto_picks_the_fastest_path_and_gives_each_explicit_paths_update(fake_clock, tmp_path, method):
    torch.manual_seed(0)
    engine, auto = step("auto", method, tmp_path / "paths.json")
    assert engine.jacobian_path == "loop" and engine.choice is not None
    # each candidate timed twice, alternating, lightest first; the fastest of each kept
    assert fake_clock == list(BY_MEMORY) * 2
    assert engine.choice.seconds == {path: COSTS[path] for path in ("batched", "loop", "layers")}
    for path in ("batched", "loop", "layers"):
        torch.manual_seed(0)  # PCGrad's random task order
        _, explicit = step(path, method, tmp_path / "unused.json")
        torch.manual_seed(0)
        _, again = step("auto", method, tmp_path / "paths.json")  # from the memory cache: not timed again
        assert_close(again, explicit, rtol=1e-4, atol=1e-6)
    assert len(fake_clock) == 6
    assert_close(auto, explicit, rtol=1e-4, atol=1e-6)  # the measuring step's own update too


def test_the_choice_round_trips_through_the_disk_cache(fake_clock, tmp_path):
    cache = tmp_path / "run" / "jacobian_paths.json"
    engine, _ = step("auto", "upgrad", cache)
    saved = json.loads(cache.read_text())
    assert saved == {engine.choice.key: {"path": "loop", "seconds": engine.choice.seconds}}  # type: ignore[union-attr]
    choice.CHOSEN_PATHS.clear()  # a new process: read from disk, nothing timed
    engine, _ = step("auto", "upgrad", cache)
    assert engine.jacobian_path == "loop" and len(fake_clock) == 6
    assert not list(cache.parent.glob(".*.tmp"))  # written through a temporary file, renamed


def test_a_corrupt_cache_file_is_ignored_with_a_warning_and_rewritten(fake_clock, tmp_path):
    cache = tmp_path / "jacobian_paths.json"
    cache.write_text("{not json")
    with pytest.warns(UserWarning, match="ignoring the Jacobian path cache"):
        engine, _ = step("auto", "upgrad", cache)
    assert engine.jacobian_path == "loop" and len(fake_clock) == 6  # measured
    assert json.loads(cache.read_text())[engine.choice.key]["path"] == "loop"  # type: ignore[union-attr]


def test_the_default_cache_honours_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert choice.default_cache_file() == tmp_path / "mtlvision" / "jacobian_paths.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert choice.default_cache_file() == Path.home() / ".cache" / "mtlvision" / "jacobian_paths.json"


def test_the_key_changes_with_what_the_speed_depends_on():
    base = dict(shapes=[(4, 3, 3, 3), (5, 3, 6, 6)], num_tasks=3, device=torch.device("cpu"), dtype=torch.float32)
    key = choice.path_key(**base, extra=["gramian"])  # type: ignore[arg-type]
    assert key == choice.path_key(**base, extra=["gramian"])  # type: ignore[arg-type]
    assert key != choice.path_key(**{**base, "num_tasks": 4}, extra=["gramian"])  # type: ignore[arg-type]
    assert key != choice.path_key(**{**base, "shapes": [(4, 3, 3, 3), (8, 3, 6, 6)]}, extra=["gramian"])  # type: ignore[arg-type]
    assert key != choice.path_key(**{**base, "dtype": torch.float64}, extra=["gramian"])  # type: ignore[arg-type]
    assert key != choice.path_key(**base, extra=["jacobian"])  # type: ignore[arg-type]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert key != choice.path_key(**base, extra=["gramian"])  # type: ignore[arg-type]
    finally:
        torch.set_num_threads(threads)


def test_a_loss_weighting_method_measures_nothing(fake_clock, tmp_path):
    engine, _ = step("auto", "dwa", tmp_path / "paths.json")
    assert fake_clock == [] and engine.choice is None and not (tmp_path / "paths.json").exists()


def test_every_path_has_a_place_in_the_memory_order():
    assert sorted(BY_MEMORY) == sorted(PATHS) and BY_MEMORY[0] == "layers"


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        ({"layers": 1.0, "batched": 0.95, "loop": 0.93}, "layers"),  # a near tie keeps the lightest
        ({"layers": 1.0, "batched": 0.85, "loop": 0.8}, "batched"),  # loop is not 10% faster than batched
        ({"layers": 1.0, "batched": 0.85, "loop": 0.7}, "loop"),
        ({"layers": 1.0, "batched": 2.0, "loop": 0.89}, "loop"),  # a slow middle path is passed over
    ],
)
def test_a_heavier_path_must_be_faster_by_the_margin(seconds, expected):
    assert choice.pick(seconds, list(BY_MEMORY)) == expected


def test_an_entry_on_disk_is_weighed_by_the_rule_in_force(fake_clock, tmp_path):
    cache = tmp_path / "jacobian_paths.json"
    engine, _ = step("auto", "upgrad", cache)
    key = engine.choice.key  # type: ignore[union-attr]
    # an entry written by the fastest-only rule, from a near tie
    cache.write_text(json.dumps({key: {"path": "loop", "seconds": {"layers": 1.0, "batched": 1.2, "loop": 0.97}}}))
    choice.CHOSEN_PATHS.clear()
    engine, _ = step("auto", "upgrad", cache)
    assert engine.jacobian_path == "layers" and len(fake_clock) == 6  # read, not measured again


def test_the_key_names_the_machine(monkeypatch):
    base = dict(shapes=[(4, 3, 3, 3)], num_tasks=3, device=torch.device("cpu"), dtype=torch.float32, extra=[])
    assert choice.machine_name("cpu").endswith(f"x{os.cpu_count()}")
    key = choice.path_key(**base)  # type: ignore[arg-type]
    monkeypatch.setattr(choice, "machine_name", lambda device_type: "another CPU x64")
    assert key != choice.path_key(**base)  # type: ignore[arg-type]
