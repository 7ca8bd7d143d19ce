"""Faults under torchrun: two gloo ranks on CPU, each its own process started the way torchrun starts them
(``faultrun.py``), one of them signalled mid-training.

A SIGTERM on one rank stops every rank at the same step with a checkpoint; a rank killed or hung ends the
survivor with one paragraph (no traceback) within bounded time; and resuming gives the uninterrupted run's
history (validation included) and weights, on every rank.

The ranks are started directly with torchrun's variables rather than under its agent, which on a failed
worker terminates the others itself: here each rank's own exit and stderr are what is checked.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import mtlvision
from mtlvision.config import TrainConfig, validate_section
from mtlvision.engine import distributed
from mtlvision.engine.loop_state import StopRequest
from mtlvision.errors import ConfigError

HERE = Path(__file__).parent
SRC = Path(mtlvision.__file__).resolve().parents[1]
# 24 samples over 2 ranks, 4 per rank and step: 3 steps per epoch; the faults strike mid-epoch 2
OPTIONS = {"epochs": 3, "batch_size": 4, "lr": 5e-3, "seed": 3, "scheduler": "cosine"}
FAULT_STEP = 4
BOUND_S = 30  # from the fault to the last rank's exit (a step, a checkpoint, or a dead socket, and exiting)
START_S = 240  # a generous bound for starting and training on a loaded machine
TIMING_COLUMNS = {"epoch_seconds", "data_wait_fraction"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Ranks:
    """Two ranks of ``faultrun.py`` on one run folder; their stderr lands in ``LOGS/NAME-RANK.err``."""

    def __init__(self, run_dir: Path, options: dict, name: str) -> None:
        run_dir.mkdir(exist_ok=True)
        self.run_dir, self.logs = run_dir, [run_dir.parent / f"{name}-{rank}.err" for rank in (0, 1)]
        port = str(_free_port())
        self.processes = []
        for rank, log in enumerate(self.logs):
            env = {
                **os.environ,
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
                "OMP_NUM_THREADS": "1",
                "PYTHONPATH": os.pathsep.join([str(SRC), str(HERE), os.environ.get("PYTHONPATH", "")]),
            }
            with log.open("w") as err:
                self.processes.append(
                    subprocess.Popen(
                        [sys.executable, str(HERE / "faultrun.py"), str(run_dir), json.dumps(options)],
                        env=env,
                        stdout=subprocess.DEVNULL,
                        stderr=err,
                    )
                )
        self.ended: list[float | None] = [None, None]

    def wait(self, timeout: float = START_S) -> list[int | None]:
        """Exit codes (and :attr:`ended`, the time each process ended); ranks still running are killed."""
        deadline = time.time() + timeout
        while time.time() < deadline and None in self.ended:
            for rank, process in enumerate(self.processes):
                if self.ended[rank] is None and process.poll() is not None:
                    self.ended[rank] = time.time()
            time.sleep(0.05)
        self.kill()
        return self.codes

    @property
    def codes(self) -> list[int | None]:
        """Each rank's exit code (None where it had to be killed)."""
        return [p.returncode if ended is not None else None for p, ended in zip(self.processes, self.ended)]

    def kill(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()

    def stderr(self, rank: int) -> str:
        return self.logs[rank].read_text()

    def fault_time(self) -> float:
        assert (self.run_dir / "fault.json").is_file(), f"no fault was injected; rank 0 said: {self.stderr(0)}"
        return json.loads((self.run_dir / "fault.json").read_text())["time"]


def _run(run_dir: Path, options: dict, name: str) -> Ranks:
    ranks = Ranks(run_dir, options, name)
    codes = ranks.wait()
    assert codes == [0, 0], f"exit codes {codes}: {ranks.stderr(0)}\n{ranks.stderr(1)}"
    return ranks


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


GLOO_RESET = (
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:13543: "
    "Connection reset by peer. This is typically caused by a remote worker hanging or bugs in the application."
)
GLOO_TIMEOUT = "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 3000ms for recv"


@pytest.mark.parametrize(
    ("error", "says"), [(GLOO_RESET, "connection closed"), (GLOO_TIMEOUT, "did not answer")], ids=["died", "hung"]
)
def test_peer_guard_turns_a_backend_failure_into_one_paragraph(one_rank_group, tmp_path, error, says):
    with pytest.raises(distributed.PeerLost) as caught, distributed.peer_guard(tmp_path):
        raise RuntimeError(error)
    message = str(caught.value)
    assert says in message and "pair.cc" not in message and f"--resume {tmp_path}" in message
    assert "\n" not in message
    # other errors pass through unchanged
    with pytest.raises(RuntimeError, match="not a collective"), distributed.peer_guard(tmp_path):
        raise RuntimeError("not a collective")


def test_a_stop_is_agreed_at_once_in_one_process_and_dist_timeout_is_a_positive_setting():
    stop = StopRequest()
    assert not stop.agreed(torch.device("cpu"))
    stop.signal = signal.SIGTERM
    assert stop.agreed(torch.device("cpu")) and stop.name == "SIGTERM"
    assert TrainConfig().dist_timeout == distributed.DEFAULT_TIMEOUT_S
    with pytest.raises(ConfigError, match="dist_timeout"):
        validate_section("train", TrainConfig, {"dist_timeout": 0})


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted two-rank run."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    _run(run_dir, OPTIONS, "reference")
    return run_dir


def _assert_same_run(run_dir: Path, reference: Path) -> None:
    def rows(folder: Path) -> list[dict]:
        history = json.loads((folder / "history.json").read_text())
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in history]

    got, expected = rows(run_dir), rows(reference)
    assert any(key.startswith("val/") for key in expected[0])
    assert got == expected  # bit-exact, validation included, so the same best epoch is selected
    final = [torch.load(run_dir / f"final-{rank}.pt") for rank in (0, 1)]
    assert torch.equal(final[0], torch.load(reference / "final-0.pt"))
    assert torch.equal(final[0], final[1])  # BatchNorm buffers too: every rank holds the same model


