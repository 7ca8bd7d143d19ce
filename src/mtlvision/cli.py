"""The ``mtlvision`` command line: one verb per job, ``--set KEY=VALUE`` overrides, run folders."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from mtlvision import cli_affinity
from mtlvision._version import __version__
from mtlvision.cli_serve import add_parser as add_serve_parser
from mtlvision.errors import MtlvisionError
from mtlvision.registry import REGISTRY_KINDS

if TYPE_CHECKING:
    from mtlvision.engine.logging import EpochSummary
    from mtlvision.engine.runs import RunReport

console = Console()
err_console = Console(stderr=True)


class _ConsoleHandler(logging.Handler):
    """Library messages (``logging`` under ``mtlvision``) on the terminal: plain lines, warnings in yellow."""

    def emit(self, record: logging.LogRecord) -> None:
        summary = getattr(record, "epoch_summary", None)
        if summary is not None:  # a training run's epoch end: drawn as a table
            console.print(_epoch_table(summary))
            return
        style = "yellow" if record.levelno >= logging.WARNING else None
        err_console.print(self.format(record), style=style, markup=False, highlight=False, soft_wrap=True)


def _epoch_table(summary: EpochSummary) -> Table:
    """The epoch-end table: this epoch's validation metrics per task beside the best epoch's, Δm when known."""
    title = f"epoch {summary.epoch}/{summary.epochs}: train loss {summary.train_loss:.4f}"
    if summary.val_loss is not None:
        title += f", val loss {summary.val_loss:.4f}"
    title += " — best so far" if summary.is_best else f" — best: epoch {summary.best_epoch}"
    table = Table(title=title, title_justify="left")
    for column in ("task", "metric", f"epoch {summary.epoch}", f"best (epoch {summary.best_epoch})"):
        table.add_column(column, justify="right" if column[0] in "eb" else "left")
    for task, values in summary.metrics.items():
        for metric, value in values.items():
            best = summary.best_metrics.get(task, {}).get(metric)
            table.add_row(task, metric, f"{value:.4f}", "" if best is None else f"{best:.4f}")
    if summary.delta_m is not None:
        best_delta = "" if summary.best_delta_m is None else f"{summary.best_delta_m:+.2f}%"
        table.add_row("Δm (val)", "lower is better", f"{summary.delta_m:+.2f}%", best_delta)
    return table


def _show_library_messages() -> None:
    logger = logging.getLogger("mtlvision")
    if not any(isinstance(h, _ConsoleHandler) for h in logger.handlers):
        logger.addHandler(_ConsoleHandler())
    logger.setLevel(logging.INFO)


def _metrics_table(title: str, metrics: dict[str, dict[str, float]], delta: dict | None = None) -> Table:
    table = Table(title=title)
    table.add_column("task")
    table.add_column("metric")
    table.add_column("value", justify="right")
    if delta is not None:
        table.add_column("Δm term %", justify="right")
    for task, values in metrics.items():
        for metric, value in values.items():
            row = [task, metric, f"{value:.4f}"]
            if delta is not None:  # per-class details (detection's ap_50/<class>) are not Δm terms
                term = delta["per_metric"].get(task, {}).get(metric)
                row.append("" if term is None else f"{term:+.2f}")
            table.add_row(*row)
    return table


def _print_report(report: RunReport) -> None:
    delta = report.delta_m
    console.print(_metrics_table(f"metrics on the {report.split} split", report.metrics, delta))
    if delta is not None:
        per_task = ", ".join(f"{t} {v:+.2f}%" for t, v in delta["per_task"].items())
        console.print(f"Δm = [bold]{delta['overall']:+.2f}%[/] (lower is better; per task: {per_task})")
        console.print(f"  against single-task experts in {delta['baselines']}")
        _print_compute(delta.get("compute"))
        if report.delta_m_warning:
            console.print(f"[yellow]warning:[/] {report.delta_m_warning}", highlight=False)
    elif report.delta_m_note:
        console.print(f"Δm not reported: {report.delta_m_note}")
    if report.model:
        counts = report.model["parameters"]
        console.print(
            f"parameters: {counts['total'] / 1e6:.2f}M, of which trained {counts['trainable'] / 1e6:.2f}M "
            f"({100 * counts['trainable'] / max(counts['total'], 1):.1f}%)"
        )
    if report.skipped_samples is not None:
        total = sum(report.skipped_samples.values())
        counts = ", ".join(f"{split} {count}" for split, count in report.skipped_samples.items())
        console.print(
            f"[{'yellow' if total else 'green'}]data.skip_bad: {total} unreadable or invalid sample(s) skipped[/] "
            f"({counts}); `mtlvision data check` lists them."
        )


def _print_compute(compute: dict | None) -> None:
    """The budget behind each side of a Δm: the run's and each expert's."""
    from mtlvision.engine.runs import compute_text

    if not compute:
        return
    console.print(f"  compute: this run {compute_text(compute.get('run'))}", highlight=False)
    for task, expert in (compute.get("experts") or {}).items():
        console.print(f"           expert {task} {compute_text(expert)}", highlight=False)


def cmd_train(args: argparse.Namespace) -> int:
    from mtlvision import api

    if args.resume and args.config is not None:
        raise MtlvisionError(
            f"--resume continues {args.resume} with its own config.yaml; give no config ({args.config}), only --set "
            "for what may change on resume"
        )
    run = api.train(args.config, args.set or [], name=args.name, out=args.out, resume=args.resume)
    _print_report(run.evaluated)
    console.print(f"Run saved in [bold]{run.path}[/]")
    return 0


def cmd_baseline(args: argparse.Namespace) -> int:
    from mtlvision import api
    from mtlvision.engine.runs import Baselines

    path = api.baseline(args.config, args.set or [], out=args.out, name=args.name, match=args.match)
    for task, expert in Baselines.load(path).experts.items():
        split = next(k for k in expert.metrics if k != "val") if len(expert.metrics) > 1 else "val"
        console.print(_metrics_table(f"expert {task} ({split})", {task: expert.metrics[split]}))
    console.print(f"Baselines saved in [bold]{path}[/]")
    return 0


#: the benchmarks of mtlvision.evaluation.published (listed here so that parsing imports no torch; a test checks)
AGAINST = ["nyuv2_segnet_mtan", "nyuv2_resnet50", "cityscapes_segnet_mtan"]


def cmd_eval(args: argparse.Namespace) -> int:
    from mtlvision import api

    report = api.evaluate(args.run, split=args.split, baselines=args.baselines)
    _print_report(report)
    if args.against:
        from mtlvision.cli_against import print_against

        console.print(f"\nBeside {args.against}'s published rows, the metrics the run recorded (its metrics.json):")
        print_against(console, api.against_published(args.run, args.against))
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from mtlvision import api

    results = api.predict(args.run, args.inputs, out=args.out, skip_bad=args.skip_bad)
    console.print(f"Predicted {len(results)} image(s); JSON and pictures in [bold]{args.out}[/]")
    if results.skipped:
        console.print(f"[yellow]Skipped {len(results.skipped)} unreadable image(s)[/], each named above with why.")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from mtlvision import api

    report = api.export(args.run, args.out, opset=args.opset, image_size=tuple(args.image_size or ()) or None)
    console.print(
        f"Exported [bold]{report.onnx}[/] (opset {report.opset}, input 'image' \\[batch, C, "
        f"{report.image_size[0]}, {report.image_size[1]}]); outputs: {', '.join(report.outputs)}"
    )
    console.print(
        f"onnxruntime matches PyTorch within {report.max_abs_difference:.2g} (largest absolute difference); "
        f"description in [bold]{report.description}[/]"
    )
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from mtlvision import api

    run = api.merge(
        args.experts, args.out, rule=args.rule, hparams=args.set or [], data=args.data, data_overrides=args.data_set
    )
    merge = run.evaluated.merge or {}
    console.print(
        f"Merged {len(merge['experts'])} expert(s) with [bold]{merge['rule']}[/] {merge['hparams'] or ''}: "
        f"{merge['merged_tensors']} shared tensors combined in {merge['merge_seconds']:.1f}s, heads carried over; "
        f"BatchNorm {merge['batch_norm']}; experts' start: {merge['base']}"
    )
    if upscaled := (merge.get("learned") or {}).get("upscaled_blocks"):
        console.print(f"{len(upscaled)} blocks upscaled into routed mixtures of the task vectors (wemoe.json)")
    _print_report(run.evaluated)
    console.print(f"Merged run saved in [bold]{run.path}[/]")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from mtlvision import api

    comparison = api.compare(
        args.runs, baselines=args.baselines, batch_size=args.batch_size, repeats=args.repeats, device=args.device
    )
    for table in comparison.tables():
        console.print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    comparison.plot(out / "compare.png")
    (out / "compare.md").write_text(comparison.markdown())
    (out / "compare.json").write_text(json.dumps(comparison.to_dict(), indent=2) + "\n")
    console.print(f"Plot, Markdown and JSON in [bold]{out}[/] (compare.png, compare.md, compare.json)")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from mtlvision import api

    table = Table(title=args.kind)
    sizes, setting = api.architecture_sizes(args.config, args.set or []) if args.kind == "architectures" else ({}, "")
    columns = ["name", "description", "reference"]
    if sizes:
        columns += ["parameters (shared)", "MACs (shared)"]
    for column in columns:
        table.add_column(column)
    for entry in api.catalog(args.kind):
        row = [entry.name, entry.description, entry.citation]
        size = sizes.get(entry.name)
        if sizes and size is None:
            row += ["n/a (this setting)", ""]
        elif size is not None:
            on = f" on {size['backbone']}" if "backbone" in size else ""  # an architecture bound to its backbone
            row += [
                f"{size['parameters']['total'] / 1e6:.1f}M ({size['parameters']['shared'] / 1e6:.1f}M){on}",
                f"{size['macs']['total'] / 1e9:.2f}G ({size['macs']['shared'] / 1e9:.2f}G){on}",
            ]
        table.add_row(*row)
    console.print(table)
    note = api.registry_note(args.kind)
    if note:
        console.print(note)
    if sizes:
        console.print(f"Sizes for {setting}.")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from mtlvision import api

    report = api.check_data(args.config, args.set or [], splits=args.splits)
    console.print(report.table())
    if report.errors:
        err_console.print(
            f"[red]{report.error_count} error(s) found[/] in the data; fix or remove those samples, "
            "or train with data.skip_bad=true to skip them."
        )
        return 1
    return 0


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", default=None, help="a preset name (default: scenes) or a YAML file")
    parser.add_argument(
        "--set", nargs="+", metavar="KEY=VALUE", help="override config keys; values parse as YAML", action="extend"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtlvision", description="Multi-task learning for computer vision.")
    parser.add_argument("--version", action="version", version=f"mtlvision {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    train = verbs.add_parser("train", help="train a multi-task model")
    _add_config_arguments(train)
    train.add_argument("--name", help="run folder name (default: the dataset's name)")
    train.add_argument("--out", default="runs", help="parent folder of run folders (default: runs)")
    train.add_argument(
        "--resume",
        metavar="RUN",
        help="continue a run folder from its last checkpoint; --set may change train.epochs (to extend it) and "
        "how it runs (train.early_stopping, checkpoint_every, keep_checkpoint, progress, device, max_nonfinite, "
        "data.num_workers)",
    )
    train.set_defaults(handler=cmd_train)

    base = verbs.add_parser("baseline", help="train one single-task expert per task, for Δm")
    _add_config_arguments(base)
    base.add_argument("--name", help="folder name (default: baseline-<dataset>)")
    base.add_argument("--out", default="runs")
    base.add_argument(
        "--match",
        metavar="RUN",
        help="train the experts on the budget per task of this joint run (its config: epochs, batch size, data, "
        "model, seed); default folder baseline-<RUN>",
    )
    base.set_defaults(handler=cmd_baseline)

    ev = verbs.add_parser("eval", help="per-task metrics of a run, and Δm when baselines exist")
    ev.add_argument("run", help="a run folder")
    ev.add_argument("--split", choices=["train", "val", "test"], help="default: the run's train.eval_split")
    ev.add_argument("--baselines", help="a baselines.json (default: <runs>/baseline-<dataset>/baselines.json)")
    ev.add_argument("--json", help="also write the report to this file")
    ev.add_argument(
        "--against",
        choices=AGAINST,
        help="print the run's recorded metrics beside this benchmark's published rows, with Δm against them",
    )
    ev.set_defaults(handler=cmd_eval)

    pr = verbs.add_parser("predict", help="predict every task on images; JSON and a picture per image")
    pr.add_argument("run", help="a run folder")
    pr.add_argument("inputs", nargs="+", help="image files or folders")
    pr.add_argument("--out", default="preds")
    pr.add_argument("--skip-bad", action="store_true", help="skip unreadable images (listed at the end)")
    pr.set_defaults(handler=cmd_predict)

    ex = verbs.add_parser("export", help="export a run's model to ONNX, checked with onnxruntime")
    ex.add_argument("run", help="a run folder")
    ex.add_argument("--out", help="the .onnx file to write (default: RUN/model.onnx)")
    ex.add_argument("--opset", type=int, help="ONNX opset (default 18)")
    ex.add_argument(
        "--image-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="input size (default: the run's; needed for data of varying size)",
    )
    ex.set_defaults(handler=cmd_export)

    mg = verbs.add_parser("merge", help="one multi-task model from single-task experts (heads kept, backbone merged)")
    mg.add_argument("experts", nargs="+", help="expert run folders, or a baseline folder standing for its experts")
    mg.add_argument("--out", help="the merged run folder to create (default: m-RULE beside the experts' folder)")
    mg.add_argument(
        "--rule",
        default="average",
        help="merging rule (default: average; `mtlvision list merges`); emr keeps one backbone per task "
        "(T forwards, no ONNX export)",
    )
    mg.add_argument(
        "--set",
        nargs="+",
        metavar="KEY=VALUE",
        action="extend",
        help="the rule's hyper-parameters, e.g. scale=0.5 (task_arithmetic), density=0.2 (ties), alpha=1.2 "
        "(iso_c), samples=64 (fisher, regmean: training samples each expert's statistics are gathered on), "
        "granularity=task steps=100 regression=expert (adamerging), hidden_layers=1 steps=200 lr=1e-3 (wemoe)",
    )
    mg.add_argument(
        "--data",
        metavar="PRESET_OR_YAML",
        help="the data whose samples fisher, regmean and adamerging read (default: the experts' own data)",
    )
    mg.add_argument("--data-set", nargs="+", metavar="KEY=VALUE", action="extend", help="overrides for --data")
    mg.set_defaults(handler=cmd_merge)

    cp = verbs.add_parser("compare", help="experts vs merged, joint and distilled runs: metrics, Δm, size, speed")
    cp.add_argument("runs", nargs="+", help="run folders (a baselines folder among them names the experts)")
    cp.add_argument("--baselines", help="a baselines.json or its folder (default: the first run's)")
    cp.add_argument("--out", default="compare", help="folder for compare.png, compare.md, compare.json")
    cp.add_argument("--batch-size", type=int, default=8, help="images per timed batch (default: 8)")
    cp.add_argument("--repeats", type=int, default=5, help="timed passes; the median is reported (default: 5)")
    cp.add_argument("--device", default="cpu", help="device for the timing (default: cpu)")
    cp.set_defaults(handler=cmd_compare)

    ls = verbs.add_parser("list", help="list what can be chosen")
    ls.add_argument("kind", choices=REGISTRY_KINDS)
    ls.add_argument(
        "--config", help="with architectures: report sizes for this preset or YAML (its backbone, tasks, image size)"
    )
    ls.add_argument("--set", nargs="+", metavar="KEY=VALUE", action="extend", help="overrides for --config")
    ls.set_defaults(handler=cmd_list)

    add_serve_parser(verbs)
    cli_affinity.add_parser(verbs, _add_config_arguments)

    data = verbs.add_parser("data", help="data tools")
    data_verbs = data.add_subparsers(dest="data_verb", required=True, metavar="VERB")
    check = data_verbs.add_parser("check", help="read every sample and report problems (exit 1 if any)")
    _add_config_arguments(check)
    check.add_argument("--splits", nargs="+", default=["train", "val", "test"])
    check.set_defaults(handler=cmd_data_check)

    from mtlvision.cli_tune import add_parser as add_tune

    add_tune(verbs, _add_config_arguments)
    return parser


def _message(exc: MtlvisionError) -> str:
    """The error's own paragraph (one re-raised from a DataLoader worker process carries its traceback)."""
    text = str(exc)
    marker = f"{type(exc).__module__}.{type(exc).__qualname__}: "
    if "Original Traceback" in text and marker in text:
        return text.rsplit(marker, 1)[-1].strip()
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: user errors print one paragraph and exit 2, without a traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    _show_library_messages()
    try:
        return handler(args)
    except MtlvisionError as exc:
        err_console.print(f"[bold red]error:[/] {_message(exc)}", highlight=False, soft_wrap=True, markup=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
