import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mtlvision.engine.trainer import NonFiniteLossError, Trainer, TrainingInterrupted
from mtlvision.errors import ConfigError

from .tinyrun import TinyScenes, flat_weights, tiny_model

HERE = Path(__file__).parent
COMMON = dict(epochs=3, batch_size=8, lr=5e-3, seed=3, progress=False, scheduler="cosine")


def test_training_lowers_every_task_loss():
    trainer = Trainer(tiny_model(), "ew", **{**COMMON, "epochs": 6})
    result = trainer.fit(TinyScenes())
    first, last = result.history[0], result.history[-1]
    for task in ("cls", "seg", "depth"):
        assert last[f"train_loss/{task}"] < 0.7 * first[f"train_loss/{task}"], task


def test_best_weights_and_history_land_in_the_run_folder(tmp_path):
    trainer = Trainer(tiny_model(), "ew", run_dir=tmp_path, **COMMON)
    result = trainer.fit(TinyScenes(), TinyScenes(8, seed=1))
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "checkpoint.pt").is_file()
    lines = (tmp_path / "history.csv").read_text().splitlines()
    assert len(lines) == 1 + COMMON["epochs"]
    assert "val/cls/accuracy" in lines[0]
    assert result.best_epoch == 1 + min(range(3), key=lambda i: result.history[i]["score"])


class _Stop(Exception):
    pass


def _stop_at(step):
    def on_step(trainer):
        if trainer.state.step == step:
            raise _Stop

    return on_step


@pytest.mark.parametrize("stop_step", [3, 6])  # mid-epoch, and exactly at an epoch boundary
def test_resume_gives_bitwise_the_uninterrupted_weights(tmp_path, stop_step):
    straight = tiny_model()
    Trainer(straight, "ew", **COMMON).fit(TinyScenes())

    first = Trainer(tiny_model(), "ew", run_dir=tmp_path, checkpoint_every=1, on_step=_stop_at(stop_step), **COMMON)
    with pytest.raises(_Stop):
        first.fit(TinyScenes())
    resumed_model = tiny_model(seed=99)  # different initial weights: everything must come from the checkpoint
    Trainer(resumed_model, "ew", run_dir=tmp_path, **COMMON).fit(TinyScenes(), resume=True)
    assert torch.equal(flat_weights(resumed_model), flat_weights(straight))


def _script(run_dir, options):
    return subprocess.Popen(
        [sys.executable, str(HERE / "tinyrun.py"), str(run_dir), json.dumps(options)],
        cwd=HERE.parent.parent,
        env={**os.environ, "PYTHONPATH": str(HERE.parent.parent)},
    )


def _wait_for(path, process, timeout=120):
    start = time.time()
    while not path.exists():
        assert process.poll() is None, "training process ended before the kill point"
        assert time.time() - start < timeout
        time.sleep(0.05)


