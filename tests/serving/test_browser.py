"""The page in a real browser (#22.5): headless Chromium opens it, a file is chosen in its file input, and
every task's output is shown (bars, boxes, mask, depth and normals pictures), a task can be hidden, and the
latency is printed. A screenshot is saved (``MTLVISION_SCREENSHOT=PATH`` also writes it there, for the docs)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mtlvision import api

from .browser import CHROMIUM, Browser, live_server
from .conftest import KINDS

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium; .ci/run installs it as root)"
)
pytest.importorskip("websocket", reason="websocket-client (dev extra) drives the browser")

SHOWN = """JSON.stringify({
  rendered: [...document.querySelectorAll('[data-rendered]')].map(n => n.dataset.task),
  pictures: [...document.querySelectorAll('#results img')].map(i => i.complete && i.naturalWidth > 0),
  bars: document.querySelectorAll('[data-task=count] .bar').length,
  tags: document.querySelectorAll('[data-task=colors] .bar').length,
  fills: [...document.querySelectorAll('[data-task=count] .bar')].map(b => [
    b.querySelector('.fill').getBoundingClientRect().width / b.querySelector('.track').getBoundingClientRect().width,
    parseFloat(b.querySelector('.value').textContent)]),
  canvas: [...document.querySelectorAll('canvas[data-task=detection]')].map(c => [c.width, c.height]),
  status: document.getElementById('status').textContent,
})"""


def scene(path: Path) -> Path:
    """A validation image of the built-in scenes, enlarged so that the page shows it at a readable size."""
    sample = api.split("scenes", "val", {"data.image_size": 32, "data.val_size": 1})[0]
    array = (sample["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array).resize((160, 160), Image.Resampling.NEAREST).save(path)
    return path


def test_the_page_shows_every_task_after_an_upload(served_run, tmp_path) -> None:
    image = scene(tmp_path / "scene.png")
    with live_server(api.serve_app(served_run)) as url:
        browser = Browser(tmp_path / "profile")
        try:
            browser.send("Page.navigate", url=url + "/")
            browser.wait_for("document.body && document.body.dataset.state === 'ready'")
            toggles = browser.evaluate("[...document.querySelectorAll('[data-toggle]')].map(t => t.dataset.toggle)")
            assert toggles == list(KINDS)
            browser.upload("#file", image)
            state = browser.wait_for(
                "['done', 'error'].includes(document.body.dataset.state) && document.body.dataset.state"
            )
            shown = json.loads(browser.evaluate(SHOWN))
            assert state == "done", shown["status"]
            assert sorted(shown["rendered"]) == sorted(KINDS)
            assert shown["pictures"] and all(shown["pictures"])  # the input, mask, depth and normals pictures
            assert len(shown["pictures"]) == 4
            tasks = api.load_model(served_run)[0].tasks
            assert shown["bars"] == len(tasks["count"].class_names)
            assert shown["tags"] == len(tasks["colors"].label_names)
            for drawn, probability in shown["fills"]:  # each bar as long as its probability (shown to 2 places)
                assert drawn == pytest.approx(probability, abs=0.01)
            assert shown["canvas"] == [[160, 160]]  # boxes drawn over the input at its own size
            assert "ms" in shown["status"] and "batch of 1" in shown["status"]

            browser.evaluate("document.querySelector('[data-toggle=depth]').click()")
            hidden = "document.querySelector('section[data-task=depth]').classList.contains('hidden')"
            assert browser.evaluate(hidden) is True
            browser.evaluate("document.querySelector('[data-toggle=depth]').click()")
            assert browser.evaluate(hidden) is False

            browser.screenshot(tmp_path / "serve-page.png")
        finally:
            browser.close()
    with Image.open(tmp_path / "serve-page.png") as picture:
        assert picture.width >= 1000
    if os.environ.get("MTLVISION_SCREENSHOT"):
        Path(os.environ["MTLVISION_SCREENSHOT"]).write_bytes((tmp_path / "serve-page.png").read_bytes())
