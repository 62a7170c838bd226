"""The report's PNG plots: cost vs quality (with the Pareto front), per-organ bars, training curves,
the time breakdown and a grid of qualitative overlays.

Each ``plot_*`` function takes tables from :mod:`clipseg_bench.study.results`, writes one PNG and
returns its path (or None when there is nothing to draw). Figures are built with the object API on
matplotlib's Agg canvas, never through pyplot, so no GUI backend or global figure state is touched.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from clipseg_bench.errors import InputError
from clipseg_bench.organs import ORGANS
from clipseg_bench.provenance import replacing
from clipseg_bench.study.results import (
    ALL_CASES,
    BREAKDOWN_ORDER,
    VARIANT_PREFIX,
    Run,
    strategy_order,
)

DPI = 110
# One fixed colour per FLARE22 organ (index = id - 1), from Trubetskoy's 20 distinct colours.
ORGAN_COLORS = (
    "#e6194b",  # liver: red
    "#ffe119",  # right kidney: yellow
    "#911eb4",  # spleen: purple
    "#f58231",  # pancreas: orange
    "#f032e6",  # aorta: magenta
    "#4363d8",  # inferior vena cava: blue
    "#3cb44b",  # right adrenal gland: green
    "#bfef45",  # left adrenal gland: lime
    "#469990",  # gallbladder: teal
    "#fabed4",  # esophagus: pink
    "#42d4f4",  # stomach: cyan
    "#9a6324",  # duodenum: brown
    "#aaffc3",  # left kidney: mint
)
_EXTRA_COLORS = ("#8c564b", "#e377c2", "#bcbd22", "#17becf", "#393b79", "#637939")
_PART_COLORS = dict(zip(BREAKDOWN_ORDER, ("#bab0ac", "#4e79a7", "#e15759", "#f28e2b", "#59a14f")))


def strategy_color(name: str, names: list[str]) -> str:
    """A strategy's own colour (its file's ``color``); others get the next free colour in report order."""
    from clipseg_bench.strategies import color

    if color(name) is not None:
        return color(name)
    extra = [n for n in strategy_order(names) if color(n) is None]
    return _EXTRA_COLORS[extra.index(name) % len(_EXTRA_COLORS)]


def time_unit(max_seconds: float) -> tuple[float, str]:
    """(divisor, unit) that keeps a time axis readable: s below 5 min, min below 3 h, else h."""
    if not math.isfinite(max_seconds) or max_seconds < 300:
        return 1.0, "s"
    return (60.0, "min") if max_seconds < 3 * 3600 else (3600.0, "h")


def pareto_front(cost: np.ndarray, quality: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats: not cheaper-or-equal AND better-or-equal (one strictly).

    Args:
        cost: (N,) lower is better (training time).
        quality: (N,) higher is better (val Dice). NaN points are never on the front.

    Returns:
        Indices of the front, sorted by cost.
    """
    cost, quality = np.asarray(cost, float), np.asarray(quality, float)
    ok = np.isfinite(cost) & np.isfinite(quality)
    front = []
    for i in np.flatnonzero(ok):
        dominated = (
            ok & (cost <= cost[i]) & (quality >= quality[i]) & ((cost < cost[i]) | (quality > quality[i]))
        )
        if not dominated.any():
            front.append(i)
    return np.array(sorted(front, key=lambda i: (cost[i], -quality[i])), dtype=int)


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=DPI, bbox_inches="tight")
    return path


def _marker_area(params: np.ndarray, pmax: float) -> np.ndarray:
    # Trainable counts span ~1e4 to ~1e8: area ~ sqrt(params) (diameter ~ params**0.25) keeps the
    # smallest strategy visible and still shows a 1000x difference as a clear size gap.
    return 20 + 900 * np.sqrt(np.nan_to_num(params) / max(pmax, 1.0))


def cost_axis(summary: pd.DataFrame) -> tuple[str, str]:
    """The cost the Pareto plot shows, as (results column, axis words): the training's process CPU
    time when every strategy's runs recorded it (on a shared machine wall time also counts the
    waits for a core), else the wall time. One-off costs (feature cache, sweep) are not in either."""
    cpu = summary.get("train_cpu_s_mean")
    if cpu is not None and np.isfinite(cpu.to_numpy(float)).all():
        return "train_cpu_s", "training CPU time of the process, one-off costs excluded"
    return "train_time_s", "training wall time, one-off costs excluded"


