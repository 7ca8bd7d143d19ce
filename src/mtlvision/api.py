"""The Python API: the same jobs as the CLI, over the same objects.

Each verb turns its arguments into a validated :class:`~mtlvision.config.RunConfig` (a preset name or YAML
file with overrides, or a config object) and hands it to the engine, which owns the job.

Examples:
    >>> import mtlvision as mv
    >>> run = mv.train("scenes", overrides={"balancer.name": "pcgrad", "train.epochs": 5})
    >>> run.metrics["segmentation"]["miou"], run.metrics.get("delta_m")
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtlvision.config import RunConfig, apply_overrides, load_config, parse_override, validate
from mtlvision.errors import ConfigError, MtlvisionError

if TYPE_CHECKING:
    from fastapi import FastAPI
    from torch.utils.data import Dataset

    from mtlvision.data.check import DataReport
    from mtlvision.engine.affinity_run import AffinityResult
    from mtlvision.engine.catalog import CatalogEntry
    from mtlvision.engine.predict import Predictions
    from mtlvision.engine.runs import Run, RunReport
    from mtlvision.engine.tuning import TuneResult
    from mtlvision.evaluation.compare import Comparison
    from mtlvision.evaluation.published import PublishedComparison
    from mtlvision.export import ExportReport
    from mtlvision.models import MultiTaskModel
    from mtlvision.tasks import Task

ConfigSource = str | Path | RunConfig | Mapping[str, Any] | None
Overrides = Mapping[str, Any] | Sequence[str] | None


def config(source: ConfigSource = None, overrides: Overrides = None) -> RunConfig:
    """A validated configuration from a preset name or YAML file (default: the ``scenes`` preset), or a
    mapping with a YAML file's content, and overrides (a mapping of dotted keys, or ``KEY=VALUE`` strings);
    or a :class:`RunConfig` as it is. Every problem raises ConfigError naming the dotted key."""
    if isinstance(source, RunConfig):
        if overrides:
            raise MtlvisionError("overrides apply to a preset or YAML file, not to a RunConfig object")
        return source
    changes = dict(overrides) if isinstance(overrides, Mapping) else dict(map(parse_override, overrides or []))
    if isinstance(source, Mapping):
        return validate(apply_overrides(dict(source), changes))
    return load_config(source, changes)


def train(
    source: ConfigSource = None,
    overrides: Overrides = None,
    *,
    name: str | None = None,
    out: str | Path = "runs",
    resume: str | Path | None = None,
) -> Run:
    """Train a multi-task model (``mtlvision train``).

    With ``resume`` (a run folder), continue it from its checkpoint with its own config; ``overrides`` may then
    change only what :data:`mtlvision.run_settings.RESUME_KEYS` lists (``train.epochs`` to extend a run, ...),
    and a finished run is returned unchanged unless its epochs are extended.
    """
    from mtlvision.engine.job import TrainingRun

    if resume is not None:
        if source is not None:
            raise MtlvisionError("resume continues a run folder with its own config; give overrides, not a source")
        if overrides is not None and not isinstance(overrides, Mapping):
            overrides = list(overrides)
        return TrainingRun(resume=resume, overrides=overrides).execute()
    return TrainingRun(config(source, overrides), out=out, name=name).execute()


def baseline(
    source: ConfigSource = None,
    overrides: Overrides = None,
    *,
    out: str | Path = "runs",
    name: str | None = None,
    match: str | Path | None = None,
) -> Path:
    """Train one single-task expert per task (``mtlvision baseline``) and store their metrics for Δm.

    With ``match`` (a joint run folder) the experts get that run's configuration and budget per task (its
    epochs, batch size, data, model and seed; see :func:`~mtlvision.engine.job.matched_expert_config`), in
    ``out/baseline-<run>`` unless ``name`` says otherwise. Returns the path of ``baselines.json``; later runs on
    the same data find it and report Δm.
    """
    from mtlvision.engine.job import matched_expert_config, train_experts

    if match is None:
        return train_experts(config(source, overrides), out=out, name=name).path
    if source is not None:
        raise MtlvisionError(f"--match {match} takes the run's own configuration; give no config ({source})")
    changes = dict(overrides) if isinstance(overrides, Mapping) else dict(map(parse_override, overrides or []))
    name = name or f"baseline-{Path(match).name}"
    return train_experts(matched_expert_config(match, changes), out=out, name=name).path


def evaluate(run: str | Path | Run, split: str | None = None, baselines: str | Path | None = None) -> RunReport:
    """Evaluate a run's best weights on ``split`` (default: the run's eval split), with Δm when possible."""
    from mtlvision.engine.job import evaluate_run

    return evaluate_run(run, split, baselines)


def against_published(run: str | Path | Run, benchmark: str) -> PublishedComparison:
    """A run's recorded metrics (its metrics.json: under ``train.select=mean_last:N`` the mean of the last N
    epochs) beside the published rows of ``benchmark`` (``nyuv2_segnet_mtan``, ``nyuv2_resnet50``,
    ``cityscapes_segnet_mtan``), each with Δm against the published single-task row where the source has one, and
    the run's Δm against its own experts (``own_delta_m``) when it has them."""
    from mtlvision.engine.runs import Run
    from mtlvision.evaluation.published import compare_published

    loaded = run if isinstance(run, Run) else Run.load(run)
    report = loaded.evaluated
    comparison = compare_published(report.metrics, benchmark, label=f"this run ({loaded.path.name})")
    comparison.own_delta_m = None if report.delta_m is None else float(report.delta_m["overall"])
    return comparison


