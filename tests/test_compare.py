"""From experts to one model through the API and CLI, on tiny scenes: baseline (with the common init),
merge, train from the merge with distillation, compare."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from mtlvision import api, cli
from mtlvision.config import load_config
from mtlvision.engine.build import is_plain_start
from mtlvision.engine.comparing import describe_run
from mtlvision.engine.merged_run import base_fingerprint, check_mergeable, common_init
from mtlvision.engine.runs import INIT_WEIGHTS_NAME, Baselines, Run
from mtlvision.errors import MtlvisionError
from mtlvision.evaluation.compare import CompareEntry, Comparison, time_inference

TINY = {
    "data.image_size": 32,
    "data.train_size": 16,
    "data.val_size": 8,
    "data.test_size": 8,
    "train.epochs": 1,
    "train.batch_size": 8,
    "train.progress": False,
    "train.device": "cpu",
    "model.backbone": "resnet18",
    "tasks": ["count", "segmentation"],
}


# The pipeline trains two experts and a joint model (about a minute of CPU): its tests are marked slow.
@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("runs")
    baselines = api.baseline("scenes", TINY, out=out)
    merged = api.merge([baselines.parent], out / "merged", rule="ties", hparams={"density": 0.5})
    return {"out": out, "baselines": baselines, "merged": merged.path}


@pytest.mark.slow
def test_baseline_records_one_common_initialisation(pipeline: dict[str, Path]) -> None:
    experts = Baselines.load(pipeline["baselines"]).expert_runs()
    assert set(experts) == {"count", "segmentation"}
    inits = [load_file(str(path / INIT_WEIGHTS_NAME)) for path in experts.values()]
    backbone = [k for k in inits[0] if k.startswith("architecture.backbone.")]
    assert backbone and all(torch.equal(inits[0][k], inits[1][k]) for k in backbone)
    trained = load_file(str(experts["count"] / "model.safetensors"))
    assert any(not torch.equal(trained[k], inits[0][k]) for k in backbone if trained[k].is_floating_point())


@pytest.mark.slow
def test_the_merged_run_is_a_normal_evaluated_run(pipeline: dict[str, Path]) -> None:
    merged = Run.load(pipeline["merged"])
    assert [e.name for e in merged.config.tasks or []] == ["count", "segmentation"]
    record = merged.report.merge
    assert record["rule"] == "ties" and record["hparams"] == {"density": 0.5, "scale": 1.0}
    assert record["batch_norm"] == "recomputed on the train split"
    assert len(record["base"]["sha256"]) == 64 and record["base"]["model_init"] == "kaiming"
    assert record["merge_seconds"] >= 0
    assert record["copied_tensors_per_task"].keys() == {"count", "segmentation"}
    assert merged.report.delta_m is not None
    again = api.evaluate(pipeline["merged"])
    for task, values in merged.report.metrics.items():
        for metric, value in values.items():
            assert again.metrics[task][metric] == pytest.approx(value, abs=1e-6)
    weights = load_file(str(pipeline["merged"] / "model.safetensors"))
    experts = Baselines.load(pipeline["baselines"]).expert_runs()
    for task in ("count", "segmentation"):
        expert = load_file(str(experts[task] / "model.safetensors"))
        head = [k for k in expert if k.startswith(f"heads.{task}.") and "running" not in k and "num_batches" not in k]
        assert head and all(torch.equal(weights[k], expert[k]) for k in head)


@pytest.mark.slow
def test_experts_from_a_given_start_are_merged_with_data_rules_and_other_starts_refused(
    pipeline: dict[str, Path], capsys
) -> None:
    out, start = pipeline["out"], pipeline["merged"] / "model.safetensors"
    baselines = api.baseline("scenes", {**TINY, "model.init": str(start)}, out=out, name="from-file")
    experts = Baselines.load(baselines).expert_runs()
    started = load_file(str(start))
    for path in experts.values():
        init = load_file(str(path / INIT_WEIGHTS_NAME))
        backbone = [k for k in init if k.startswith("architecture.backbone.")]
        assert backbone and all(torch.equal(init[k], started[k]) for k in backbone)
    merged = out / "m-regmean"
    assert (
        cli.main(["merge", str(baselines.parent), "--rule", "regmean", "--set", "samples=4", "--out", str(merged)]) == 0
    )
    assert "regmean" in capsys.readouterr().out
    record = Run.load(merged).report.merge
    assert record["hparams"] == {"samples": 4.0, "alpha": 0.9} and record["base"] == {"model_init": str(start)}
    iso = api.merge([baselines.parent], out / "m-iso", rule="iso_cts").report.merge
    assert iso["base"]["sha256"] == base_fingerprint(common_init([Run.load(p) for p in experts.values()], "iso_cts"))
    first = Baselines.load(pipeline["baselines"]).expert_runs()
    with pytest.raises(MtlvisionError, match="did not start from one initialisation.*model.init="):
        api.merge([first["count"], experts["segmentation"]], out / "m-mixed", rule="tsv_m")
    with pytest.raises(MtlvisionError, match="did not start from one initialisation.*'wemoe'"):
        api.merge([first["count"], experts["segmentation"]], out / "m-mixed-wemoe", rule="wemoe")


@pytest.mark.slow
def test_train_from_the_merge_with_distillation_then_compare(pipeline: dict[str, Path], capsys) -> None:
    out = pipeline["out"]
    run = api.train(
        "scenes",
        {**TINY, "model.init": str(pipeline["merged"]), "distill.experts": str(pipeline["baselines"].parent)},
        out=out,
        name="joint",
    )
    assert Path(run.config.model.init).is_absolute()
    assert describe_run(run) == "joint from merged (ties), distilled from experts, hps + ew"
    assert describe_run(Run.load(pipeline["merged"])) == "merged (ties), before training"
    comparison = api.compare([pipeline["merged"], run.path], repeats=1, batch_size=2)
    assert [e.label for e in comparison.entries] == ["2 experts", "merged", "joint"]
    assert comparison.delta(comparison.experts).overall == 0.0
    merged_delta = Run.load(pipeline["merged"]).report.delta_m["overall"]
    assert comparison.delta(comparison.runs[0]).overall == pytest.approx(merged_delta)
    assert comparison.experts.parameters > comparison.runs[0].parameters > comparison.experts.parameters / 2
    header, rows = comparison.task_rows("segmentation")
    assert header[2:4] == ["miou ↑", "pixel_accuracy ↑"] and len(rows) == 3
    markdown = comparison.markdown()
    assert "joint from merged (ties), distilled from experts" in markdown and "| 2 experts |" in markdown

    code = cli.main(
        [
            "compare",
            str(pipeline["merged"]),
            str(run.path),
            "--out",
            str(out / "cmp"),
            "--repeats",
            "1",
            "--batch-size",
            "2",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "segmentation (test split)" in printed and "compare.png" in printed
    assert "merged (ties), before training" in (out / "cmp" / "compare.md").read_text()
    assert (out / "cmp" / "compare.png").stat().st_size > 1000
    report = json.loads((out / "cmp" / "compare.json").read_text())
    assert [m["label"] for m in report["models"]] == ["2 experts", "merged", "joint"]


@pytest.mark.slow
def test_experts_of_other_backbones_or_an_existing_output_are_refused(pipeline: dict[str, Path], tmp_path) -> None:
    experts = [Run.load(p) for p in Baselines.load(pipeline["baselines"]).expert_runs().values()]
    other = Run(
        path=Path("other"), config=load_config("scenes", {**TINY, "model.backbone": "resnet34", "tasks": ["depth"]})
    )
    with pytest.raises(MtlvisionError, match="model.backbone differs"):
        check_mergeable([experts[0], other])
    with pytest.raises(MtlvisionError, match="several experts predict task\\(s\\) count"):
        check_mergeable([experts[0], experts[0]])
    assert cli.main(["merge", str(pipeline["baselines"].parent), "--out", str(pipeline["merged"])]) == 2


@pytest.mark.slow
def test_task_arithmetic_with_scale_zero_gives_back_the_common_initialisation(pipeline: dict[str, Path]) -> None:
    run = api.merge(
        [pipeline["baselines"].parent], pipeline["out"] / "ta0", rule="task_arithmetic", hparams=["scale=0"]
    )
    weights = load_file(str(run.path / "model.safetensors"))
    init = load_file(str(next(iter(Baselines.load(pipeline["baselines"]).expert_runs().values())) / INIT_WEIGHTS_NAME))
    names = dict(run_model_parameters(run.path))
    backbone = [k for k in names if k.startswith("architecture.backbone.")]
    assert backbone and all(torch.equal(weights[k], init[k]) for k in backbone)


@pytest.mark.slow
def test_adamerging_learns_coefficients_on_test_images_and_records_them(pipeline: dict[str, Path], capsys) -> None:
    out = pipeline["out"] / "m-ada"
    settings = ["steps=2", "batch_size=4", "batches=1", "granularity=layer"]
    assert (
        cli.main(
            ["merge", str(pipeline["baselines"].parent), "--rule", "adamerging", "--set", *settings, "--out", str(out)]
        )
        == 0
    )
    assert "adamerging" in capsys.readouterr().out
    record = Run.load(out).report.merge
    assert record["hparams"]["steps"] == 2 and record["hparams"]["split"] == "test"
    learned = record["learned"]
    assert set(learned) == {
        "objective_first_step",
        "objective_last_step",
        "mean_coefficient_per_expert",
        "coefficients",
    }
    experts = Baselines.load(pipeline["baselines"]).expert_runs()
    init = load_file(str(experts["count"] / INIT_WEIGHTS_NAME))
    trained = [load_file(str(experts[t] / "model.safetensors")) for t in ("count", "segmentation")]
    weights = load_file(str(out / "model.safetensors"))
    for key, (first, second) in learned["coefficients"].items():
        assert 0 <= first <= 1 and 0 <= second <= 1
        expected = init[key] + first * (trained[0][key] - init[key]) + second * (trained[1][key] - init[key])
        torch.testing.assert_close(weights[key], expected, atol=1e-3, rtol=1e-3)


@pytest.mark.slow
def test_wemoe_merge_is_rebuilt_by_eval_compare_and_predict(pipeline: dict[str, Path], capsys) -> None:
    out = pipeline["out"] / "m-wemoe"
    settings = ["steps=2", "batch_size=4", "lr=0.01"]
    command = ["merge", str(pipeline["baselines"].parent), "--rule", "wemoe", "--set", *settings, "--out", str(out)]
    assert cli.main(command) == 0
    assert "wemoe" in capsys.readouterr().out
    record = Run.load(out).report.merge
    blocks = [f"architecture.backbone.stages.{s}.layer{s}.{i}" for s in range(1, 5) for i in (0, 1)]
    assert record["rule"] == "wemoe" and record["learned"]["upscaled_blocks"] == blocks
    assert (out / "wemoe.json").is_file()
    # routed blocks keep θ_0 and both task vectors; the stem outside them is task arithmetic (λ = 0.3)
    experts = Baselines.load(pipeline["baselines"]).expert_runs()
    init = load_file(str(experts["count"] / INIT_WEIGHTS_NAME))
    trained = [load_file(str(experts[t] / "model.safetensors")) for t in ("count", "segmentation")]
    weights = load_file(str(out / "model.safetensors"))
    conv = "architecture.backbone.stages.1.layer1.0"
    assert torch.equal(weights[f"{conv}.block.conv1.layer.weight"], init[f"{conv}.conv1.weight"])
    vectors = torch.stack([t[f"{conv}.conv1.weight"] - init[f"{conv}.conv1.weight"] for t in trained])
    torch.testing.assert_close(weights[f"{conv}.block.conv1.vectors"], vectors)
    stem = "architecture.backbone.stages.0.conv1.weight"
    torch.testing.assert_close(weights[stem], init[stem] + 0.3 * sum(t[stem] - init[stem] for t in trained))
    # every loader rebuilds the upscaled model: evaluation gives the merge's metrics, compare counts T task vectors
    recorded = Run.load(out).report.metrics
    evaluated = api.evaluate(out).metrics
    assert evaluated.keys() == recorded.keys()
    assert all(evaluated[task] == pytest.approx(recorded[task], abs=1e-6) for task in recorded)
    model, _ = api.load_model(out)
    plain, _ = api.load_model(pipeline["merged"])
    in_blocks = sum(p.numel() for b in blocks for p in plain.get_submodule(b).parameters())
    routers = sum(p.numel() for n, p in model.named_parameters() if ".router." in n)
    parameters = sum(p.numel() for p in model.parameters())
    assert parameters == sum(p.numel() for p in plain.parameters()) + 2 * in_blocks + routers
    comparison = api.compare([out], repeats=1, batch_size=2)
    assert comparison.runs[0].parameters == parameters and comparison.runs[0].inference_ms > 0
    assert comparison.delta(comparison.runs[0]).overall == pytest.approx(Run.load(out).report.delta_m["overall"])
    image = pipeline["out"] / "wemoe-input.png"
    Image.fromarray((torch.rand(32, 32, 3) * 255).byte().numpy()).save(image)
    predictions = api.predict(out, [image], pipeline["out"] / "wemoe-preds")
    assert len(predictions) == 1 and set(predictions[0]["tasks"]) == {"count", "segmentation"}
    assert not is_plain_start(out) and is_plain_start(pipeline["merged"])  # the merging benchmark's start rule
    with pytest.raises(MtlvisionError, match="WEMoE merge"):
        api.train("scenes", {**TINY, "model.init": str(out)}, out=pipeline["out"], name="from-wemoe")


@pytest.mark.slow
def test_merge_data_gives_the_images_a_rule_learns_on_and_is_recorded(pipeline: dict[str, Path], capsys) -> None:
    source, out = str(pipeline["baselines"].parent), pipeline["out"]
    ada = ["--rule", "adamerging", "--set", "steps=1", "batch_size=4", "batches=1", "granularity=task"]
    tiny_data = [f"{key}={value}" for key, value in TINY.items() if key.startswith("data.")]
    runs = {name: out / f"d-{name}" for name in ("own", "same", "other")}
    assert cli.main(["merge", source, *ada, "--out", str(runs["own"])]) == 0
    assert (
        cli.main(["merge", source, *ada, "--data", "scenes", "--data-set", *tiny_data, "--out", str(runs["same"])]) == 0
    )
    other = ["--data", "multimnist", "--data-set", "data.test_size=8", "--out", str(runs["other"])]
    assert cli.main(["merge", source, *ada, *other]) == 0
    records = {name: Run.load(path).report.merge for name, path in runs.items()}
    assert records["own"]["data"] == {
        "source": "the experts' data",
        "dataset": "each expert's own",
        "split": "test",
        "labels": False,
    }
    assert records["other"]["data"] == {
        "source": "multimnist",
        "dataset": "multimnist",
        "split": "test",
        "labels": False,
    }
    first = {name: record["learned"]["objective_first_step"] for name, record in records.items()}
    assert first["same"] == pytest.approx(first["own"], rel=1e-6)  # the experts' data named explicitly: same batches
    assert first["other"] != pytest.approx(first["own"], rel=1e-3)  # MultiMNIST's images: another objective
    capsys.readouterr()
    assert cli.main(["merge", source, "--rule", "ties", "--data", "scenes", "--out", str(out / "d-ties")]) == 2
    assert "merging rule 'ties' combines the experts' weights alone and reads no data" in capsys.readouterr().err
    assert not (out / "d-ties").exists()


@pytest.mark.slow
def test_merge_without_out_and_compare_with_the_experts_folder(pipeline: dict[str, Path]) -> None:
    experts = pipeline["baselines"].parent
    assert cli.main(["merge", str(experts)]) == 0  # the commands: out defaults to m-RULE beside the experts
    merged = experts.parent / "m-average"
    assert Run.load(merged).report.merge["rule"] == "average"
    comparison = api.compare([experts, merged], repeats=1, batch_size=2)
    assert [e.label for e in comparison.entries] == ["2 experts", "m-average"]
    with pytest.raises(MtlvisionError, match="one set of experts"):
        api.compare([experts, merged], pipeline["baselines"], repeats=1)


def run_model_parameters(path: Path) -> list[tuple[str, torch.nn.Parameter]]:
    model, _ = api.load_model(path)
    return list(model.named_parameters())


# ------------------------------------------------------------------------------ fast: the report itself
def _entry(label: str, accuracy: float, miou: float, parameters: int, ms: float) -> CompareEntry:
    return CompareEntry(
        label=label,
        kind=f"{label} kind",
        path=f"/runs/{label}",
        metrics={"count": {"accuracy": accuracy}, "segmentation": {"miou": miou, "err": 2 - miou}},
        parameters=parameters,
        inference_ms=ms,
    )


def _comparison() -> Comparison:
    return Comparison(
        experts=_entry("experts", 0.5, 0.4, 200, 10.0),
        runs=[_entry("merged", 0.6, 0.3, 110, 6.0), _entry("joint", 0.5, 0.5, 110, 5.0)],
        directions={"count": {"accuracy": True}, "segmentation": {"miou": True, "err": False}},
        split="test",
        baselines="b.json",
        batch_size=4,
        device="cpu",
    )


def test_comparison_delta_m_matches_a_hand_computation_and_renders(tmp_path: Path) -> None:
    comparison = _comparison()
    merged = comparison.delta(comparison.runs[0])
    # count: -(0.6-0.5)/0.5 = -20%; segmentation: miou -(0.3-0.4)/0.4 = +25%, err (1.7-1.6)/1.6 = +6.25%
    assert merged.per_task["count"] == pytest.approx(-20.0)
    assert merged.per_task["segmentation"] == pytest.approx((25.0 + 6.25) / 2)
    assert merged.overall == pytest.approx((-20.0 + 25.0 + 6.25) / 3)
    rows = comparison.summary_rows()
    assert [r[0] for r in rows] == ["experts", "merged", "joint"]
    assert rows[1][5] == "0.55×" and rows[2][7] == "0.50×"
    header, task_rows = comparison.task_rows("segmentation")
    assert header == ["model", "what it is", "miou ↑", "err ↓", "Δm %"]
    assert task_rows[2][2:] == ["0.5000", "1.5000", f"{(-25.0 - 6.25) / 2:+.2f}"]
    titles = [t.title for t in comparison.tables()]
    assert titles[:2] == ["count (test split)", "segmentation (test split)"]
    assert "| merged | merged kind |" in comparison.markdown()
    assert comparison.plot(tmp_path / "c.png").stat().st_size > 1000
    assert json.loads(json.dumps(comparison.to_dict()))["models"][1]["delta_m"]["overall"] == pytest.approx(
        merged.overall
    )


def test_time_inference_is_the_median_over_every_model() -> None:
    calls: list[int] = []

    class Counting(torch.nn.Module):
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            calls.append(images.shape[0])
            return images

    elapsed = time_inference([Counting(), Counting()], torch.zeros(3, 1), repeats=4, device=torch.device("cpu"))
    assert elapsed >= 0 and calls == [3] * 10  # one warm-up pass and four timed passes over both models


def test_describe_run_reads_what_a_run_is(tmp_path: Path) -> None:
    def make(name: str, report: dict, **overrides) -> Run:
        config = load_config("scenes", {**TINY, **overrides})
        path = tmp_path / name
        path.mkdir()
        (path / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))
        (path / "metrics.json").write_text(json.dumps({"split": "test", "metrics": {}, **report}))
        return Run.load(path)

    merged = make("merged", {"merge": {"rule": "average"}})
    assert describe_run(merged) == "merged (average), before training"
    assert describe_run(make("scratch", {})) == "joint from scratch, hps + ew"
    assert describe_run(make("mtan", {}, **{"model.architecture": "mtan", "balancer.name": "pcgrad"})) == (
        "joint from scratch, mtan + pcgrad"
    )
    assert describe_run(make("distilled", {}, **{"distill.experts": "b"})) == (
        "joint from scratch, distilled from experts, hps + ew"
    )
    assert describe_run(make("from", {}, **{"model.init": str(merged.path)})) == (
        "joint from merged (average), hps + ew"
    )
    expert = make("expert", {}, tasks=["count"])
    assert describe_run(expert, [expert.path]) == "single-task expert"
    assert describe_run(expert) == "single-task from scratch"


def test_task_vectors_need_one_recorded_initialisation(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    runs = [Run(path=tmp_path / name, config=load_config("scenes", TINY)) for name in ("a", "b")]
    for run in runs:
        run.path.mkdir()
    with pytest.raises(MtlvisionError, match="holds no init.safetensors.*'ties'.*model.init=.*--rule average"):
        common_init(runs, "ties")
    save_file({"w": torch.zeros(3), "heads.a.w": torch.ones(1)}, str(runs[0].path / INIT_WEIGHTS_NAME))
    save_file({"w": torch.zeros(3), "heads.b.w": torch.ones(2)}, str(runs[1].path / INIT_WEIGHTS_NAME))
    assert set(common_init(runs, "ties")) == {"w"}
    assert base_fingerprint(common_init(runs, "ties")) == base_fingerprint({"w": torch.zeros(3)})
    assert base_fingerprint({"w": torch.zeros(3)}) != base_fingerprint({"w": torch.zeros(4)})
    save_file({"w": torch.ones(3)}, str(runs[1].path / INIT_WEIGHTS_NAME))
    with pytest.raises(MtlvisionError, match="did not start from one initialisation: tensor 'w'.*baseline DATA --set"):
        common_init(runs, "tsv_m")