def _assert_one_paragraph(text: str, *fragments: str) -> None:
    assert "Traceback" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, text
    for fragment in fragments:
        assert fragment in errors[0], text


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> tuple[Ranks, int]:
    """A run whose rank 1 got SIGTERM at step FAULT_STEP, and the step its checkpoint holds."""
    run_dir = tmp_path_factory.mktemp("stopped") / "run"
    ranks = Ranks(run_dir, {**OPTIONS, "fault": {"rank": 1, "step": FAULT_STEP, "signal": "SIGTERM"}}, "stopped")
    ranks.wait()
    checkpoint = run_dir / "checkpoint.pt"
    return ranks, torch.load(checkpoint, weights_only=True)["loop"]["step"] if checkpoint.is_file() else -1


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> Ranks:
    """A run whose rank 1 got SIGKILL at step FAULT_STEP."""
    run_dir = tmp_path_factory.mktemp("killed") / "run"
    ranks = Ranks(run_dir, {**OPTIONS, "fault": {"rank": 1, "step": FAULT_STEP, "signal": "SIGKILL"}}, "killed")
    ranks.wait()
    return ranks


def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step_with_a_checkpoint(stopped):
    ranks, saved_step = stopped
    struck = ranks.fault_time()
    assert ranks.codes == [2, 2], f"{ranks.stderr(0)}\n{ranks.stderr(1)}"
    assert max(ranks.ended) - struck < BOUND_S  # type: ignore[operator]
    for rank in (0, 1):
        _assert_one_paragraph(
            ranks.stderr(rank), f"stopped by signal SIGTERM (received by rank 1) at step {FAULT_STEP}", "--resume"
        )
    assert saved_step == FAULT_STEP


def test_resume_after_sigterm_on_one_rank_matches_the_uninterrupted_run(stopped, reference):
    ranks, saved_step = stopped
    assert saved_step == FAULT_STEP
    _run(ranks.run_dir, {**OPTIONS, "resume": True}, "resumed")  # mid-epoch 2
    _assert_same_run(ranks.run_dir, reference)


def test_sigkill_on_one_rank_ends_the_survivor_with_one_paragraph(killed):
    struck = killed.fault_time()
    assert killed.codes == [2, -signal.SIGKILL], killed.stderr(0)
    assert killed.ended[0] - struck < BOUND_S  # type: ignore[operator]
    _assert_one_paragraph(killed.stderr(0), "rank 0 of 2 lost contact", "connection closed", "--resume")


def test_resume_after_sigkill_on_one_rank_matches_the_uninterrupted_run(killed, reference):
    assert killed.ended[0] is not None
    _run(killed.run_dir, {**OPTIONS, "resume": True}, "resumed")  # from the end of epoch 1
    _assert_same_run(killed.run_dir, reference)


def test_a_hung_rank_ends_the_survivor_after_dist_timeout(tmp_path):
    timeout = 10
    fault = {"rank": 1, "step": FAULT_STEP, "signal": "SIGSTOP"}
    ranks = Ranks(tmp_path / "run", {**OPTIONS, "dist_timeout": timeout, "fault": fault}, "hung")
    try:
        deadline = time.time() + START_S
        while ranks.processes[0].poll() is None and time.time() < deadline:
            time.sleep(0.05)
        ended = time.time()
        struck = ranks.fault_time()
        assert ranks.processes[0].returncode == 2, ranks.stderr(0)
        assert timeout - 1 < ended - struck < timeout + BOUND_S
        _assert_one_paragraph(ranks.stderr(0), f"did not answer within train.dist_timeout={timeout} s", "--resume")
    finally:
        ranks.kill()
