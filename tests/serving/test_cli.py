"""``mtlvision serve`` on the command line: its options reach the service, a bad run or option is one error
line (exit 2), the other verbs never import the serving stack, and a missing extra is named."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mtlvision import api
from mtlvision.cli import main
from mtlvision.errors import ConfigError


def test_the_options_reach_the_service(monkeypatch, served_run) -> None:
    seen = {}
    monkeypatch.setattr(api, "serve", lambda run, **kwargs: seen.update(run=run, **kwargs))
    argv = ["serve", str(served_run), "--port", "9001", "--backend", "onnx", "--max-batch", "4", "--max-wait-ms", "2"]
    assert main([*argv, "--max-upload-mb", "1.5", "--max-images", "2", "--max-pixels", "1000"]) == 0
    assert seen == {
        "run": str(served_run),
        "host": "127.0.0.1",
        "port": 9001,
        "backend": "onnx",
        "device": "cpu",
        "max_batch": 4,
        "max_wait_ms": 2.0,
        "max_images": 2,
        "max_upload_bytes": int(1.5 * 1024 * 1024),
        "max_pixels": 1000,
        "onnx": None,
        "threads": None,
    }


def test_a_bad_run_or_option_is_one_error_before_serving(served_run, tmp_path, capsys) -> None:
    assert main(["serve", str(tmp_path / "nowhere")]) == 2
    assert main(["serve", str(served_run), "--max-batch", "0"]) == 2
    assert "max_batch must be a positive integer" in capsys.readouterr().err


def test_other_verbs_do_not_import_the_serving_stack() -> None:
    probe = (
        "from mtlvision.cli import main\ntry:\n    main(['serve', '--help'])\nexcept SystemExit:\n    pass\n"
        "import sys, json\nprint(json.dumps([m for m in ('fastapi', 'uvicorn', 'torch') if m in sys.modules]))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=300)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_a_missing_extra_is_named(monkeypatch, served_run) -> None:
    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi raises ImportError
    monkeypatch.delitem(sys.modules, "mtlvision.serving.app", raising=False)
    with pytest.raises(ConfigError, match=r"mtlvision\[serve\]"):
        api.serve_app(served_run)
