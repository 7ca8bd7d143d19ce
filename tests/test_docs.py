"""Every code block of the docs runs: the ```python blocks of docs/**/*.md and README.md are executed in order,
one namespace and one empty working folder per file; every ``mtlvision ...`` line of a ```console, ```bash or
```sh block parses with the real command-line parser; and ```bash blocks preceded by ``<!-- run -->`` are run
line by line as ``mtlvision`` commands in between (docs/data.md's tutorial: a generated folder, ``data check``,
``train``, ``predict``, ``export``, and an onnxruntime prediction equal to ``predict``'s).

A python block is left out only when the line before it is ``<!-- docs-test: skip (REASON) -->`` with a
reason (a full-size training, torchrun, a real dataset); :data:`SKIPPED` lists them all, so that a new one is
a deliberate choice.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [*sorted((ROOT / "docs").rglob("*.md")), ROOT / "README.md"]
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
SKIP = re.compile(r"^<!-- docs-test: skip \((?P<reason>[^)]*)\) -->$")
SHELLS = {"bash", "sh", "console", "shell"}

#: the python blocks left out (file, first line of code)
SKIPPED = {
    ("docs/merging.md", "import mtlvision as mv"),
    ("docs/own-loop.md", "import torch.distributed as dist"),
    ("docs/export.md", "import mtlvision as mv"),
}


@dataclass
class Block:
    path: Path
    line: int
    language: str
    code: str
    run: bool
    skip_reason: str | None

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, with whether each is to run."""
    text = path.read_text()
    found = []
    for match in FENCE.finditer(text):
        info = match.group(1).split()
        language = info[0] if info else ""
        before = text[: match.start()].rstrip().rsplit("\n", 1)[-1].strip()
        skip = SKIP.match(before)
        reason = skip.group("reason").strip() if skip else None
        if language == "python":
            run = skip is None
        else:
            run = language in SHELLS and before == "<!-- run -->"
        found.append(Block(path, text.count("\n", 0, match.start()) + 2, language, match.group(2), run, reason))
    return found


def _runnable(path: Path) -> bool:
    return any(block.run for block in blocks(path))


def _words(line: str) -> list[str] | None:
    """The arguments of an ``mtlvision`` command line (``$ `` prompt allowed), else None."""
    stripped = line.strip()
    if stripped.startswith("$ "):
        stripped = stripped[2:].lstrip()
    if not stripped.startswith("mtlvision "):
        return None
    return shlex.split(stripped, comments=True)[1:]


def _command(line: str) -> list[str] | None:
    """The arguments of one line of a run block (comments and blank lines: None)."""
    words = shlex.split(line, comments=True)
    if not words:
        return None
    assert words[0] == "mtlvision", f"a run block holds mtlvision commands only, not {line!r}"
    return words[1:]


@pytest.mark.parametrize("path", [p for p in DOCS if _runnable(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_the_code_blocks_run(path: Path, tmp_path: Path, monkeypatch) -> None:
    from mtlvision.cli import main

    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__docs__"}
    for block in blocks(path):
        if not block.run:
            continue
        if block.language == "python":
            exec(compile(block.code, block.where, "exec"), namespace)
            continue
        for offset, line in enumerate(block.code.splitlines()):
            args = _command(line)
            if args is not None:
                assert main(args) == 0, f"{block.where}+{offset}: {line}"


def _logical_lines(code: str) -> list[tuple[int, str]]:
    """Shell lines with their ``\\`` continuations joined, each with the offset of its first line."""
    lines: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for offset, line in enumerate(code.splitlines()):
        start, text = pending if pending is not None else (offset, "")
        text += line
        if line.rstrip().endswith("\\"):
            pending = (start, text.rstrip()[:-1] + " ")
            continue
        pending = None
        lines.append((start, text))
    return lines


def _command_lines() -> list[tuple[str, list[str]]]:
    found = []
    for path in DOCS:
        for block in blocks(path):
            if block.language not in SHELLS:
                continue
            for offset, line in _logical_lines(block.code):
                words = _words(line)
                if words is not None:
                    found.append((f"{block.where}+{offset}: {line.strip()}", words))
    return found


def test_every_documented_command_parses() -> None:
    from mtlvision.cli import build_parser

    parser = build_parser()
    lines = _command_lines()
    assert len(lines) > 20  # the collector finds the README's and the docs' commands
    bad = []
    for where, words in lines:
        try:
            parser.parse_args(words)
        except SystemExit:
            bad.append(where)
    assert not bad, "commands the CLI does not accept:\n" + "\n".join(bad)


def test_only_blocks_that_cannot_run_are_skipped_and_each_says_why() -> None:
    skipped = {}
    for path in DOCS:
        for block in blocks(path):
            if block.language == "python" and not block.run:
                skipped[(str(block.path.relative_to(ROOT)), block.code.strip().splitlines()[0])] = block.skip_reason
    assert set(skipped) == SKIPPED
    assert all(skipped.values()), f"a skip marker without a reason: {skipped}"


def test_a_skip_marker_needs_a_reason() -> None:
    assert SKIP.match("<!-- docs-test: skip (needs a GPU) -->")
    assert not SKIP.match("<!-- docs-test: skip -->")
    assert SKIP.match("<!-- docs-test: skip () -->").group("reason") == ""


def test_the_python_section_and_the_tutorial_are_there() -> None:
    """docs/data.md documents the Python data API and the tutorial with code that runs."""
    data = [block for block in blocks(ROOT / "docs" / "data.md") if block.run]
    code = "\n".join(block.code for block in data)
    for needle in ("mv.split(", "mv.build_tasks(", "mv.Trainer(", "onnxruntime", "mtlvision export"):
        assert needle in code, needle


def test_every_balancer_is_in_the_balancers_page() -> None:
    from mtlvision.balancers import BALANCERS

    page = (ROOT / "docs" / "balancers-guide.md").read_text()
    missing = [entry.name for entry in BALANCERS if f"| `{entry.name}` |" not in page]
    assert not missing, f"docs/balancers-guide.md lacks {missing}"


def test_a_bad_dataset_key_is_a_config_error_naming_it() -> None:
    import mtlvision as mv

    with pytest.raises(mv.ConfigError, match=r"data\.imag_size: unknown key") as error:
        mv.split("scenes", "train", {"data.imag_size": 32})
    assert "Allowed keys" in str(error.value) and "image_size" in str(error.value)
    with pytest.raises(mv.ConfigError, match=r"data\.tasks\.w\.kind: must be one of"):
        mv.build_tasks({"data": {"name": "folder", "root": ".", "tasks": {"w": {"kind": "clasify", "path": "a"}}}})
    with pytest.raises(mv.ConfigError, match="split 'training'"):
        mv.split("scenes", "training")
