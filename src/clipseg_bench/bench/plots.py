"""The report's PNG plots: cost vs quality (with the Pareto front), per-organ bars, training curves,
the time breakdown and a grid of qualitative overlays.

Each ``plot_*`` function takes tables from :mod:`clipseg_bench.bench.results`, writes one PNG and
returns its path (or None when there is nothing to draw). Figures are built with the object API on
matplotlib's Agg canvas, never through pyplot, so no GUI backend or global figure state is touched.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from clipseg_bench.bench.results import BREAKDOWN_ORDER, STRATEGY_ORDER, Run, strategy_order
from clipseg_bench.errors import InputError
from clipseg_bench.organs import ORGANS
from clipseg_bench.provenance import replacing

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
_STRATEGY_COLORS = dict(
    zip(STRATEGY_ORDER, ("#7f7f7f", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"))
)
_EXTRA_COLORS = ("#8c564b", "#e377c2", "#bcbd22", "#17becf", "#393b79", "#637939")
_PART_COLORS = dict(zip(BREAKDOWN_ORDER, ("#bab0ac", "#4e79a7", "#e15759", "#f28e2b", "#59a14f")))


def strategy_color(name: str, names: list[str]) -> str:
    """A fixed colour for the study's strategies; others get the next free colour in report order."""
    if name in _STRATEGY_COLORS:
        return _STRATEGY_COLORS[name]
    extra = [n for n in strategy_order(names) if n not in _STRATEGY_COLORS]
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


