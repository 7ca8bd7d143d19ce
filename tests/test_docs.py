"""Every code block of the docs runs (#16.8): the ```python blocks of docs/*.md and README.md are executed in
order, one namespace and one empty working folder per file, and ```bash blocks preceded by ``<!-- run -->``
are run line by line as ``mtlvision`` commands in between (docs/data.md's tutorial: a generated folder,
``data check``, ``train``, ``predict``, ``export``, and an onnxruntime prediction equal to ``predict``'s).

A python block is skipped only when marked ``no-run`` (```` ```python no-run ```` or ``<!-- no-run -->`` on
the line before it), which is kept for examples that would train for long; :data:`NOT_RUN` lists them all,
so that a new one is a deliberate choice.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)

#: the python blocks left out (file, first line of code): full-size trainings that take minutes to hours
NOT_RUN = {
    ("README.md", "import mtlvision as mv"),
    ("docs/merging.md", "import mtlvision as mv"),
}


@dataclass
class Block:
    path: Path
    line: int
    language: str
    code: str
    run: bool

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
        if language == "python":
            run = "no-run" not in info and before != "<!-- no-run -->"
        else:
            run = language in {"bash", "sh", "console"} and before == "<!-- run -->"
        found.append(Block(path, text.count("\n", 0, match.start()) + 2, language, match.group(2), run))
    return found


def _runnable(path: Path) -> bool:
    return any(block.run for block in blocks(path))


def _command(line: str) -> list[str] | None:
    """The arguments of one ``mtlvision`` line of a run block (comments and blank lines: None)."""
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


def test_only_long_trainings_are_left_out() -> None:
    skipped = {
        (str(block.path.relative_to(ROOT)), block.code.strip().splitlines()[0])
        for path in DOCS
        for block in blocks(path)
        if block.language == "python" and not block.run
    }
    assert skipped == NOT_RUN


def test_the_python_section_and_the_tutorial_are_there() -> None:
    """docs/data.md documents the Python data API and the tutorial with code that runs."""
    data = [block for block in blocks(ROOT / "docs" / "data.md") if block.run]
    code = "\n".join(block.code for block in data)
    for needle in ("mv.split(", "mv.build_tasks(", "mv.Trainer(", "onnxruntime", "mtlvision export"):
        assert needle in code, needle


def test_a_bad_dataset_key_is_a_config_error_naming_it() -> None:
    import mtlvision as mv

    with pytest.raises(mv.ConfigError, match=r"data\.imag_size: unknown key") as error:
        mv.split("scenes", "train", {"data.imag_size": 32})
    assert "Allowed keys" in str(error.value) and "image_size" in str(error.value)
    with pytest.raises(mv.ConfigError, match=r"data\.tasks\.w\.kind: must be one of"):
        mv.build_tasks({"data": {"name": "folder", "root": ".", "tasks": {"w": {"kind": "clasify", "path": "a"}}}})
    with pytest.raises(mv.ConfigError, match="split 'training'"):
        mv.split("scenes", "training")
