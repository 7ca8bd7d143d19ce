"""The Python API: the same jobs as the CLI, over the same objects.

>>> import mtlvision as mv
>>> run = mv.train("scenes", overrides={"balancer.name": "pcgrad", "train.epochs": 5})
>>> run.metrics["segmentation"]["miou"], run.metrics.get("delta_m")
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mtlvision.config import RunConfig, TaskEntry, load_config
from mtlvision.data.check import DataReport
from mtlvision.data.io import read_image
from mtlvision.engine import distributed as dist
from mtlvision.engine.build import build_model, build_split, build_tasks, build_trainer, dataset_source
from mtlvision.engine.checkpoint import load_weights, save_weights
from mtlvision.engine.device import resolve_device, seed_everything
from mtlvision.engine.inputs import check_config_data, skipped_summary
from mtlvision.engine.logging import console
from mtlvision.engine.runs import Run, new_run_dir, read_config, write_config, write_json
from mtlvision.engine.trainer import CHECKPOINT_NAME, WEIGHTS_NAME
from mtlvision.errors import ConfigError, DataError, MtlvisionError
from mtlvision.evaluation.delta_m import delta_m
from mtlvision.evaluation.evaluator import EvalResult, evaluate as evaluate_model
from mtlvision.evaluation.plots import plot_history
from mtlvision.models import MultiTaskModel
from mtlvision.models.complexity import model_complexity
from mtlvision.tasks import Task

ConfigSource = str | Path | RunConfig | None
Overrides = Mapping[str, Any] | Sequence[str] | None
BASELINES_NAME = "baselines.json"
INIT_WEIGHTS_NAME = "init.safetensors"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def _config(source: ConfigSource, overrides: Overrides) -> RunConfig:
    if isinstance(source, RunConfig):
        if overrides:
            raise MtlvisionError("overrides apply to a preset or YAML file, not to a RunConfig object")
        return source
    return load_config(source, dict(overrides) if isinstance(overrides, Mapping) else list(overrides or []))


def _resolved(config: RunConfig, tasks: Sequence[Task]) -> RunConfig:
    """The config with the task list written out (so config.yaml says exactly what ran)."""
    if config.tasks is not None:
        return config
    return config.model_copy(update={"tasks": [TaskEntry(name=t.name) for t in tasks]})


def _directions(tasks: Iterable[Task]) -> dict[str, dict[str, bool]]:
    return {t.name: dict(t.metric_directions) for t in tasks}


def default_baselines_path(out: str | Path, config: RunConfig) -> Path:
    """Where ``baseline`` stores the experts' metrics for this dataset: ``OUT/baseline-<data>/baselines.json``."""
    return Path(out) / f"baseline-{config.data.name}" / BASELINES_NAME


def _delta_m_report(
    config: RunConfig, tasks: Sequence[Task], metrics: dict[str, dict[str, float]], split: str, path: Path
) -> dict[str, Any]:
    """Δm against the stored single-task experts, or a note saying why it could not be computed."""
    import json

    if not path.is_file():
        return {"delta_m": None, "delta_m_note": f"no baselines at {path}; run `mtlvision baseline` for Δm"}
    stored = json.loads(path.read_text())
    if stored.get("data") != config.data.dataset_params:
        return {
            "delta_m": None,
            "delta_m_note": f"baselines at {path} were trained on other data ({stored.get('data')}); "
            "Δm needs experts on the same data",
        }
    experts = stored["experts"]
    missing = [t.name for t in tasks if t.name not in experts or split not in experts[t.name]["metrics"]]
    if missing:
        return {"delta_m": None, "delta_m_note": f"baselines at {path} lack task(s) {', '.join(missing)}"}
    result = delta_m(metrics, {t.name: experts[t.name]["metrics"][split] for t in tasks}, _directions(tasks))
    return {
        "delta_m": {
            **result.to_dict(),
            "baselines": str(path),
            "experts": {t.name: experts[t.name]["run"] for t in tasks},
        }
    }