def load_model(run: str | Path | Run) -> tuple[MultiTaskModel, RunConfig]:
    """The trained model of a run folder (best weights, in eval mode) and its config."""
    from mtlvision.engine.build import load_model as load

    return load(run)


def predict(
    run: str | Path | Run, inputs: Iterable[str | Path], out: str | Path = "preds", *, skip_bad: bool = False
) -> Predictions:
    """Predict every task on images (files or folders): one JSON and one picture per image in ``out``, the
    outputs at each image's own size. With ``skip_bad`` unreadable files are skipped and listed in the
    result's ``skipped`` (file and reason); without it the first one stops the job, named."""
    from mtlvision.engine.predict import predict_images

    return predict_images(run, inputs, out, skip_bad=skip_bad)


def build_tasks(source: ConfigSource = None, overrides: Overrides = None) -> list[Task]:
    """The configured tasks as objects (those named in ``tasks``, else every task of the dataset), in order:
    what :class:`~mtlvision.models.MultiTaskModel` takes. A bad ``data.*`` key raises ConfigError naming it."""
    from mtlvision.engine.build import build_tasks as build

    return build(config(source, overrides))


def split(
    source: ConfigSource = None,
    name: str = "train",
    overrides: Overrides = None,
    *,
    tasks: Sequence[Task] | None = None,
    augment: bool | None = None,
) -> Dataset:
    """One split (``train``, ``val`` or ``test``) of the configured data, ready for :meth:`Trainer.fit
    <mtlvision.engine.trainer.Trainer.fit>`: samples restricted to the run's tasks (``tasks``, default
    :func:`build_tasks`), every label checked by its task as it is read, ``data.augment`` applied (random
    augmentation only where ``augment``, default: for ``train``). A bad ``data.*`` key raises ConfigError
    naming it, never a pydantic traceback.

    >>> train_data = mv.split("scenes", "train", {"data.train_size": 64})
    """
    from mtlvision.data.datasets.base import SPLITS
    from mtlvision.engine.build import build_split
    from mtlvision.engine.build import build_tasks as build

    if name not in SPLITS:
        raise ConfigError(f"split {name!r}: choose one of {', '.join(SPLITS)}")
    cfg = config(source, overrides)
    chosen = list(tasks) if tasks is not None else build(cfg)
    return build_split(cfg, chosen, name, train=(name == "train") if augment is None else augment)


def check_data(
    source: ConfigSource = None,
    overrides: Overrides = None,
    *,
    splits: Sequence[str] = ("train", "val", "test"),
    progress: bool = True,
) -> DataReport:
    """Read every sample of the configured data and report counts, label distributions and problems
    (``mtlvision data check``); ``report.errors`` is empty when nothing is wrong."""
    from mtlvision.engine.inputs import check_config_data

    return check_config_data(config(source, overrides), splits, progress=progress)


