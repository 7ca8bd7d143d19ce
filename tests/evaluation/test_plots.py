"""The run folder's plots (#16.12): one point per epoch, so whole-number epoch ticks and a marker on each."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest

from mtlvision.evaluation.plots import _plot, plot_history


def _history(epochs: int) -> list[dict[str, float]]:
    return [
        {"epoch": e, "train_loss/seg": 1.0 / e, "val_loss/seg": 1.2 / e, "weight/seg": 1.0, "val/seg/miou": 0.1 * e}
        for e in range(1, epochs + 1)
    ]


@pytest.mark.parametrize("epochs", [1, 3, 7, 45])
def test_epoch_ticks_are_whole_numbers_and_every_point_is_marked(epochs) -> None:
    fig, ax = plt.subplots()
    _plot(ax, {"miou": [(row["epoch"], row["val/seg/miou"]) for row in _history(epochs)]}, "t")
    fig.canvas.draw()
    low, high = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if low <= t <= high]
    plt.close(fig)
    assert ticks and all(float(t).is_integer() for t in ticks)
    assert 1 in ticks or epochs > 20
    if epochs <= 20:
        assert ticks == list(range(1, epochs + 1))
    (line,) = ax.get_lines()
    assert line.get_marker() == "o" and len(line.get_xdata()) == epochs


def test_plot_history_writes_every_plot(tmp_path) -> None:
    written = plot_history(_history(3), tmp_path)
    assert {p.name for p in written} == {"losses.png", "weights.png", "metrics_seg.png"}
    assert all(p.is_file() for p in written)
