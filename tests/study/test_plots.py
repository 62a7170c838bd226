"""The report's plots as users read them: no empty panels, Pareto labels apart, overlay tiles large."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from PIL import Image
from test_report import make_bench, make_run

from clipseg_bench.study import plots
from clipseg_bench.study.report import write_report
from clipseg_bench.study.results import Run, read_bench


def _run(history: pd.DataFrame, strategy: str = "full") -> Run:
    return Run(Path("."), Path("."), strategy, 0, "finished", {}, {}, None, history)


def _history(epochs: int, val: bool) -> pd.DataFrame:
    ep = np.arange(1, epochs + 1)
    return pd.DataFrame(
        {
            "epoch": ep,
            "loss": 1.0 / ep,
            "train_dice": 0.5 + 0.01 * ep,
            "val_dice": 0.4 + ep if val else np.nan,
        }
    )


def test_curve_panels_leave_out_what_has_nothing_to_draw(tmp_path):
    """No val Dice recorded (val_every 0): no val panel; one epoch only: no curves plot at all."""
    runs = [_run(_history(3, val=False)), _run(_history(3, val=False), "decoder")]
    assert [c for c, _ in plots.curve_panels(runs)] == ["loss", "train_dice"]
    assert plots.plot_curves(runs, tmp_path / "c.png") is not None
    with Image.open(tmp_path / "c.png") as im:
        assert im.size[0] < 10 * plots.DPI  # two panels wide, not three
    assert [c for c, _ in plots.curve_panels([_run(_history(3, val=True))])] == [
        "loss",
        "train_dice",
        "val_dice",
    ]
    assert plots.plot_curves([_run(_history(1, val=True))], tmp_path / "one.png") is None
    assert not (tmp_path / "one.png").exists()


def test_report_leaves_out_the_curves_section_when_there_is_nothing_to_draw(tmp_path):
    bench = tmp_path / "B"
    for s in ("zeroshot", "full"):
        make_run(bench, s, 0, epochs=1)
    page = write_report([bench]).read_text()
    assert "Training curves" not in page and "No data for this plot" not in page
    assert "Qualitative overlays" in page and not (bench / "plots" / "curves.png").exists()


def _boxes(fig: Figure, artists) -> list:
    renderer = fig.canvas.get_renderer()
    return [a.get_window_extent(renderer) for a in artists]


@pytest.mark.parametrize("spread", [0.0, 0.05, 0.3])
def test_pareto_labels_never_overlap_each_other_or_markers(spread):
    """Six strategies piled up (as in the quick demo: same Dice, times 0.05 s apart): disjoint labels."""
    names = ["zeroshot", "full", "decoder", "adapter", "lora", "bitfit"]
    x = np.array([0.0, 2.03, 1.74, 1.97, 3.8, 2.06]) * (spread if spread else 1.0)
    x[0] = 0.0
    y = np.array([0.0185, 0.0189, 0.01575, 0.01575, 0.01575, 0.01576])
    radii = np.array([3.0, 18.0, 9.0, 9.0, 9.0, 9.0])
    fig = Figure(figsize=(7.5, 5))
    ax = fig.subplots()
    ax.scatter(x, y, s=(2 * radii) ** 2)
    ax.margins(x=0.12, y=0.12)
    texts = plots.place_labels(ax, x, y, names, radii=radii)
    assert [t.get_text() for t in texts] == names
    boxes = _boxes(fig, texts)
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b), (a, b)
    frame = ax.get_window_extent(fig.canvas.get_renderer())
    px = fig.dpi / 72
    centers = ax.transData.transform(np.column_stack([x, y]))
    for box, ((cx, cy), r) in itertools.product(boxes, zip(centers, radii)):
        assert not (
            box.x0 < cx + r * px and cx - r * px < box.x1 and box.y0 < cy + r * px and cy - r * px < box.y1
        )
    assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1 for b in boxes)


def test_overlay_tiles_are_large_and_cropped(tmp_path):
    """Four slices across: each tile about 300 px wide at the report's DPI; strategies as rows."""
    bench = make_bench(tmp_path / "B", strategies=("zeroshot", "full", "decoder"), seeds=(0,))
    path = plots.plot_overlays(read_bench([bench]), tmp_path / "o.png", max_slices=3)
    with Image.open(path) as im:
        width, height = im.size
    assert width / 3 >= 250  # three slices (columns)
    assert height > width  # CT, ground truth and three strategies as rows
    box = plots.body_box(np.pad(np.full((10, 12), 200, np.uint8), 20), margin=2)
    assert box == (slice(18, 32), slice(18, 34))