def merge(
    experts: Sequence[str | Path],
    out: str | Path | None = None,
    rule: str = "average",
    hparams: Overrides = None,
    *,
    data: ConfigSource = None,
    data_overrides: Overrides = None,
) -> Run:
    """One multi-task model from experts (``mtlvision merge``): heads carried over, shared part merged.

    ``experts`` are run folders (or a baselines folder standing for its experts); ``rule`` is a name of
    :data:`~mtlvision.engine.merge.MERGE_RULES` with ``hparams`` (a mapping or ``KEY=VALUE`` strings).
    A rule that reads samples (``fisher``, ``regmean``, ``adamerging``) reads the experts' own data, or
    ``data``: a preset name or YAML file (as :func:`train` takes, with ``data_overrides``), a mapping or a
    :class:`RunConfig`, whose ``data`` section is read; ``data`` for a rule that reads none is refused.
    The BatchNorm statistics are recomputed on the experts' training split; ``out`` (default: ``m-RULE``
    beside the experts' folder) becomes a normal run folder, evaluated like a trained run, that ``eval``,
    ``predict`` and ``train --set model.init=OUT`` accept (``wemoe`` upscales blocks into routed mixtures,
    recorded in ``OUT/wemoe.json``: loaders rebuild it, training refuses it). With ``rule="emr"`` (EMR-merging)
    each task keeps its own backbone, rebuilt from one start, a unified task vector, a mask and a rescaler:
    ``eval``, ``predict`` and ``compare`` accept it, export and ``model.init=OUT`` refuse it, and BatchNorm is
    recomputed per task.
    """
    from mtlvision.engine.merged_run import merge_experts

    if data is None and data_overrides:
        raise MtlvisionError("data_overrides apply to the data given with data=, and none was given")
    given = None if data is None else config(data, data_overrides)
    source = str(data) if isinstance(data, str | Path) else None
    return merge_experts(experts, out, rule, hparams, data=given, data_source=source)


def export(
    run: str | Path | Run,
    out: str | Path | None = None,
    *,
    opset: int | None = None,
    image_size: tuple[int, int] | None = None,
) -> ExportReport:
    """Export a run's model to ONNX (``mtlvision export``): ``RUN/model.onnx`` by default, with a JSON
    description beside it; checked against PyTorch with onnxruntime (see :mod:`mtlvision.export`)."""
    from mtlvision.engine.build import image_size as run_image_size
    from mtlvision.engine.build import load_model as load
    from mtlvision.engine.runs import Run
    from mtlvision.export import DEFAULT_OPSET, export_onnx

    run = run if isinstance(run, Run) else Run.load(run)
    model, cfg = load(run)
    size = image_size or run_image_size(cfg)
    if size is None:
        raise ConfigError(
            f"{run.path}: the run's data has images of varying size; give the export size (--image-size H W)"
        )
    return export_onnx(
        model, Path(out) if out else run.path / "model.onnx", (int(size[0]), int(size[1])), opset=opset or DEFAULT_OPSET
    )


def serve_app(run: str | Path | Run, **settings: Any) -> FastAPI:
    """The HTTP application of ``mtlvision serve`` for ``run``, without starting a server: for tests, or to
    mount in an application of your own. ``settings`` are those of
    :class:`~mtlvision.serving.settings.ServeSettings` (backend, device, max_batch, max_wait_ms, max_images,
    max_upload_bytes, max_pixels, onnx, threads). Needs the ``serve`` extra."""
    from mtlvision.serving.app import create_app
    from mtlvision.serving.settings import ServeSettings

    return create_app(run, ServeSettings(**settings))


def serve(run: str | Path | Run, *, host: str = "127.0.0.1", port: int = 8000, **settings: Any) -> None:
    """Serve ``run`` over HTTP until interrupted (``mtlvision serve``): ``POST /predict`` (every task's result
    for one or several images, batched with concurrent requests), ``GET /model``, ``GET /health`` and a page
    at ``/``. ``settings`` as for :func:`serve_app`. Needs the ``serve`` extra."""
    app = serve_app(run, **settings)
    try:
        import uvicorn
    except ImportError as exc:
        raise ConfigError(f"mtlvision serve needs the serve extra: pip install 'mtlvision[serve]' ({exc})") from None

    uvicorn.run(app, host=host, port=port, log_level="info")


