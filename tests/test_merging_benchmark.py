"""benchmarks/merging.py end to end at a tiny size: shared start, experts, merges (one failing), the joint
fine-tune from the best merge and the equal-compute control, and the table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

from mtlvision.engine.runs import Run

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "merging.py"
TINY = [
    "data.image_size=32",
    "data.train_size=16",
    "data.val_size=8",
    "data.test_size=8",
    "train.batch_size=8",
    "tasks=[count,segmentation]",
]


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("merging_benchmark", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_every_stage_runs_in_one_invocation_and_a_failing_rule_is_recorded(tmp_path: Path) -> None:
    bench = _script()
    out = tmp_path / "bench"
    epochs = ["--start-epochs", "1", "--expert-epochs", "1", "--joint-epochs", "1", "--repeats", "1"]
    rules = ["--rules", "average", "task_arithmetic:scale=0.5", "ties:density=2"]  # density > 1 is refused
    result = bench.main(["--out", str(out), *epochs, *rules, "--set", *TINY])

    merges = {row["run"]: row for row in result["merges"]}
    assert set(merges) == {"m-average", "m-task_arithmetic-0.5", "m-ties-2"}
    assert "ties density=2" in merges["m-ties-2"]["error"] and "density" in merges["m-ties-2"]["error"]
    for name in ("m-average", "m-task_arithmetic-0.5"):
        row, report = merges[name], Run.load(out / name).report
        assert row["delta_m"] == pytest.approx(report.delta_m["overall"], abs=0.01)  # compare's Δm = the run's own
        assert set(row["delta_m_per_task"]) == {"count", "segmentation"}
        assert row["parameters"] > 0 and row["inference_ms"] > 0 and row["latency_vs_experts"] > 0
        assert row["merge_seconds"] == report.merge["merge_seconds"] and row["job_seconds"] > 0
        assert row["epochs"] == 1 + 2 * 1  # the shared start and the two experts behind the merge
    assert merges["m-task_arithmetic-0.5"]["hparams"] == {"scale": 0.5}

    best = min(("m-average", "m-task_arithmetic-0.5"), key=lambda name: merges[name]["delta_m"])
    joint = {row["run"]: row for row in result["joint"]}
    assert set(joint) == {f"joint-from-{best[2:]}", "joint-from-start", "shared-start"}
    # equal compute: the fine-tune from the merge and the control both have 4 epochs behind them in all
    assert joint[f"joint-from-{best[2:]}"]["epochs"] == joint["joint-from-start"]["epochs"] == 4
    assert Run.load(out / "joint-from-start").config.train.epochs == 3
    assert joint[f"joint-from-{best[2:]}"]["init"] == str((out / best).resolve())
    assert result["experts"]["epochs"] == 3 and joint["shared-start"]["epochs"] == 1

    text = (out / "merging.md").read_text()
    assert "| m-ties-2 | — | failed: ties density=2: ConfigError" in text and "| joint-from-start |" in text
    assert json.loads((out / "merging.json").read_text())["merges"] == json.loads(json.dumps(result["merges"]))

    # a second invocation redoes nothing that finished, and retries the failed rule with good settings
    timings = json.loads((out / "timings.json").read_text())
    rerun = ["--stage", "merges", "table", "--rules", "average", "ties:density=1"]
    again = bench.main(["--out", str(out), *epochs, *rerun, "--set", *TINY])
    assert json.loads((out / "timings.json").read_text())["m-average"] == timings["m-average"]
    assert {row["run"] for row in again["merges"]} == {"m-average", "m-task_arithmetic-0.5", "m-ties-1", "m-ties-2"}