def _finish(
    run_dir: Path,
    config: RunConfig,
    tasks: Sequence[Task],
    model: MultiTaskModel,
    trainer: Any,
    best_epoch: int,
    train_skipped: int | None = None,
) -> Run:
    """Evaluate the best weights on val and the eval split, write metrics.json and plots.

    ``train_skipped``: training samples skipped under ``data.skip_bad`` (reported with the eval splits').
    """
    load_weights(model, run_dir / WEIGHTS_NAME)
    results: dict[str, EvalResult] = {}
    skipped: dict[str, int | None] = {"train": train_skipped}
    for split in dict.fromkeys(["val", config.train.eval_split]):
        data = build_split(config, tasks, split, train=False)
        results[split] = evaluate_model(model, trainer.loader(data, shuffle=False), trainer.tasks, trainer.device)
        skipped[split] = data.skipped
    split = config.train.eval_split
    report: dict[str, Any] = {
        "split": split,
        "metrics": results[split].metrics,
        "val_metrics": results["val"].metrics,
        "best_epoch": best_epoch,
        "model": model_complexity(model, image_size=_image_size(config) or tuple(data[0]["image"].shape[-2:])),
        **skipped_summary(config, skipped),
    }
    baselines = Path(config.baselines) if config.baselines else default_baselines_path(run_dir.parent, config)
    report.update(_delta_m_report(config, tasks, results[split].metrics, split, baselines))
    if dist.is_main():
        write_json(run_dir / "metrics.json", report)
        plot_history(trainer.state.history, run_dir / "plots")
    return Run(path=run_dir, config=config, report=report)


def _image_size(config: RunConfig) -> tuple[int, int] | None:
    """The model's input size: ``data.augment.resize``, else ``data.image_size``, or None for datasets of
    varying size."""
    size = config.data.augment.get("resize") or getattr(dataset_source(config)[1], "image_size", None)
    if size is None:
        return None
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def train(
    config: ConfigSource = None,
    overrides: Overrides = None,
    *,
    name: str | None = None,
    out: str | Path = "runs",
    resume: str | Path | None = None,
    save_init: bool = False,
) -> Run:
    """Train a multi-task model (``mtlvision train``); with ``resume`` continue that run folder's checkpoint.

    ``save_init`` also stores the initial weights as ``init.safetensors`` (the base of task arithmetic).
    """
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / CHECKPOINT_NAME).is_file():
            raise MtlvisionError(f"cannot resume {run_dir}: it holds no {CHECKPOINT_NAME}")
        cfg = read_config(run_dir)
    else:
        cfg = _with_absolute_init(_config(config, overrides))
    tasks = build_tasks(cfg)
    cfg = _resolved(cfg, tasks)
    # the data is opened before the run folder is made, so that a wrong data.root leaves no empty run behind
    train_data = build_split(cfg, tasks, "train", train=True)
    val_data = build_split(cfg, tasks, "val", train=False)
    if resume is None:
        # under torchrun rank 0 makes the folder and every rank uses it
        dist.setup(resolve_device(cfg.train.device))
        made = str(new_run_dir(out, name or cfg.data.name)) if dist.is_main() else None
        run_dir = Path(str(dist.broadcast_object(made)))
    if dist.is_main():
        write_config(run_dir, cfg)
    console.print(f"Run folder: [bold]{run_dir}[/] — tasks: {', '.join(t.name for t in tasks)}")
    seed_everything(cfg.seed)  # the initial weights depend on the seed alone (experts share their backbone init)
    model = build_model(cfg, tasks, load_init=resume is None)
    if save_init and resume is None and dist.is_main():
        save_weights(model, run_dir / INIT_WEIGHTS_NAME)
    auxiliary = _distillation(cfg, tasks, model) if cfg.distill.experts else None
    trainer = build_trainer(cfg, model, run_dir, auxiliary=auxiliary)
    fit = trainer.fit(train_data, val_data, resume=resume is not None)
    return _finish(run_dir, cfg, tasks, model, trainer, fit.best_epoch, train_data.skipped)