def plot_pareto(summary: pd.DataFrame, table: pd.DataFrame, path: Path) -> Path | None:
    """Val Dice against training time per strategy (mean ± std), seeds as dots, Pareto front drawn.

    Args:
        summary: :func:`~clipseg_bench.study.results.summary_table` output.
        table: :func:`~clipseg_bench.study.results.runs_table` output (for the per-seed dots).
        path: PNG to write.
    """
    if summary.empty:
        return None
    names = list(summary["strategy"])
    done = table[table["status"] == "finished"]
    cost, what = cost_axis(summary)
    div, unit = time_unit(float(np.nanmax(summary[f"{cost}_mean"].to_numpy(float), initial=0)))
    x = summary[f"{cost}_mean"].to_numpy(float) / div
    y = summary["val_dice_mean"].to_numpy(float)
    params = summary["trainable_params_mean"].to_numpy(float)
    pmax = float(np.nanmax(params, initial=0))
    area = _marker_area(params, pmax)

    fig = Figure(figsize=(7.5, 5))
    ax = fig.subplots()
    front = pareto_front(x, y)
    if len(front) > 1:
        ax.step(
            x[front], y[front], where="post", color="0.3", ls="--", lw=1.2, zorder=1, label="Pareto front"
        )
    for i, name in enumerate(names):
        c = strategy_color(name, names)
        seeds = done[done["strategy"] == name]
        ax.scatter(seeds[cost] / div, seeds["val_dice"], s=12, color=c, alpha=0.5, zorder=2)
        ax.errorbar(
            x[i],
            y[i],
            xerr=np.nan_to_num(summary[f"{cost}_std"].iloc[i]) / div,
            yerr=np.nan_to_num(summary["val_dice_std"].iloc[i]),
            fmt="none",
            ecolor=c,
            lw=1,
            zorder=2,
        )
        on_front = i in set(front.tolist())
        ax.scatter(x[i], y[i], s=area[i], color=c, edgecolor="k" if on_front else "none", lw=1.2, zorder=3)
    ax.set_xlabel(f"{what} ({unit}, mean over seeds)")
    ax.set_ylabel("val 2D Dice")
    ax.set_title(
        "Quality against cost (marker area ~ sqrt of trainable parameters; outlined: Pareto front)",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.margins(x=0.12, y=0.12)
    place_labels(ax, x, y, names, radii=np.sqrt(area) / 2)  # scatter's s is the marker width squared (pt)
    handles = [
        ax.scatter([], [], s=_marker_area(np.array([p]), pmax)[0], color="0.6") for p in _size_refs(pmax)
    ]
    labels = [f"{p:,.0f} params" for p in _size_refs(pmax)]
    if len(front) > 1:
        h, lab = ax.get_legend_handles_labels()
        handles, labels = h + handles, lab + labels
    ax.legend(
        handles,
        labels,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=8,
        labelspacing=1.6,
        borderpad=1.0,
        frameon=False,
    )
    return _save(fig, path)


# Where a label may go around its marker, in marker radii + a gap: right, left, above, below, then
# the diagonals; further rings (with a leader line) when all of those are taken.
_LABEL_DIRECTIONS = ((1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (-1, 1), (1, -1), (-1, -1))


def place_labels(
    ax, x: np.ndarray, y: np.ndarray, names: list[str], *, radii: np.ndarray, fontsize=9
) -> list:
    """Label each marker where the label overlaps no other label and no marker, inside the axes.

    Our own greedy search, deterministic and guaranteeing disjoint labels whenever one of the spots
    it tries is free (adjustText repels labels iteratively and guarantees neither). The axes limits
    are frozen first, so the labels stay where they were placed. NaN points get no label.

    Args:
        ax: the axes, every marker drawn.
        x, y: (N,) marker positions in data units.
        names: (N,) labels.
        radii: (N,) marker radii in points.

    Returns:
        The Text artists, in the order of ``names`` (None for a NaN point).
    """
    fig = ax.figure
    if not hasattr(fig.canvas, "get_renderer"):
        FigureCanvasAgg(fig)  # text extents need a renderer; savefig would attach the same canvas
    renderer = fig.canvas.get_renderer()
    ax.set_xlim(ax.get_xlim())  # freeze autoscaling: the transform below must stay true
    ax.set_ylim(ax.get_ylim())
    px = fig.dpi / 72.0  # pixels per point
    centers = ax.transData.transform(np.column_stack([np.asarray(x, float), np.asarray(y, float)]))
    ok = np.isfinite(centers).all(axis=1)
    markers = [
        (cx - r * px, cy - r * px, cx + r * px, cy + r * px) for (cx, cy), r in zip(centers[ok], radii[ok])
    ]
    frame = ax.get_window_extent(renderer).extents
    taken: list = []
    texts: list = []
    for i, name in enumerate(names):
        if not ok[i]:
            texts.append(None)
            continue
        probe = ax.text(0, 0, name, fontsize=fontsize)
        w, h = (v / px for v in probe.get_window_extent(renderer).size)
        probe.remove()
        ox, oy, ring = _free_spot(centers[i], radii[i], w, h, px, frame, taken + markers)
        arrow = {"arrowstyle": "-", "color": "0.5", "lw": 0.7, "shrinkA": 0, "shrinkB": radii[i]}
        texts.append(
            ax.annotate(
                name,
                (x[i], y[i]),
                textcoords="offset points",
                xytext=(ox, oy),
                ha="left",
                va="bottom",
                fontsize=fontsize,
                arrowprops=arrow if ring > 1 else None,  # far from its marker: a line says whose it is
            )
        )
        c = centers[i]
        taken.append((c[0] + ox * px, c[1] + oy * px, c[0] + (ox + w) * px, c[1] + (oy + h) * px))
    return texts


def _free_spot(center, radius: float, w: float, h: float, px: float, frame, blocked: list) -> tuple:
    """(x offset, y offset, ring) in points of the first free label box around a marker."""
    for ring in range(1, 7):
        gap = radius + 3 + (ring - 1) * (h + 4)
        for dx, dy in _LABEL_DIRECTIONS:
            ox = dx * gap - (w if dx < 0 else 0) - (w / 2 if dx == 0 else 0)
            oy = dy * gap - (h if dy < 0 else 0) - (h / 2 if dy == 0 else 0)
            box = (
                center[0] + ox * px,
                center[1] + oy * px,
                center[0] + (ox + w) * px,
                center[1] + (oy + h) * px,
            )
            inside = frame[0] <= box[0] and box[2] <= frame[2] and frame[1] <= box[1] and box[3] <= frame[3]
            if inside and not any(_overlap(box, b) for b in blocked):
                return ox, oy, ring
    return radius + 3, -h / 2, 1  # nowhere free in reach: right of the marker


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _size_refs(pmax: float) -> list[float]:
    """Round reference parameter counts (powers of ten up to the largest) for the marker-size legend."""
    if pmax <= 0:
        return []
    top = 10 ** math.floor(math.log10(pmax))
    return [p for p in (top / 1000, top / 10, top) if p >= 1]


def _ci_errors(g: pd.DataFrame) -> np.ndarray:
    """(2, n) error-bar lengths below and above each mean from its ``ci_low``/``ci_high`` (0 if none)."""
    m = g["mean"].to_numpy(float)
    return np.nan_to_num(np.vstack([m - g["ci_low"].to_numpy(float), g["ci_high"].to_numpy(float) - m]))


def plot_per_organ(dsc: pd.DataFrame, nsd: pd.DataFrame, path: Path) -> Path | None:
    """Grouped bars of per-organ 3D DSC (top) and NSD (bottom): mean over val cases, error bars its
    95% interval over cases.

    Args:
        dsc, nsd: :func:`~clipseg_bench.study.results.organ_summary_table` rows of one level.
        path: PNG to write.
    """
    if dsc.empty or dsc["mean"].isna().all():
        return None
    names = strategy_order(set(dsc["strategy"]))
    fig = Figure(figsize=(12, 7))
    axes = fig.subplots(2, 1, sharex=True)
    width = 0.8 / len(names)
    xs = np.arange(len(ORGANS))
    for ax, df, label in ((axes[0], dsc, "3D DSC"), (axes[1], nsd, "NSD")):
        for k, name in enumerate(names):
            g = df[df["strategy"] == name].set_index("organ").reindex([o.key for o in ORGANS])
            ax.bar(
                xs + (k - (len(names) - 1) / 2) * width,
                g["mean"].fillna(0),
                width,
                yerr=_ci_errors(g),
                color=strategy_color(name, names),
                label=name,
                error_kw={"lw": 0.8, "capsize": 1.5},
            )
        ax.set_ylabel(f"val {label}")
        ax.set_ylim(0, 1.05)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(ncol=len(names), fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    axes[1].set_xticks(xs, [o.name for o in ORGANS], rotation=35, ha="right")
    return _save(fig, path)


def plot_ranking(ranking: pd.DataFrame, path: Path, metric: str = "dsc") -> Path | None:
    """Mean rank of each strategy with its 95% rank interval (bootstrap over cases), P(rank 1) beside.

    Args:
        ranking: :func:`~clipseg_bench.study.results.ranking_table` rows of one level.
        path: PNG to write. Nothing is drawn (None) with fewer cases than a test needs
            (:data:`~clipseg_bench.study.stats.MIN_CASES`): a bootstrap over 1-4 cases shows no
            stability worth drawing.
    """
    from clipseg_bench.study.stats import MIN_CASES

    g = ranking[ranking["metric"] == metric]
    if g.empty or g["n_cases"].max() < MIN_CASES:
        return None
    names = list(g["strategy"])
    ys = np.arange(len(names))[::-1]
    fig = Figure(figsize=(7, 0.5 * len(names) + 1.5))
    ax = fig.subplots()
    for y, r in zip(ys, g.itertuples()):
        c = strategy_color(r.strategy, names)
        ax.plot([r.rank_low, r.rank_high], [y, y], color=c, lw=6, alpha=0.35, solid_capstyle="butt")
        ax.plot([r.mean_rank], [y], "o", color=c, ms=7)
        ax.annotate(
            f"P(rank 1) {r.p_first:.2f}",
            (1, y),
            xycoords=("axes fraction", "data"),
            xytext=(6, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
        )
    ax.set_yticks(ys, names)
    ax.set_xlim(0.5, len(names) + 0.5)
    ax.set_xticks(range(1, len(names) + 1))
    ax.invert_xaxis()  # rank 1 on the right, like "better"
    ax.set_xlabel("rank (1 = highest mean val 3D DSC); dot: mean rank, bar: 95% rank interval")
    ax.set_title(
        f"Ranking stability over {int(g['n_cases'].max())} val cases (1,000 bootstrap resamples)", fontsize=10
    )
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def plot_organ_map(organ_map: pd.DataFrame, path: Path, metric: str = "dsc") -> Path | None:
    """The per-organ significance map: comparisons as rows, organs as columns, colour the mean
    difference over cases; a cell's mark is its verdict after Holm over the whole map
    (``+``/``−`` higher/lower, ``=`` equivalent, blank inconclusive, ``·`` too few cases).

    Args:
        organ_map: :func:`~clipseg_bench.study.results.organ_map_table` rows of one level.
        path: PNG to write; nothing is drawn (None) with fewer cases than a test needs.
    """
    from clipseg_bench.study import stats

    g = organ_map[organ_map["metric"] == metric]
    if g.empty or g["n_cases"].max() < stats.MIN_CASES:  # as the ranking: nothing tested, no map
        return None
    rows = list(dict.fromkeys(f"{s} − {r}" for s, r in zip(g["strategy"], g["reference"])))
    organs = [o for o in ORGANS if o.key in set(g["organ"])]
    grid = np.full((len(rows), len(organs)), np.nan)
    marks = {stats.HIGHER: "+", stats.LOWER: "−", stats.EQUIVALENT: "=", stats.TOO_FEW: "·"}
    fig = Figure(figsize=(1.0 + 0.62 * len(organs), 1.4 + 0.34 * len(rows)))
    ax = fig.subplots()
    col = {o.key: j for j, o in enumerate(organs)}
    for r in g.itertuples():
        i, j = rows.index(f"{r.strategy} − {r.reference}"), col[r.organ]
        grid[i, j] = r.mean
        if r.verdict in marks:
            ax.text(j, i, marks[r.verdict], ha="center", va="center", fontsize=9, fontweight="bold")
    bound = float(np.nanmax(np.abs(grid), initial=0.0)) or 1.0
    im = ax.imshow(grid, cmap="RdBu", vmin=-bound, vmax=bound, aspect="auto")
    ax.set_xticks(range(len(organs)), [o.name for o in organs], rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02).set_label(f"mean difference, val 3D {metric.upper()}")
    ax.set_title(
        "Per-organ differences over val cases (+/−: Holm-corrected verdict; =: equivalent)", fontsize=9
    )
    return _save(fig, path)


CURVE_PANELS = (("loss", "training loss"), ("train_dice", "train Dice"), ("val_dice", "val Dice"))


def curve_panels(runs: list[Run]) -> list[tuple[str, str]]:
    """The (history column, title) panels that have a curve to draw: some run with 2+ epochs of it.

    A column no run recorded (val Dice when training ran with ``val_every: 0``) or that every run
    has for one epoch only gives an empty panel or a lone dot: it is left out.
    """
    return [
        (col, title)
        for col, title in CURVE_PANELS
        if any(col in r.history and r.history[["epoch", col]].dropna()["epoch"].nunique() >= 2 for r in runs)
    ]


def plot_curves(runs: list[Run], path: Path) -> Path | None:
    """Loss, train Dice and val Dice per epoch; one thin line per seed, coloured by strategy.

    Runs with no history (zero-shot, nothing trained yet) are left out, and so are panels with
    nothing to draw (:func:`curve_panels`); with no panel left there is no plot.
    """
    runs = [r for r in runs if r.finished and r.history is not None and "epoch" in r.history]
    panels = curve_panels(runs)
    if not panels:
        return None
    names = strategy_order({r.strategy for r in runs})
    fig = Figure(figsize=(4.4 * len(panels), 3.8))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    labelled: set[str] = set()
    last_epoch = 1
    for r in runs:
        c = strategy_color(r.strategy, names)
        label = None if r.strategy in labelled else r.strategy
        labelled.add(r.strategy)
        for ax, (col, _) in zip(axes, panels):
            if col in r.history:
                h = r.history[["epoch", col]].dropna()
                last_epoch = max(last_epoch, int(h["epoch"].max()) if len(h) else 1)
                ax.plot(h["epoch"], h[col], color=c, lw=1.2, alpha=0.85, marker=".", ms=3, label=label)
    for ax, (_, title) in zip(axes, panels):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_xlim(0.5, last_epoch + 0.5)  # whole epochs, never a sub-epoch tick range
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return _save(fig, path)


def plot_time_breakdown(summary: pd.DataFrame, parts: list[str], path: Path) -> Path | None:
    """Horizontal stacked bars of where each strategy's run time went (mean over seeds).

    Data, forward, backward and optimizer make up the training time (a black diamond, as the
    trainer measured it; the rest is the loop's bookkeeping); validation and the feature-cache
    build (hatched, paid once per run) come after it: the training time does not count them.
    """
    if summary.empty:
        return None
    names = list(summary["strategy"])
    # The training parts first (they make up the training time, the diamond, up to the loop's own
    # bookkeeping), then what the training time does not count: validation and the cache build.
    ordered = [p for p in parts if p != "eval"] + [p for p in parts if p == "eval"]
    segs = [(p, f"time_{p}_s_mean") for p in ordered if f"time_{p}_s_mean" in summary]
    totals = summary["train_time_s_mean"].to_numpy(float)
    stacked = sum((summary[c].fillna(0).to_numpy(float) for _, c in segs), np.zeros(len(names)))
    cache = summary["cache_build_s_mean"].fillna(0).to_numpy(float) if "cache_build_s_mean" in summary else 0
    div, unit = time_unit(float(np.nanmax(np.r_[totals, stacked + cache], initial=0)))
    fig = Figure(figsize=(9, 0.6 * len(names) + 1.6))
    ax = fig.subplots()
    ys = np.arange(len(names))[::-1]  # first strategy on top
    left = np.zeros(len(names))
    for part, col in segs:
        w = summary[col].fillna(0).to_numpy(float) / div
        label = "validation (not in the training time)" if part == "eval" else part
        ax.barh(ys, w, left=left, color=_PART_COLORS.get(part, "#d4a6c8"), label=label, height=0.6)
        left += w
    if np.any(cache):
        ax.barh(
            ys,
            cache / div,
            left=left,
            color="white",
            edgecolor="0.4",
            hatch="//",
            height=0.6,
            label="feature cache build (one-off, not in the training time)",
        )
    ax.scatter(totals / div, ys, marker="D", color="k", s=22, zorder=3, label="training time (wall)")
    ax.set_yticks(ys, names)
    ax.set_xlabel(f"time per run ({unit}, mean over seeds)")
    ax.set_title("Where the time goes", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.06), ncol=4, frameon=False)
    return _save(fig, path)


def load_samples(path: Path) -> dict[str, np.ndarray]:
    """Read an evaluate ``samples.npz``: image, gt, pred (N, H, W) uint8; case (N,) str; z (N,) int."""
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in ("image", "gt", "pred", "case", "z")}
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(path, f"unreadable samples file ({exc})") from None
    if not (out["image"].shape == out["gt"].shape == out["pred"].shape and out["image"].ndim == 3):
        raise InputError(path, "image, gt and pred must share one (N, H, W) shape")
    return out


def label_overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """Blend FLARE22 label colours onto a gray CT slice.

    Args:
        image: (H, W) uint8 windowed CT.
        labels: (H, W) FLARE22 ids (0 = background).
        alpha: opacity of the organ colours.

    Returns:
        (H, W, 3) float RGB in [0, 1].
    """
    gray = np.repeat((image.astype(np.float32) / 255.0)[..., None], 3, axis=-1)
    lut = np.zeros((256, 3), np.float32)
    for o, hexc in zip(ORGANS, ORGAN_COLORS):
        lut[o.id] = [int(hexc[i : i + 2], 16) / 255.0 for i in (1, 3, 5)]
    lab = labels.astype(np.uint8)
    mask = (lab > 0)[..., None]
    return np.where(mask, (1 - alpha) * gray + alpha * lut[lab], gray)


def _pick(keys: list[tuple[str, int]], n: int) -> list[tuple[str, int]]:
    if len(keys) <= n:
        return keys
    return [keys[i] for i in np.linspace(0, len(keys) - 1, n).round().astype(int)]


def body_box(image: np.ndarray, *masks: np.ndarray, margin: int = 4, level: int = 20) -> tuple[slice, slice]:
    """Rows and columns of a slice worth showing: the body (window value above ``level``) and every
    labelled pixel, plus ``margin`` pixels; the whole slice if nothing qualifies."""
    keep = image > level
    for m in masks:
        keep |= m > 0
    rows, cols = np.flatnonzero(keep.any(axis=1)), np.flatnonzero(keep.any(axis=0))
    if not len(rows):
        return slice(None), slice(None)
    h, w = image.shape
    return (
        slice(max(rows[0] - margin, 0), min(rows[-1] + margin + 1, h)),
        slice(max(cols[0] - margin, 0), min(cols[-1] + margin + 1, w)),
    )


OVERLAY_TILE_IN = 2.9  # inches per tile: about 300 px per tile at DPI, four slices across the page


def plot_overlays(runs: list[Run], path: Path, max_slices: int = 4) -> Path | None:
    """Grid of the same CT slices: columns = slices; rows = CT, ground truth, each strategy's prediction.

    Each strategy shows its lowest finished seed that has ``samples.npz``. Slices are matched by
    (case, z) so that every row shows the same anatomy, and each column is cropped to the body so
    the organs fill the tile. A legend above names the colours of the organs shown.
    """
    chosen: dict[str, Run] = {}
    for r in runs:  # runs are in report order: the first hit per strategy has the lowest seed
        if r.finished and r.samples is not None and r.strategy not in chosen:
            chosen[r.strategy] = r
    if not chosen:
        return None
    samples = {s: load_samples(r.samples) for s, r in chosen.items()}
    index = {
        s: {(str(c), int(z)): i for i, (c, z) in enumerate(zip(d["case"], d["z"]))}
        for s, d in samples.items()
    }
    ref_name = next(iter(samples))
    common = [k for k in index[ref_name] if all(k in ix for ix in index.values())]
    if not common:
        return None
    keys = _pick(common, max_slices)
    ref = samples[ref_name]
    rows = ["CT", "ground truth", *chosen]
    fig = Figure(figsize=(OVERLAY_TILE_IN * len(keys) + 0.6, OVERLAY_TILE_IN * len(rows) + 0.9))
    axes = fig.subplots(len(rows), len(keys), squeeze=False)
    present: set[int] = set()
    for col, key in enumerate(keys):
        i = index[ref_name][key]
        image, gt = ref["image"][i], ref["gt"][i]
        preds = [samples[s]["pred"][index[s][key]] for s in chosen]
        box = body_box(image, gt, *preds)
        present = present.union(*(np.unique(m[box]).tolist() for m in (gt, *preds)))
        panels = [np.repeat(image[..., None] / 255.0, 3, -1), label_overlay(image, gt)]
        panels += [label_overlay(image, p) for p in preds]
        for row, panel in enumerate(panels):
            ax = axes[row][col]
            ax.imshow(panel[box], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"{key[0]} z={key[1]}", fontsize=9)
            if col == 0:
                ax.set_ylabel(rows[row], fontsize=11)
    handles = [Patch(color=ORGAN_COLORS[o.id - 1], label=o.name) for o in ORGANS if o.id in present]
    if handles:
        fig.legend(
            handles=handles,
            loc="upper center",
            ncol=min(5, len(handles)),
            fontsize=9,
            frameon=False,
            bbox_to_anchor=(0.5, 1.0),
        )
    top = 1 - (0.25 + 0.22 * math.ceil(len(handles) / 5)) / fig.get_figheight()
    fig.subplots_adjust(wspace=0.04, hspace=0.04, top=top, left=0.06, right=0.99, bottom=0.01)
    return _save(fig, path)


def plot_reliance(summary: pd.DataFrame, path: Path) -> Path | None:
    """Val 2D Dice per strategy with the right prompt, a wrong organ's name, and each rewording.

    Bars are means over seeds with sample-std error bars; the gap between the first two bars is the
    prompt reliance. Strategies without reliance scores (runs evaluated before it existed) are left out.

    Args:
        summary: :func:`~clipseg_bench.study.results.summary_table` output.
        path: PNG to write.
    """
    if summary.empty or "prompt_reliance_mean" not in summary:
        return None
    rows = summary[summary["dice2d_wrong_prompt_mean"].notna()]
    if rows.empty:
        return None
    variants = [
        c[: -len("_mean")] for c in rows.columns if c.startswith(VARIANT_PREFIX) and c.endswith("_mean")
    ]
    bars = [("val_dice", "right prompt", "#4e79a7"), ("dice2d_wrong_prompt", "wrong organ's name", "#e15759")]
    grays = ("#bab0ac", "#9c9c9c", "#d7d7d7", "#7f7f7f", "#c7c7c7")
    bars += [
        (c, f"wording: {c[len(VARIANT_PREFIX) :]}", grays[i % len(grays)]) for i, c in enumerate(variants)
    ]
    names = list(rows["strategy"])
    xs = np.arange(len(names))
    width = 0.8 / len(bars)
    fig = Figure(figsize=(max(6.0, 1.3 * len(names) + 2.5), 4.2))
    ax = fig.subplots()
    for k, (col, label, color) in enumerate(bars):
        ax.bar(
            xs + (k - (len(bars) - 1) / 2) * width,
            rows[f"{col}_mean"].fillna(0),
            width,
            yerr=rows[f"{col}_std"].fillna(0),
            color=color,
            label=label,
            error_kw={"lw": 0.8, "capsize": 1.5},
        )
    for x, r in zip(xs, rows["prompt_reliance_mean"]):
        if math.isfinite(r):
            ax.annotate(
                f"{r:+.2f}",
                (x, 1.0),
                ha="center",
                va="bottom",
                fontsize=8,
                xycoords=("data", "axes fraction"),
            )
    ax.set_xticks(xs, names)
    ax.set_ylabel("val 2D Dice")
    ax.set_ylim(0, 1.05)
    ax.set_title(
        "Does the model read its prompt? (above each group: reliance = right − wrong)", fontsize=10, pad=16
    )
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _save(fig, path)


def plot_prompt_confusion(confusion: pd.DataFrame, path: Path) -> Path | None:
    """One heatmap per strategy: the prompt-confusion matrix averaged over seeds and folds (rows:
    the organ named in the prompt; columns: the organ whose truth the mask is scored against).

    A model that reads its prompt has a bright diagonal and a dark rest; one that ignores it has
    columns of one colour (every name gets the same mask).

    Args:
        confusion: :func:`~clipseg_bench.study.results.prompt_confusion_table` rows of one level.
        path: PNG to write.
    """
    if confusion.empty or confusion["dice"].isna().all():
        return None
    names = strategy_order(set(confusion["strategy"]))
    keys = [o.key for o in ORGANS if o.key in set(confusion["organ"])]
    short = {o.key: o.name.replace(" gland", "").replace("inferior vena cava", "IVC") for o in ORGANS}
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(4.4 * cols, 4.4 * rows), layout="constrained")  # room for the organ names
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, name in zip(axes, names):
        g = confusion[confusion["strategy"] == name].groupby(["named", "organ"])["dice"].mean()
        grid = np.array([[g.get((k, j), np.nan) for j in keys] for k in keys])
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
        ax.set_title(name, fontsize=9)
        ax.set_xticks(range(len(keys)), [short[k] for k in keys], rotation=90, fontsize=6)
        ax.set_yticks(range(len(keys)), [short[k] for k in keys], fontsize=6)
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    fig.colorbar(im, ax=list(axes[: len(names)]), shrink=0.6).set_label("Dice (mean over seeds and folds)")
    fig.suptitle("Prompt confusion: row = organ named, column = organ scored against", fontsize=10)
    return _save(fig, path)


def plot_data_efficiency(efficiency: pd.DataFrame, path: Path) -> Path | None:
    """Val 3D DSC against the number of training cases: one line per strategy, a band of its 95%
    interval over val cases (± 1 sd over seeds for runs without per-case scores). A strategy that
    trains nothing is a dashed horizontal line at its mean (its score cannot depend on the training
    cases).

    Args:
        efficiency: :func:`~clipseg_bench.study.results.efficiency_table` output.
        path: PNG to write. Nothing is drawn (None) with fewer than two training-case counts.
    """
    data = efficiency[efficiency["n_train_cases"].notna() & efficiency["mean"].notna()]
    if data.empty or data["n_train_cases"].nunique() < 2:
        return None
    names = strategy_order(set(data["strategy"]))
    xs = sorted(data["n_train_cases"].unique())
    labels = {
        float(n): f"{n:.0f} (all)"
        if (data.loc[data["n_train_cases"] == n, "train_cases"] == ALL_CASES).any()
        else f"{n:.0f}"
        for n in xs
    }
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.subplots()
    for name in names:
        g = data[data["strategy"] == name].sort_values("n_train_cases")
        c = strategy_color(name, names)
        if (g["trainable_params"] == 0).all():
            ax.axhline(g["mean"].mean(), color=c, ls="--", lw=1.2, label=f"{name} (trains nothing)")
            continue
        x, m = g["n_train_cases"].to_numpy(float), g["mean"].to_numpy(float)
        if "ci_low" in g and g["ci_low"].notna().all():
            low, high = g["ci_low"].to_numpy(float), g["ci_high"].to_numpy(float)
        else:
            sd = g["std"].fillna(0).to_numpy(float)
            low, high = m - sd, m + sd
        ax.plot(x, m, color=c, marker="o", ms=4, lw=1.5, label=name)
        ax.fill_between(x, low, high, color=c, alpha=0.18, lw=0)
    ax.set_xscale("log")
    ax.set_xticks(xs, [labels[float(n)] for n in xs])
    ax.minorticks_off()
    ax.set_xlabel("training cases (log scale; the same val cases throughout)")
    ax.set_ylabel("val 3D DSC")
    ax.set_title("Data efficiency (line: mean; band: 95% interval over val cases)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _save(fig, path)


def plot_lr_sweep(sweep: pd.DataFrame, path: Path) -> Path | None:
    """Tune score against learning rate, one line per strategy (log rate axis); the chosen rate is
    a filled marker, the strategy's default a hollow ring, a choice at the grid's edge is named.

    Args:
        sweep: :func:`~clipseg_bench.study.sweep.sweep_table` output.
        path: PNG to write; None (nothing drawn) without a sweep.
    """
    data = sweep[sweep["score"].notna()]
    if data.empty:
        return None
    names = strategy_order(set(data["strategy"]))
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.subplots()
    for name in names:
        g = data[data["strategy"] == name].sort_values("rate")
        c = strategy_color(name, names)
        edge = " (edge: widen the grid)" if g["at_edge"].iloc[0] else ""
        ax.plot(
            g["rate"],
            g["score"],
            color=c,
            marker="o",
            ms=4,
            lw=1.5,
            label=f"{name}: {g['field'].iloc[0]}{edge}",
        )
        best = g[g["chosen"]]
        ax.scatter(best["rate"], best["score"], s=90, color=c, edgecolor="k", zorder=3)
        default = g[g["default"]]
        ax.scatter(default["rate"], default["score"], s=160, facecolor="none", edgecolor=c, lw=1.5, zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate (log scale)")
    ax.set_ylabel("tune-case val 2D Dice")
    ax.set_title("Learning-rate sweep on the tune cases (filled: chosen; ring: default)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _save(fig, path)