def plot_pareto(summary: pd.DataFrame, table: pd.DataFrame, path: Path) -> Path | None:
    """Val Dice against training time per strategy (mean ± std), seeds as dots, Pareto front drawn.

    Args:
        summary: :func:`~clipseg_bench.bench.results.summary_table` output.
        table: :func:`~clipseg_bench.bench.results.runs_table` output (for the per-seed dots).
        path: PNG to write.
    """
    if summary.empty:
        return None
    names = list(summary["strategy"])
    done = table[table["status"] == "finished"]
    div, unit = time_unit(float(np.nanmax(summary["train_time_s_mean"].to_numpy(float), initial=0)))
    x = summary["train_time_s_mean"].to_numpy(float) / div
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
        ax.scatter(seeds["train_time_s"] / div, seeds["val_dice"], s=12, color=c, alpha=0.5, zorder=2)
        ax.errorbar(
            x[i],
            y[i],
            xerr=np.nan_to_num(summary["train_time_s_std"].iloc[i]) / div,
            yerr=np.nan_to_num(summary["val_dice_std"].iloc[i]),
            fmt="none",
            ecolor=c,
            lw=1,
            zorder=2,
        )
        on_front = i in set(front.tolist())
        ax.scatter(x[i], y[i], s=area[i], color=c, edgecolor="k" if on_front else "none", lw=1.2, zorder=3)
        r = math.sqrt(area[i]) / 2  # scatter's s is the marker's width squared, in points
        ax.annotate(name, (x[i], y[i]), textcoords="offset points", xytext=(r + 2, r / 2 + 2), fontsize=9)
    ax.set_xlabel(f"training time ({unit}, mean over seeds)")
    ax.set_ylabel("val 2D Dice")
    ax.set_title(
        "Quality against cost (marker area ~ sqrt of trainable parameters; outlined: Pareto front)",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.margins(x=0.12, y=0.12)
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


def _size_refs(pmax: float) -> list[float]:
    """Round reference parameter counts (powers of ten up to the largest) for the marker-size legend."""
    if pmax <= 0:
        return []
    top = 10 ** math.floor(math.log10(pmax))
    return [p for p in (top / 1000, top / 10, top) if p >= 1]


def plot_per_organ(dsc: pd.DataFrame, nsd: pd.DataFrame, path: Path) -> Path | None:
    """Grouped bars of per-organ 3D DSC (top) and NSD (bottom), mean ± std over seeds.

    Args:
        dsc, nsd: :func:`~clipseg_bench.bench.results.per_organ_table` outputs.
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
                yerr=g["std"].fillna(0),
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


def plot_curves(runs: list[Run], path: Path) -> Path | None:
    """Loss, train Dice and val Dice per epoch; one thin line per seed, coloured by strategy.

    Runs with no history (zero-shot, nothing trained yet) are left out.
    """
    runs = [r for r in runs if r.finished and r.history is not None and "epoch" in r.history]
    if not runs:
        return None
    names = strategy_order({r.strategy for r in runs})
    fig = Figure(figsize=(13, 3.8))
    axes = fig.subplots(1, 3)
    labelled: set[str] = set()
    for r in runs:
        c = strategy_color(r.strategy, names)
        label = None if r.strategy in labelled else r.strategy
        labelled.add(r.strategy)
        for ax, col in zip(axes, ("loss", "train_dice", "val_dice")):
            if col in r.history:
                h = r.history[["epoch", col]].dropna()
                ax.plot(h["epoch"], h[col], color=c, lw=1.2, alpha=0.85, marker=".", ms=3, label=label)
    for ax, title in zip(axes, ("training loss", "train Dice", "val Dice")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return _save(fig, path)


def plot_time_breakdown(summary: pd.DataFrame, parts: list[str], path: Path) -> Path | None:
    """Horizontal stacked bars of where each strategy's run time went (mean over seeds).

    The feature-cache build, paid once per run, is a hatched segment; a black diamond marks the
    run's total training time as the trainer measured it.
    """
    if summary.empty:
        return None
    names = list(summary["strategy"])
    segs = [(p, f"time_{p}_s_mean") for p in parts if f"time_{p}_s_mean" in summary]
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
        ax.barh(ys, w, left=left, color=_PART_COLORS.get(part, "#d4a6c8"), label=part, height=0.6)
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
            label="feature cache build (once)",
        )
    ax.scatter(totals / div, ys, marker="D", color="k", s=22, zorder=3, label="total training time")
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


def plot_overlays(runs: list[Run], path: Path, max_slices: int = 4) -> Path | None:
    """Grid of the same CT slices: rows = slices; columns = CT, ground truth, each strategy's prediction.

    Each strategy shows its lowest finished seed that has ``samples.npz``. Slices are matched by
    (case, z) so that every column shows the same anatomy.
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
    cols = ["CT", "ground truth", *chosen]
    fig = Figure(figsize=(2.1 * len(cols), 2.1 * len(keys) + 0.7))
    axes = np.atleast_2d(fig.subplots(len(keys), len(cols), squeeze=False))
    present: set[int] = set()
    for row, key in enumerate(keys):
        i = index[ref_name][key]
        image = ref["image"][i]
        present |= set(np.unique(ref["gt"][i]).tolist())
        panels = [np.repeat(image[..., None] / 255.0, 3, -1), label_overlay(image, ref["gt"][i])]
        preds = [samples[s]["pred"][index[s][key]] for s in chosen]
        present = present.union(*(np.unique(p).tolist() for p in preds))
        panels += [label_overlay(image, p) for p in preds]
        for col, (ax, panel) in enumerate(zip(axes[row], panels)):
            ax.imshow(panel, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(cols[col], fontsize=10)
            if col == 0:
                ax.set_ylabel(f"{key[0]} z={key[1]}", fontsize=8)
    handles = [Patch(color=ORGAN_COLORS[o.id - 1], label=o.name) for o in ORGANS if o.id in present]
    if handles:
        fig.legend(
            handles=handles,
            loc="lower center",
            ncol=min(7, len(handles)),
            fontsize=8,
            frameon=False,
            bbox_to_anchor=(0.5, 0.0),
        )
    fig.subplots_adjust(wspace=0.03, hspace=0.08, bottom=0.45 / fig.get_figheight())
    return _save(fig, path)