def compare(
    runs: Sequence[str | Path],
    baselines: str | Path | None = None,
    *,
    batch_size: int = 8,
    repeats: int = 5,
    device: str = "cpu",
) -> Comparison:
    """The whole path from experts to one model (``mtlvision compare``): per task, the experts and every run,
    each metric, Δm against the experts, parameter count and inference time (median of ``repeats`` passes
    over the first ``batch_size`` images of the evaluation split) of each model vs the experts together.
    """
    from mtlvision.engine.comparing import compare_runs

    return compare_runs(runs, baselines, batch_size=batch_size, repeats=repeats, device=device)


def registry(kind: str) -> list[Any]:
    """The live entries (name, object, description, citation) of one registry (kinds in
    :data:`mtlvision.registry.REGISTRY_KINDS`); imports every module that registers something."""
    from mtlvision.engine.catalog import registry as entries

    return entries(kind)


def catalog(kind: str) -> list[CatalogEntry]:
    """The entries (name, description, citation) of one registry as ``mtlvision list KIND`` shows them, from
    the catalog shipped with the package: fast, without importing torch."""
    from mtlvision.engine.catalog import catalog as entries

    return entries(kind)


def registry_note(kind: str) -> str | None:
    """What the list of ``kind`` leaves out (backbones: any timm or torchvision model), or None."""
    from mtlvision.engine.catalog import registry_note as note

    return note(kind)


def architecture_sizes(source: ConfigSource = None, overrides: Overrides = None) -> tuple[dict[str, Any], str]:
    """Parameters and MACs (whole model and shared part) of every architecture for one configuration (default:
    scenes with count and segmentation), and a line saying what that setting is."""
    from mtlvision.engine.catalog import architecture_sizes as sizes
    from mtlvision.engine.catalog import architecture_sizes_setting

    cfg = config(source, overrides) if source is not None else None
    return sizes(cfg), architecture_sizes_setting(cfg)


def affinity(
    source: ConfigSource = None,
    overrides: Overrides = None,
    *,
    every: int | None = None,
    groups: int = 2,
    validate: bool = False,
    out: str | Path = "runs",
    name: str | None = None,
) -> AffinityResult:
    """Which tasks help which (``mtlvision affinity``): TAG's inter-task affinity (Fifty et al., NeurIPS 2021)
    measured every ``every`` steps (default 20) inside one joint run of the configuration, the best split into
    at most ``groups`` networks, and with ``validate`` each group and all tasks together trained, with Δm
    against the experts. Returns the matrix, the task names, the grouping and the run."""
    from mtlvision.engine.affinity_run import DEFAULT_EVERY, task_affinity

    every = DEFAULT_EVERY if every is None else every
    return task_affinity(config(source, overrides), every=every, groups=groups, validate=validate, out=out, name=name)


def tune(
    source: ConfigSource = None,
    overrides: Overrides = None,
    *,
    space: str | Path | Mapping[str, Any] | None = None,
    trials: int = 20,
    timeout: float | None = None,
    objective: str = "delta_m",
    storage: str | None = None,
    study: str | None = None,
    out: str | Path = "runs",
    seed: int = 0,
    baselines: str | Path | None = None,
) -> TuneResult:
    """Search hyper-parameters with Optuna (``mtlvision tune``); each trial is a normal run folder.

    ``space`` is a search-space YAML, a mapping of the same content, or None for the default space (see
    :mod:`mtlvision.engine.search_space`); ``objective`` is ``delta_m``, ``pareto`` or ``TASK.METRIC``, always
    on the validation split; the study lives in ``out/study`` (default ``tune-<dataset>``) with its SQLite
    storage unless ``storage`` (any Optuna URL, or ``journal:PATH``) is given, and continues where it stopped
    when run again. Returns the best params and values, every trial, importances and ``best.yaml``.
    """
    from mtlvision.engine.search_space import SearchSpace
    from mtlvision.engine.tuning import TuningStudy

    searched = (
        SearchSpace.from_mapping(space, "the search space given")
        if isinstance(space, Mapping)
        else SearchSpace.load(space)
    )
    job = TuningStudy(
        config(source, overrides),
        searched,
        trials=trials,
        objective=objective,
        out=out,
        study=study,
        storage=storage,
        timeout=timeout,
        seed=seed,
        baselines=baselines,
    )
    return job.run()