@pytest.mark.parametrize("where", ["mid-epoch", "mid-checkpoint-write"])
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, where):
    options = {"epochs": 2, "batch_size": 8, "lr": 5e-3, "seed": 3, "checkpoint_every": 1}
    reference = tmp_path / "reference"
    reference.mkdir()
    assert _script(reference, options).wait(timeout=300) == 0

    killed = tmp_path / "killed"
    killed.mkdir()
    marker = tmp_path / "marker"
    kill_options = {**options, "marker": str(marker)}
    kill_options.update({"mark_step": 2} if where == "mid-epoch" else {"slow_save_after": 3})
    process = _script(killed, kill_options)
    _wait_for(marker, process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert _script(killed, {**options, "resume": True}).wait(timeout=300) == 0
    assert torch.equal(torch.load(killed / "final.pt"), torch.load(reference / "final.pt"))


def test_sigterm_saves_a_checkpoint_and_stops_cleanly(tmp_path):
    def send_term(trainer):
        if trainer.state.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    trainer = Trainer(tiny_model(), "ew", run_dir=tmp_path, on_step=send_term, **COMMON)
    with pytest.raises(TrainingInterrupted, match="resume with"):
        trainer.fit(TinyScenes())
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["loop"]["step"] == 2 and saved["loop"]["epoch_batches"] == 2


class _NaNAt:
    """Wraps a task so that its loss is NaN on chosen calls."""

    def __init__(self, task, bad_calls):
        self.task, self.bad_calls, self.calls = task, set(bad_calls), 0

    def __getattr__(self, name):
        return getattr(self.task, name)

    def loss(self, *args):
        value = self.task.loss(*args)
        self.calls += 1
        return value * float("nan") if self.calls in self.bad_calls else value


def test_a_nan_loss_skips_the_step_and_too_many_stop_the_run():
    model = tiny_model()
    trainer = Trainer(model, "ew", **{**COMMON, "epochs": 1})
    trainer.tasks["cls"] = _NaNAt(trainer.tasks["cls"], {2})
    before = flat_weights(model)
    result = trainer.fit(TinyScenes())
    assert result.skipped_steps == 1
    assert torch.isfinite(flat_weights(model)).all() and not torch.equal(before, flat_weights(model))

    failing = Trainer(tiny_model(), "ew", max_nonfinite=2, **COMMON)
    failing.tasks["cls"] = _NaNAt(failing.tasks["cls"], set(range(1, 100)))
    with pytest.raises(NonFiniteLossError, match="max_nonfinite=2"):
        failing.fit(TinyScenes())


def test_accumulation_equals_one_larger_batch():
    big = tiny_model()
    Trainer(big, "ew", **{**COMMON, "epochs": 1, "batch_size": 8, "optimizer": "sgd"}).fit(TinyScenes())
    small = tiny_model()
    Trainer(small, "ew", **{**COMMON, "epochs": 1, "batch_size": 4, "accumulate": 2, "optimizer": "sgd"}).fit(
        TinyScenes()
    )
    # the same samples per step (sampler order depends on the seed only), averaged over two halves
    torch.testing.assert_close(flat_weights(small), flat_weights(big), rtol=1e-4, atol=1e-5)


def test_accumulation_with_a_gradient_method_is_refused():
    with pytest.raises(ConfigError, match="loss-weighting balancers only"):
        Trainer(tiny_model(), "mgda", accumulate=2, progress=False)


def test_bf16_autocast_trains_on_cpu():
    trainer = Trainer(tiny_model(), "ew", precision="bf16", **{**COMMON, "epochs": 1})
    result = trainer.fit(TinyScenes())
    assert result.skipped_steps == 0 and torch.isfinite(torch.tensor(result.history[0]["train_loss"]))


def test_fp16_needs_cuda():
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        Trainer(tiny_model(), "ew", precision="fp16", device="cpu", progress=False)


@pytest.mark.slow
@pytest.mark.parametrize(("balancer", "options"), [("ew", {}), ("mgda", {"jacobian": "loop"})])
def test_compiled_training_gives_the_eager_weights(balancer, options):
    """torch.compile (inductor on CPU) changes how the step is computed, not what it computes; for a
    gradient method the per-task gradients cross the boundary between the compiled trunk and heads."""
    weights = []
    for compile in (False, True):
        model = tiny_model()
        Trainer(model, balancer, compile=compile, **{**COMMON, "epochs": 1, "optimizer": "sgd"}, **options).fit(
            TinyScenes()
        )
        weights.append(flat_weights(model))
    torch.testing.assert_close(weights[1], weights[0], rtol=1e-4, atol=1e-5)


def test_compile_with_the_vmapped_jacobian_is_refused():
    with pytest.raises(ConfigError, match="balancer.jacobian=loop"):
        Trainer(tiny_model(), "pcgrad", compile=True, progress=False)


def test_ema_weights_are_what_gets_evaluated():
    trainer = Trainer(tiny_model(), "ew", ema=0.9, **{**COMMON, "epochs": 1})
    trainer.fit(TinyScenes())
    assert trainer.evaluated_model is not trainer.model
    assert not torch.equal(flat_weights(trainer.evaluated_model), flat_weights(trainer.model))


def test_a_non_finite_gramian_skips_the_step_like_a_non_finite_loss(monkeypatch):
    from mtlvision.balancers import NonFiniteGramianError
    from mtlvision.balancers.gradient.mgda import MGDA

    calls = []
    original = MGDA.balance

    def overflow_once(self, losses, grads):
        calls.append(1)
        if len(calls) == 1:
            raise NonFiniteGramianError("the Gramian of tasks cls, seg is not finite")
        return original(self, losses, grads)

    monkeypatch.setattr(MGDA, "balance", overflow_once)
    result = Trainer(tiny_model(), "mgda", **{**COMMON, "epochs": 1}).fit(TinyScenes())
    assert result.skipped_steps == 1 and len(calls) > 1


def test_ema_carries_batch_norm_statistics():
    from mtlvision.models import MultiTaskModel

    from .tinyrun import tiny_backbone, tiny_tasks

    torch.manual_seed(0)
    model = MultiTaskModel(tiny_backbone, tiny_tasks())  # the heads keep their BatchNorm layers
    trainer = Trainer(model, "ew", ema=0.5, **{**COMMON, "epochs": 1})
    trainer.fit(TinyScenes())
    norms = [m for m in trainer.evaluated_model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(int(m.num_batches_tracked) > 0 for m in norms)
    assert all(float(m.running_mean.abs().sum()) > 0 for m in norms)


@pytest.mark.parametrize("balancer", ["ew", "upgrad", "mgda"])
def test_representation_and_gradient_balancers_train(balancer):
    result = Trainer(tiny_model(), balancer, **{**COMMON, "epochs": 1}).fit(TinyScenes())
    assert result.skipped_steps == 0 and all(result.history[0][f"weight/{t}"] >= 0 for t in ("cls", "seg", "depth"))


def test_unknown_select_lists_the_choices():
    with pytest.raises(ConfigError, match="seg.miou"):
        Trainer(tiny_model(), "ew", select="seg.nope", progress=False)


def test_auto_jacobian_taps_the_shared_layers_for_gradient_methods_in_parameter_mode():
    assert Trainer(tiny_model(), "upgrad", progress=False).jacobian == "auto"  # measured at the first step
    assert Trainer(tiny_model(), "upgrad", jacobian="rule", progress=False).jacobian == "layers"
    assert Trainer(tiny_model(), "moco", jacobian="rule", progress=False).jacobian == "layers"
    assert Trainer(tiny_model(), "moco", progress=False).taps is not None
    assert Trainer(tiny_model(), "uw", progress=False).taps is None
    trainer = Trainer(tiny_model(), "mgda", balancer_mode="representation", progress=False)
    assert trainer.jacobian == "batched" and trainer.taps is None


@pytest.mark.parametrize(
    ("options", "why"),
    [
        ({"compile": True}, "compiled forward"),
        ({"balancer_mode": "representation"}, "parameter-mode path"),
    ],
)
def test_an_impossible_layer_path_is_refused_with_its_reason(options, why):
    with pytest.raises(ConfigError, match=why):
        Trainer(tiny_model(), "mgda", jacobian="layers", progress=False, **options)


def test_training_on_the_layer_path_gives_the_parameter_path_weights():
    weights = []
    for jacobian in ("batched", "layers"):
        model = tiny_model()
        Trainer(model, "upgrad", jacobian=jacobian, **{**COMMON, "epochs": 1, "optimizer": "sgd"}).fit(TinyScenes())
        weights.append(flat_weights(model))
    torch.testing.assert_close(weights[1], weights[0], rtol=1e-4, atol=1e-5)


def test_auto_jacobian_records_its_measured_choice_in_the_run_folder(tmp_path):
    trainer = Trainer(tiny_model(), "upgrad", run_dir=tmp_path, **{**COMMON, "epochs": 1})
    assert trainer.jacobian == "auto" and trainer.taps is not None
    trainer.fit(TinyScenes(16))
    choice = trainer.jacobian_choice
    assert choice is not None and trainer.jacobian == choice.path
    assert sorted(choice.seconds) == ["batched", "layers", "loop"]
    assert (trainer.taps is not None) == (choice.path == "layers")  # the hooks go when the layers path lost
    saved = json.loads((tmp_path / "jacobian_paths.json").read_text())
    assert saved[choice.key]["path"] == choice.path


def test_epoch_end_reports_validation_metrics_and_the_best_epoch_so_far():
    summaries = []
    trainer = Trainer(
        tiny_model(), "ew", epochs=2, batch_size=8, lr=5e-3, progress=False, on_epoch_end=summaries.append
    )
    trainer.fit(TinyScenes(16), TinyScenes(8, seed=1))
    assert [s.epoch for s in summaries] == [1, 2] and summaries[0].is_best and summaries[0].best_epoch == 1
    assert set(summaries[0].metrics) == {"cls", "seg", "depth"} and summaries[0].val_loss is not None
    last = summaries[-1]
    assert last.best_epoch == trainer.state.best_epoch
    assert last.best_metrics == summaries[last.best_epoch - 1].metrics
    assert "epoch 2/2" in last.line()


def test_select_last_keeps_the_last_epoch():
    trainer = Trainer(tiny_model(), "ew", epochs=3, batch_size=8, lr=5e-3, progress=False, select="last")
    assert trainer.fit(TinyScenes(16), TinyScenes(8, seed=1)).best_epoch == 3
    trainer = Trainer(tiny_model(), "ew", epochs=2, batch_size=8, lr=5e-3, progress=False, select="last")
    assert trainer.fit(TinyScenes(16)).best_epoch == 2


def test_resuming_with_fewer_epochs_than_completed_is_refused(tmp_path):
    options = dict(batch_size=8, lr=5e-3, progress=False, run_dir=tmp_path)
    Trainer(tiny_model(), "ew", epochs=2, **options).fit(TinyScenes(16))
    with pytest.raises(ConfigError, match="train.epochs=1 is fewer than the 2 epochs"):
        Trainer(tiny_model(), "ew", epochs=1, **options).fit(TinyScenes(16), resume=True)