def baseline(
    config: ConfigSource = None, overrides: Overrides = None, *, out: str | Path = "runs", name: str | None = None
) -> Path:
    """Train one single-task expert per task (``mtlvision baseline``) and store their metrics for Δm.

    Returns the path of ``baselines.json``; later runs on the same data find it and report Δm.
    """
    import json

    cfg = _config(config, overrides)
    tasks = build_tasks(cfg)
    folder = new_run_dir(out, name) if name else default_baselines_path(out, cfg).parent
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / BASELINES_NAME
    stored = json.loads(path.read_text()) if path.is_file() else {"data": cfg.data.dataset_params, "experts": {}}
    if stored["data"] != cfg.data.dataset_params:
        raise MtlvisionError(f"{path} holds experts trained on other data; choose another --name")
    for task in tasks:
        console.rule(f"single-task expert: {task.name}")
        expert_cfg = cfg.model_copy(
            update={"tasks": [e for e in (cfg.tasks or [TaskEntry(name=t.name) for t in tasks]) if e.name == task.name]}
        )
        run = train(expert_cfg, out=folder, name=task.name, save_init=True)
        stored["experts"][task.name] = {
            "run": str(run.path),
            "metrics": {
                run.report["split"]: run.report["metrics"][task.name],
                "val": run.report["val_metrics"][task.name],
            },
        }
        write_json(path, stored)
    return path


def load_model(run: str | Path | Run) -> tuple[MultiTaskModel, RunConfig]:
    """The trained model of a run folder (best weights) and its config."""
    run = run if isinstance(run, Run) else Run.load(run)
    tasks = build_tasks(run.config)
    model = build_model(run.config, tasks, load_init=False)
    load_weights(model, run.path / WEIGHTS_NAME)
    return model.eval(), run.config


def evaluate(run: str | Path | Run, split: str | None = None, baselines: str | Path | None = None) -> dict[str, Any]:
    """Evaluate a run's best weights on ``split`` (default: the run's eval split), with Δm when possible."""
    run = run if isinstance(run, Run) else Run.load(run)
    cfg = run.config
    split = split or cfg.train.eval_split
    model, _ = load_model(run)
    tasks = list(model.tasks.values())
    data = build_split(cfg, tasks, split, train=False)
    device = resolve_device(cfg.train.device)
    model.to(device)
    from mtlvision.data.collate import Collate
    from torch.utils.data import DataLoader

    loader = DataLoader(data, batch_size=cfg.train.batch_size, collate_fn=Collate(model.tasks))
    result = evaluate_model(model, loader, model.tasks, device)
    path = Path(baselines) if baselines else (
        Path(cfg.baselines) if cfg.baselines else default_baselines_path(run.path.parent, cfg)
    )
    return {
        "split": split,
        "metrics": result.metrics,
        **_delta_m_report(cfg, tasks, result.metrics, split, path),
        **skipped_summary(cfg, {split: data.skipped}),
    }


