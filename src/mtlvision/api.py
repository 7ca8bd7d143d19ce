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
from mtlvision.data.io import read_image
from mtlvision.engine.build import build_model, build_split, build_tasks, build_trainer, dataset_source
from mtlvision.engine.checkpoint import load_weights
from mtlvision.engine.device import resolve_device
from mtlvision.engine.logging import console
from mtlvision.engine.runs import Run, new_run_dir, read_config, write_config, write_json
from mtlvision.engine.trainer import CHECKPOINT_NAME, WEIGHTS_NAME
from mtlvision.errors import DataError, MtlvisionError
from mtlvision.evaluation.delta_m import delta_m
from mtlvision.evaluation.evaluator import EvalResult, evaluate as evaluate_model
from mtlvision.evaluation.plots import plot_history
from mtlvision.models import MultiTaskModel
from mtlvision.models.complexity import model_complexity
from mtlvision.tasks import Task

ConfigSource = str | Path | RunConfig | None
Overrides = Mapping[str, Any] | Sequence[str] | None
BASELINES_NAME = "baselines.json"
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
    run_dir: Path, config: RunConfig, tasks: Sequence[Task], model: MultiTaskModel, trainer: Any, best_epoch: int
) -> Run:
    """Evaluate the best weights on val and the eval split, write metrics.json and plots."""
    load_weights(model, run_dir / WEIGHTS_NAME)
    results: dict[str, EvalResult] = {}
    for split in dict.fromkeys(["val", config.train.eval_split]):
        data = build_split(config, tasks, split, train=False)
        results[split] = evaluate_model(model, trainer.loader(data, shuffle=False), trainer.tasks, trainer.device)
    split = config.train.eval_split
    report: dict[str, Any] = {
        "split": split,
        "metrics": results[split].metrics,
        "val_metrics": results["val"].metrics,
        "best_epoch": best_epoch,
        "model": model_complexity(model, image_size=_image_size(config)),
    }
    baselines = Path(config.baselines) if config.baselines else default_baselines_path(run_dir.parent, config)
    report.update(_delta_m_report(config, tasks, results[split].metrics, split, baselines))
    write_json(run_dir / "metrics.json", report)
    plot_history(trainer.state.history, run_dir / "plots")
    return Run(path=run_dir, config=config, report=report)


def _image_size(config: RunConfig) -> tuple[int, int] | None:
    """The configured input size (``data.image_size``), or None for datasets of varying size."""
    size = getattr(dataset_source(config)[1], "image_size", None)
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
) -> Run:
    """Train a multi-task model (``mtlvision train``); with ``resume`` continue that run folder's checkpoint."""
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / CHECKPOINT_NAME).is_file():
            raise MtlvisionError(f"cannot resume {run_dir}: it holds no {CHECKPOINT_NAME}")
        cfg = read_config(run_dir)
    else:
        cfg = _config(config, overrides)
        run_dir = new_run_dir(out, name or cfg.data.name)
    tasks = build_tasks(cfg)
    cfg = _resolved(cfg, tasks)
    write_config(run_dir, cfg)
    console.print(f"Run folder: [bold]{run_dir}[/] — tasks: {', '.join(t.name for t in tasks)}")
    model = build_model(cfg, tasks)
    trainer = build_trainer(cfg, model, run_dir)
    train_data = build_split(cfg, tasks, "train", train=True)
    val_data = build_split(cfg, tasks, "val", train=False)
    fit = trainer.fit(train_data, val_data, resume=resume is not None)
    return _finish(run_dir, cfg, tasks, model, trainer, fit.best_epoch)


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
        run = train(expert_cfg, out=folder, name=task.name)
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
    model = build_model(run.config, tasks)
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
    return {"split": split, "metrics": result.metrics, **_delta_m_report(cfg, tasks, result.metrics, split, path)}


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


REGISTRY_KINDS = ("tasks", "balancers", "architectures", "backbones", "datasets")


def registry(kind: str) -> list[Any]:
    """The entries (name, description, citation) of one registry, for ``mtlvision list KIND``."""
    registries = _registries()
    if kind not in registries:
        raise MtlvisionError(f"unknown registry {kind!r}; choose one of {', '.join(REGISTRY_KINDS)}")
    return list(registries[kind])