def _image_files(inputs: Iterable[str | Path]) -> list[Path]:
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files.extend(sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
        elif item.is_file():
            files.append(item)
        else:
            raise DataError(f"predict input {item} does not exist")
    if not files:
        raise DataError("predict found no image among its inputs")
    return files


def _jsonable(value: Any, stem: Path, key: str) -> Any:
    """Replace arrays by files beside the JSON: integer maps as PNG, float maps as .npy."""
    if isinstance(value, dict):
        return {k: _jsonable(v, stem, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, stem, key) for v in value]
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        if value.ndim == 2 and np.issubdtype(value.dtype, np.integer) and value.max(initial=0) < 256:
            path = stem.with_name(f"{stem.name}.{key}.png")
            Image.fromarray(value.astype(np.uint8)).save(path)
        else:
            path = stem.with_name(f"{stem.name}.{key}.npy")
            np.save(path, value)
        return path.name
    if isinstance(value, np.generic):
        return value.item()
    return value


def _panel(image: np.ndarray, drawings: dict[str, np.ndarray]) -> Image.Image:
    from PIL import ImageDraw

    tiles = [("input", image)] + list(drawings.items())
    height = max(t.shape[0] for _, t in tiles)
    width = sum(t.shape[1] for _, t in tiles)
    canvas = Image.new("RGB", (width, height + 14), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for title, tile in tiles:
        canvas.paste(Image.fromarray(tile), (x, 14))
        draw.text((x + 2, 1), title, fill="black")
        x += tile.shape[1]
    return canvas


@torch.no_grad()
def predict(run: str | Path | Run, inputs: Iterable[str | Path], out: str | Path = "preds") -> list[dict[str, Any]]:
    """Predict every task on images (files or folders): one JSON and one picture per image in ``out``."""
    import json

    model, cfg = load_model(run)
    size = _image_size(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for file in _image_files(inputs):
        image = read_image(file)
        if size is not None:
            image = torch.nn.functional.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        predictions = model(image[None])
        picture = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        stem = out / file.stem
        record: dict[str, Any] = {"image": str(file), "tasks": {}}
        drawings = {}
        for name, task in model.tasks.items():
            decoded = task.decode(predictions[name])[0]
            record["tasks"][name] = _jsonable(decoded, stem, name)
            drawings[name] = task.draw(picture, decoded)
        (stem.with_suffix(".json")).write_text(json.dumps(record, indent=2) + "\n")
        _panel(picture, drawings).save(stem.with_suffix(".png"))
        results.append(record)
    return results


def check_data(
    config: ConfigSource = None, overrides: Overrides = None, *, splits: Sequence[str] = ("train", "val", "test"),
    progress: bool = True,
) -> DataReport:
    """Read every sample of the configured data and report counts, label distributions and problems
    (``mtlvision data check``); ``report.errors`` is empty when nothing is wrong."""
    return check_config_data(_config(config, overrides), splits, progress=progress)


def _registries() -> dict[str, Any]:
    from mtlvision.balancers import BALANCERS
    from mtlvision.data.datasets import DATASETS
    from mtlvision.models.architectures import ARCHITECTURES
    from mtlvision.models.backbones import BACKBONES
    from mtlvision.tasks import TASKS

    return {
        "tasks": TASKS,
        "balancers": BALANCERS,
        "architectures": ARCHITECTURES,
        "backbones": BACKBONES,
        "datasets": DATASETS,
    }


def _sizes_config(config: ConfigSource, overrides: Overrides) -> RunConfig:
    """The setting of ``list architectures`` sizes: ``config``, else scenes with count and segmentation."""
    return _config(config, overrides) if config is not None else _config("scenes", {"tasks": ["count", "segmentation"]})


def architecture_sizes(config: ConfigSource = None, overrides: Overrides = None) -> dict[str, dict[str, Any]]:
    """Parameters and MACs (whole model and shared part) of every architecture for one configuration,
    for ``mtlvision list architectures``."""
    from mtlvision.models.architectures import ARCHITECTURES

    cfg = _sizes_config(config, overrides)
    tasks = build_tasks(cfg)
    size = _image_size(cfg) or (224, 224)
    sizes = {}
    for entry in ARCHITECTURES:
        model = build_model(cfg.model_copy(update={"model": cfg.model.model_copy(update={"architecture": entry.name})}),
                            tasks)
        sizes[entry.name] = model_complexity(model, image_size=size)
    return sizes


def architecture_sizes_setting(config: ConfigSource = None, overrides: Overrides = None) -> str:
    """A one-line description of the setting :func:`architecture_sizes` measured."""
    cfg = _sizes_config(config, overrides)
    tasks = ", ".join(t.name for t in build_tasks(cfg))
    return f"backbone {cfg.model.backbone}, tasks {tasks}, input {_image_size(cfg) or (224, 224)}, batch of one"


REGISTRY_KINDS = ("tasks", "balancers", "architectures", "backbones", "datasets")


def registry(kind: str) -> list[Any]:
    """The entries (name, description, citation) of one registry, for ``mtlvision list KIND``."""
    registries = _registries()
    if kind not in registries:
        raise MtlvisionError(f"unknown registry {kind!r}; choose one of {', '.join(REGISTRY_KINDS)}")
    return list(registries[kind])


# ------------------------------------------------------------------ experts -> one model: init, distil, merge
def _with_absolute_init(config: RunConfig) -> RunConfig:
    """``model.init`` as an absolute path when it names a run folder, so config.yaml says which one."""
    path = Path(config.model.init).expanduser()
    if not path.is_dir():
        return config
    return config.model_copy(update={"model": config.model.model_copy(update={"init": str(path.resolve())})})


def _baselines_file(source: str | Path) -> Path:
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / BASELINES_NAME
    if not path.is_file():
        raise MtlvisionError(
            f"{source} is neither a {BASELINES_NAME} nor a folder holding one (from `mtlvision baseline`)"
        )
    return path


def expert_runs(source: str | Path) -> dict[str, Path]:
    """The expert run folders listed in a ``baselines.json`` (or its folder), by task name.

    A run path stored relative to another working directory is looked for beside the file as well.
    """
    import json

    path = _baselines_file(source)
    experts: dict[str, Path] = {}
    for task, entry in json.loads(path.read_text()).get("experts", {}).items():
        candidates = [Path(entry["run"]), path.parent / Path(entry["run"]).name]
        found = next((c for c in candidates if (c / WEIGHTS_NAME).is_file()), None)
        if found is None:
            raise MtlvisionError(f"{path}: the expert run of task {task!r} ({entry['run']}) holds no {WEIGHTS_NAME}")
        experts[task] = found
    return experts


def _distillation(config: RunConfig, tasks: Sequence[Task], model: MultiTaskModel) -> Any:
    """The distillation loss of ``distill.*`` with the frozen experts of ``distill.experts``."""
    from mtlvision.engine.distill import Distillation

    settings = config.distill
    assert settings.experts is not None
    runs = expert_runs(settings.experts)
    weights = dict(settings.weights)
    wanted = [t.name for t in tasks if weights.get(t.name, 1.0) > 0]
    missing = [name for name in wanted if name not in runs]
    if missing:
        raise MtlvisionError(
            f"distill.experts={settings.experts} has no expert for task(s) {', '.join(missing)}; train them with "
            f"`mtlvision baseline` or set distill.weights.<task>=0"
        )
    experts = {name: load_model(runs[name])[0] for name in wanted}
    probe = build_split(config, tasks, "train", train=False)[0]["image"][None]
    console.print(f"Distilling from experts: {', '.join(f'{n} ({runs[n]})' for n in wanted)}")
    return Distillation(
        {t.name: t for t in tasks},
        experts,
        weights=weights,
        temperature=settings.temperature,
        feature_weight=settings.feature_weight,
        regression=settings.regression,
        student=model,
        probe=probe,
    )


def _merge_sources(sources: Sequence[str | Path]) -> list[Run]:
    """Run folders from the arguments: expert run folders, or a baselines folder/file standing for its experts."""
    runs: list[Run] = []
    for source in map(Path, sources):
        if (source / BASELINES_NAME).is_file() or source.name == BASELINES_NAME:
            runs.extend(Run.load(p) for p in expert_runs(source).values())
        else:
            runs.append(Run.load(source))
    if not runs:
        raise MtlvisionError("merge needs at least one expert run")
    return runs


def _check_mergeable(runs: Sequence[Run]) -> None:
    first = runs[0]
    for run in runs[1:]:
        for key in ("backbone", "architecture"):
            mine, theirs = getattr(first.config.model, key), getattr(run.config.model, key)
            if mine != theirs:
                raise MtlvisionError(
                    f"cannot merge: model.{key} differs ({mine!r} in {first.path}, {theirs!r} in {run.path}); "
                    "merging needs experts that share one backbone architecture"
                )
        if run.config.data.dataset_params != first.config.data.dataset_params:
            raise MtlvisionError(
                f"cannot merge: {run.path} was trained on other data than {first.path} "
                f"({run.config.data.dataset_params} vs {first.config.data.dataset_params})"
            )
    names = [e.name for run in runs for e in run.config.tasks or []]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise MtlvisionError(f"cannot merge: several experts predict task(s) {', '.join(repeated)}")


def _common_init(runs: Sequence[Run]) -> dict[str, torch.Tensor]:
    """The experts' common initialisation (their ``init.safetensors``), checked to be one and the same."""
    from safetensors.torch import load_file

    states = []
    for run in runs:
        path = run.path / INIT_WEIGHTS_NAME
        if not path.is_file():
            raise MtlvisionError(
                f"{run.path} holds no {INIT_WEIGHTS_NAME}: task arithmetic and TIES need the experts' common "
                "initialisation, which `mtlvision baseline` records; retrain the experts with it or use --rule average"
            )
        states.append(load_file(str(path)))
    common = set.intersection(*(set(s) for s in states))
    for key in sorted(common):
        if any(not torch.equal(states[0][key], s[key]) for s in states[1:]):
            raise MtlvisionError(
                f"the experts did not start from one initialisation (tensor {key!r} differs between their "
                f"{INIT_WEIGHTS_NAME}): task vectors need a common base; use --rule average"
            )
    return {k: states[0][k] for k in common}


def _evaluate_splits(
    config: RunConfig, model: MultiTaskModel, splits: Sequence[str]
) -> dict[str, dict[str, dict[str, float]]]:
    from torch.utils.data import DataLoader

    from mtlvision.data.collate import Collate

    device = resolve_device(config.train.device)
    model.to(device)
    tasks = list(model.tasks.values())
    results = {}
    for split in dict.fromkeys(splits):
        loader = DataLoader(
            build_split(config, tasks, split, train=False), batch_size=config.train.batch_size,
            collate_fn=Collate(model.tasks),
        )
        results[split] = evaluate_model(model, loader, model.tasks, device).metrics
    return results


def merge(
    experts: Sequence[str | Path], out: str | Path, rule: str = "average", hparams: Overrides = None
) -> Run:
    """One multi-task model from experts (``mtlvision merge``): heads carried over, shared part merged.

    ``experts`` are run folders (or a baselines folder standing for its experts); ``rule`` is a name of
    :data:`~mtlvision.engine.merge.MERGE_RULES` with ``hparams`` (a mapping or ``KEY=VALUE`` strings).
    The BatchNorm statistics are recomputed on the training split; ``out`` becomes a normal run folder,
    evaluated like a trained run, that ``eval``, ``predict`` and ``train --set model.init=OUT`` accept.
    """
    from mtlvision.config import parse_override
    from mtlvision.engine.merge import has_batch_norm, make_rule, merge_states, recompute_batch_norm
    from safetensors.torch import load_file
    from torch.utils.data import DataLoader

    from mtlvision.data.collate import Collate

    settings = dict(hparams) if isinstance(hparams, Mapping) else dict(parse_override(h) for h in hparams or [])
    merging = make_rule(rule, settings)
    runs = _merge_sources(experts)
    _check_mergeable(runs)
    run_dir = Path(out)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise MtlvisionError(f"--out {run_dir} already exists and is not empty; choose another folder")
    first = runs[0].config
    entries = [entry for run in runs for entry in run.config.tasks or []]
    cfg = first.model_copy(update={
        "tasks": entries,
        "model": first.model.model_copy(update={"init": "kaiming"}),
        "distill": first.distill.model_copy(update={"experts": None}),
    })
    tasks = build_tasks(cfg)
    model = build_model(cfg, tasks, load_init=False)
    states = {"+".join(e.name for e in run.config.tasks or []): load_file(str(run.path / WEIGHTS_NAME)) for run in runs}
    base = _common_init(runs) if merging.needs_base else None
    state, report = merge_states(model, states, merging, base)
    model.load_state_dict(state)
    device = resolve_device(cfg.train.device)
    if has_batch_norm(model):
        data = build_split(cfg, tasks, "train", train=False)
        loader = DataLoader(data, batch_size=cfg.train.batch_size, collate_fn=Collate(model.tasks))
        model.to(device)
        recompute_batch_norm(model, (batch["image"] for batch in loader), device)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(run_dir, cfg)
    save_weights(model, run_dir / WEIGHTS_NAME)
    split = cfg.train.eval_split
    results = _evaluate_splits(cfg, model, ["val", split])
    record: dict[str, Any] = {
        "split": split,
        "metrics": results[split],
        "val_metrics": results["val"],
        "model": model_complexity(model.cpu(), image_size=_image_size(cfg)),
        "merge": {
            "rule": rule,
            "hparams": merging.describe(),
            "experts": {name: str(run.path) for name, run in zip(states, runs)},
            "batch_norm": "recomputed on the train split" if has_batch_norm(model) else "none in the model",
            **report.summary(),
        },
    }
    baselines = Path(cfg.baselines) if cfg.baselines else default_baselines_path(run_dir.parent, cfg)
    record.update(_delta_m_report(cfg, tasks, results[split], split, baselines))
    write_json(run_dir / "metrics.json", record)
    return Run(path=run_dir, config=cfg, report=record)


def export(
    run: str | Path | Run,
    out: str | Path | None = None,
    *,
    opset: int | None = None,
    image_size: tuple[int, int] | None = None,
) -> Any:
    """Export a run's model to ONNX (``mtlvision export``): ``RUN/model.onnx`` by default, with a JSON
    description beside it; checked against PyTorch with onnxruntime (see :mod:`mtlvision.export`)."""
    from mtlvision.export import DEFAULT_OPSET, export_onnx

    run = run if isinstance(run, Run) else Run.load(run)
    model, cfg = load_model(run)
    size = image_size or _image_size(cfg)
    if size is None:
        raise ConfigError(
            f"{run.path}: the run's data has images of varying size; give the export size (--image-size H W)"
        )
    return export_onnx(model, Path(out) if out else run.path / "model.onnx", (int(size[0]), int(size[1])),
                       opset=opset or DEFAULT_OPSET)


def describe_run(run: Run, experts: Iterable[Path] = ()) -> str:
    """What a run is, read from its config and metrics: merged, distilled, started from another run, ..."""
    if "merge" in run.report:
        return f"merged ({run.report['merge']['rule']}), before training"
    resolved = {Path(p).resolve() for p in experts}
    if run.path.resolve() in resolved:
        return "single-task expert"
    parts = []
    init = Path(run.config.model.init)
    if init.is_dir():
        try:
            start = Run.load(init)
            parts.append(
                f"joint from merged ({start.report['merge']['rule']})" if "merge" in start.report
                else f"joint from {init.name}"
            )
        except MtlvisionError:
            parts.append(f"joint from {init.name}")
    elif len(run.config.tasks or []) != 1:
        parts.append("joint from scratch")
    else:
        parts.append("single-task from scratch")
    if run.config.distill.experts:
        parts.append("distilled from experts")
    if len(run.config.tasks or []) != 1:
        parts.append(f"{run.config.model.architecture_name} + {run.config.balancer.name}")
    return ", ".join(parts)


def compare(
    runs: Sequence[str | Path],
    baselines: str | Path | None = None,
    *,
    batch_size: int = 8,
    repeats: int = 5,
    device: str = "cpu",
) -> Any:
    """The whole path from experts to one model (``mtlvision compare``): per task, the experts and every run,
    each metric, Δm against the experts, parameter count and inference time (median of ``repeats`` passes
    over the first ``batch_size`` images of the evaluation split) of each model vs the experts together.
    """
    import json

    from mtlvision.evaluation.compare import Comparison, CompareEntry, time_inference

    loaded = [Run.load(r) for r in runs]
    if not loaded:
        raise MtlvisionError("compare needs at least one run folder")
    first = loaded[0]
    candidates = [
        Path(run.config.baselines) if run.config.baselines else default_baselines_path(run.path.parent, run.config)
        for run in loaded
    ]
    path = _baselines_file(baselines) if baselines else next((c for c in candidates if c.is_file()), candidates[0])
    if not path.is_file():
        raise MtlvisionError(
            f"no baselines at {path}: compare measures every run against the experts; pass --baselines"
        )
    stored = json.loads(path.read_text())
    expert_paths = expert_runs(path)
    torch_device = resolve_device(device)
    split = first.report.get("split", first.config.train.eval_split)
    data = build_split(first.config, build_tasks(first.config), split, train=False)
    images = torch.stack([data[i]["image"] for i in range(min(batch_size, len(data)))])
    directions: dict[str, dict[str, bool]] = {}
    entries: list[CompareEntry] = []
    for run in loaded:
        if "metrics" not in run.report:
            raise MtlvisionError(f"{run.path} holds no metrics.json; evaluate it first (`mtlvision eval`)")
        if run.report["split"] != split:
            raise MtlvisionError(f"{run.path} was evaluated on {run.report['split']}, the others on {split}")
        model, _ = load_model(run)
        directions.update(_directions(model.tasks.values()))
        entries.append(CompareEntry(
            label=run.path.name, kind=describe_run(run, expert_paths.values()), path=str(run.path),
            metrics=run.report["metrics"], parameters=sum(p.numel() for p in model.parameters()),
            inference_ms=time_inference([model], images, repeats, torch_device),
        ))
    task_names = list(directions)
    missing = [t for t in task_names if t not in stored["experts"] or split not in stored["experts"][t]["metrics"]]
    if missing:
        raise MtlvisionError(f"{path} has no expert for task(s) {', '.join(missing)} on the {split} split")
    experts = [load_model(p)[0] for p in dict.fromkeys(expert_paths[t] for t in task_names)]
    reference = CompareEntry(
        label=f"{len(experts)} experts", kind="single-task experts", path=str(path),
        metrics={t: stored["experts"][t]["metrics"][split] for t in task_names},
        parameters=sum(p.numel() for m in experts for p in m.parameters()),
        inference_ms=time_inference(experts, images, repeats, torch_device),
    )
    return Comparison(experts=reference, runs=entries, directions=directions, split=split,
                      baselines=str(path), batch_size=batch_size, device=str(torch_device))
