"""`clipseg-bench report`: results.csv, results.md, plots/*.png and a self-contained report.html.

Every number in the report is computed from the run folders' own files (run.json, metrics.json,
history.csv) by :mod:`clipseg_bench.study.results`; this module only formats and explains them.
The HTML comes from ``templates/report.html.j2`` (CSS inline, PNGs as base64 data URIs), so the
single file can be mailed or archived and still shows everything.
"""

from __future__ import annotations

import base64
import math
from collections import Counter
from pathlib import Path

import pandas as pd
from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup
from pandas.io.formats.style import Styler

from clipseg_bench.errors import InputError
from clipseg_bench.organs import ORGANS
from clipseg_bench.provenance import (
    check_output_folder,
    folder_format,
    mark_folder,
    replacing,
    write_text_atomic,
)
from clipseg_bench.study import plots
from clipseg_bench.study.results import (
    ALL_CASES,
    FINISHED,
    VARIANT_PREFIX,
    Run,
    audit_cells,
    breakdown_keys,
    case_scores,
    cleanup_gain_table,
    efficiency_table,
    full_data_runs,
    is_bench_folder,
    paired_differences,
    per_organ_table,
    read_bench,
    runs_table,
    summary_table,
)

# The original study (FLARE22, 20 epochs), as it reported its results; shown for reference only.
ORIGINAL_STUDY = pd.DataFrame(
    [
        {"Strategy": "full", "Train Dice": 0.7527, "Val Dice": 0.6189, "Training time (h)": 1.58},
        {"Strategy": "decoder", "Train Dice": 0.7761, "Val Dice": 0.6335, "Training time (h)": 2.13},
        {"Strategy": "adapter", "Train Dice": 0.6524, "Val Dice": 0.5318, "Training time (h)": 2.15},
    ]
)

_TEMPLATES = Environment(
    loader=PackageLoader("clipseg_bench.study", "templates"),
    autoescape=True,  # run folders are user files: their text must show as text, never as markup
    undefined=StrictUndefined,  # a misspelt name fails the report instead of leaving a silent gap
    trim_blocks=True,
    lstrip_blocks=True,
)


# --- formatting ------------------------------------------------------------------------------


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def fmt_pm(mean: float, std: float, digits: int) -> str:
    """``mean ± std`` with fixed decimals; a single seed (std NaN) shows ``± –``, no value ``–``."""
    if not _finite(mean):
        return "–"
    return f"{mean:.{digits}f} ± {f'{std:.{digits}f}' if _finite(std) else '–'}"


def _fmt_params(mean: float, std: float, total: float) -> str:
    if not _finite(mean):
        return "–"
    text = f"{mean:,.0f}"
    if _finite(std) and std > 0:  # differs between seeds only if the model differed
        text += f" ± {std:,.0f}"
    if _finite(total) and total > 0:
        text += f" ({mean / total:.2%})"
    return text


def summary_display(summary: pd.DataFrame) -> pd.DataFrame:
    """The study's table extended with 3D scores and costs, as strings (mean ± std over seeds)."""
    tmax = float(summary["train_time_s_mean"].max()) if len(summary) else 0.0
    div, unit = plots.time_unit(tmax)
    rows = []
    for _, r in summary.iterrows():
        rows.append(
            {
                "Strategy": r["strategy"],
                "Seeds": r["n_seeds"],
                "Trainable params": _fmt_params(
                    r["trainable_params_mean"], r["trainable_params_std"], r["total_params_mean"]
                ),
                "Train Dice": fmt_pm(r["train_dice_mean"], r["train_dice_std"], 4),
                "Val Dice": fmt_pm(r["val_dice_mean"], r["val_dice_std"], 4),
                "Val 3D DSC": fmt_pm(r["val_dsc3d_mean"], r["val_dsc3d_std"], 4),
                "Val NSD": fmt_pm(r["val_nsd3d_mean"], r["val_nsd3d_std"], 4),
                f"Training time ({unit})": fmt_pm(
                    r["train_time_s_mean"] / div, r["train_time_s_std"] / div, 2
                ),
                "s/epoch": fmt_pm(r["s_per_epoch_mean"], r["s_per_epoch_std"], 3),
                "Peak memory (MB)": fmt_pm(r["peak_mem_mb_mean"], r["peak_mem_mb_std"], 1),
            }
        )
    return pd.DataFrame(rows)


def per_organ_display(long: pd.DataFrame) -> pd.DataFrame:
    """Organs as rows, strategies as columns, ``mean ± std`` over seeds (3 decimals)."""
    out = pd.DataFrame({"Organ": [o.name for o in ORGANS]})
    for strategy in dict.fromkeys(long["strategy"]):
        g = long[long["strategy"] == strategy].set_index("organ").reindex([o.key for o in ORGANS])
        out[strategy] = [fmt_pm(m, s, 3) for m, s in zip(g["mean"], g["std"])]
    return out


def gain_display(long: pd.DataFrame) -> pd.DataFrame:
    """Clean-up gains (:func:`~clipseg_bench.study.results.cleanup_gain_table`): organs (and the
    mean over organs) as rows, strategies as columns, signed ``mean ± std`` over seeds."""
    names = dict(zip(long["organ"], long["name"]))
    keys = list(dict.fromkeys(long["organ"]))
    out = pd.DataFrame({"Organ": [names[k] for k in keys]})
    for strategy in dict.fromkeys(long["strategy"]):
        g = long[long["strategy"] == strategy].set_index("organ").reindex(keys)
        out[strategy] = [
            "–" if not _finite(m) else f"{m:+.3f} ± {f'{s:.3f}' if _finite(s) else '–'}"
            for m, s in zip(g["mean"], g["std"])
        ]
    return out


def cleanup_context(runs: list[Run]) -> dict:
    """The report's clean-up section: DSC and NSD gain tables, None when no run has both scores."""
    dsc, nsd = cleanup_gain_table(runs, "dsc"), cleanup_gain_table(runs, "nsd")
    if dsc.empty:
        return {"cleanup_dsc": None, "cleanup_nsd": None}
    return {
        "cleanup_dsc": _table(gain_display(dsc), "cleanup_dsc"),
        "cleanup_nsd": _table(gain_display(nsd), "cleanup_nsd"),
    }


def runs_display(table: pd.DataFrame) -> pd.DataFrame:
    """Every run, finished or not, with its status and where it lives."""

    def num(x, d):
        return f"{x:.{d}f}" if _finite(x) else "–"

    cases = {"Training cases": table["train_cases"]} if _has_data_axis(table) else {}
    return pd.DataFrame(
        {
            "Strategy": table["strategy"],
            "Seed": table["seed"],
            **cases,
            "Status": table["status"],
            "Val Dice": [num(x, 4) for x in table["val_dice"]],
            "Val 3D DSC": [num(x, 4) for x in table["val_dsc3d"]],
            "Training time (s)": [num(x, 1) for x in table["train_time_s"]],
            "Commit": [
                str(c)[:10] + ("+dirty" if d else "") if c else "–"
                for c, d in zip(table["git_commit"], table["git_dirty"])
            ],
            "Folder": [str(Path(b) / r) for b, r in zip(table["bench_dir"], table["run_dir"])],
        }
    )


def audit_display(runs: list[Run]) -> pd.DataFrame:
    """The gradient audit of every run: per part, tensors reached of trainable (``–``: nothing of
    that part trains), frozen tensors changed, and the verdict."""
    cells = pd.DataFrame([{"Strategy": r.strategy, "Seed": r.seed, **audit_cells(r.info)} for r in runs])
    return cells.fillna("–")


def _has_data_axis(table: pd.DataFrame) -> bool:
    return "train_cases" in table and bool((table["train_cases"] != ALL_CASES).any())


def _cases_order(labels) -> list[str]:
    """Training-case labels from fewest cases to all."""
    return sorted(set(labels), key=lambda c: (c == ALL_CASES, int(c) if c != ALL_CASES else 0))


def reliance_display(summary: pd.DataFrame) -> pd.DataFrame:
    """Per strategy: val 2D Dice with the right prompt, with a wrong organ's name, their difference
    (the prompt reliance) and under each rewording; mean ± std over seeds (3 decimals). Strategies
    evaluated before the reliance scores existed are left out."""
    if summary.empty or "dice2d_wrong_prompt_mean" not in summary:
        return pd.DataFrame()
    rows = summary[summary["dice2d_wrong_prompt_mean"].notna()]
    variants = [
        c[: -len("_mean")] for c in rows.columns if c.startswith(VARIANT_PREFIX) and c.endswith("_mean")
    ]
    out = []
    for _, r in rows.iterrows():
        row = {
            "Strategy": r["strategy"],
            "Seeds": r["n_seeds"],
            "Right prompt": fmt_pm(r["val_dice_mean"], r["val_dice_std"], 3),
            "Wrong organ's name": fmt_pm(r["dice2d_wrong_prompt_mean"], r["dice2d_wrong_prompt_std"], 3),
            "Prompt reliance": fmt_pm(r["prompt_reliance_mean"], r["prompt_reliance_std"], 3),
        }
        for v in variants:
            row[f"Wording: {v[len(VARIANT_PREFIX) :]}"] = fmt_pm(r[f"{v}_mean"], r[f"{v}_std"], 3)
        out.append(row)
    return pd.DataFrame(out)


def efficiency_display(efficiency: pd.DataFrame) -> pd.DataFrame:
    """Strategies as rows, training-case counts as columns, val 3D DSC mean ± std over seeds."""
    labels = _cases_order(efficiency["train_cases"])
    out = []
    for strategy in dict.fromkeys(efficiency["strategy"]):
        g = efficiency[efficiency["strategy"] == strategy].set_index("train_cases")
        row = {"Strategy": strategy}
        for label in labels:
            n = efficiency.loc[efficiency["train_cases"] == label, "n_train_cases"].max()
            head = f"all ({n:.0f}) cases" if label == ALL_CASES and _finite(n) else f"{label} cases"
            row["1 case" if label == "1" else head] = (
                fmt_pm(g.at[label, "mean"], g.at[label, "std"], 3) if label in g.index else "–"
            )
        out.append(row)
    return pd.DataFrame(out)


def paired_display(paired: pd.DataFrame) -> pd.DataFrame:
    """The paired differences as text: mean, 95% bootstrap interval, Wilcoxon p and the verdict."""

    def verdict(r) -> str:
        if r["n"] < 2:
            return "too few (case, seed) pairs to tell"
        if r["within_noise"]:
            return "within noise"
        return "higher" if r["mean"] > 0 else "lower"

    def num(x, fmt):
        return format(x, fmt) if _finite(x) else "–"

    cases = {"Training cases": paired["train_cases"]} if (paired["train_cases"] != ALL_CASES).any() else {}
    return pd.DataFrame(
        {
            **cases,
            "Strategy": paired["strategy"],
            "Reference": [f"{r} ({k})" for r, k in zip(paired["reference"], paired["reference_kind"])],
            "Metric": paired["metric"].map({"dsc": "val 3D DSC", "nsd": "val NSD"}),
            "Pairs": paired["n"],
            "Mean difference": [num(x, "+.4f") for x in paired["mean"]],
            "95% CI": [
                f"[{num(lo, '+.4f')}, {num(hi, '+.4f')}]"
                for lo, hi in zip(paired["ci_low"], paired["ci_high"])
            ],
            "Wilcoxon p": [num(x, ".3g") for x in paired["p_value"]],
            "Verdict": [verdict(r) for _, r in paired.iterrows()],
        }
    )


# --- explanations ----------------------------------------------------------------------------


def strategy_description(name: str) -> str:
    """The strategy's one-sentence description from the registry; empty for a name it does not know
    (a run of a strategy this install lacks)."""
    # Imported on use: the registry imports torch and every strategy (peft), ~1.5 s that reading
    # result files does not otherwise need.
    from clipseg_bench.strategies import get

    try:
        return get(name).description.strip()
    except InputError:  # how get answers an unknown name
        return ""


def _parts(row: pd.Series, parts: list[str]) -> dict[str, float]:
    return {p: float(row[f"time_{p}_s_mean"]) for p in parts if _finite(row.get(f"time_{p}_s_mean"))}


def explain_strategy(row: pd.Series, parts: list[str], fastest: pd.Series | None) -> str:
    """A few sentences on what a strategy trains and where its time went, from its measurements.

    Args:
        row: one row of :func:`~clipseg_bench.study.results.summary_table`.
        parts: the timing-breakdown parts.
        fastest: the summary row of the trained strategy with the lowest s/epoch (None if none).
    """
    out = []
    trainable, total = row["trainable_params_mean"], row["total_params_mean"]
    if (
        not _finite(trainable)
        or trainable == 0
        or not (_finite(row["train_time_s_mean"]) and row["train_time_s_mean"] > 0)
    ):
        out.append("It has no training cost.")
    else:
        if _finite(total) and total > 0:
            out.append(f"Trains {trainable:,.0f} of {total:,.0f} parameters ({trainable / total:.2%}).")
        measured = _parts(row, parts)
        spent = sum(measured.values())
        if spent > 0:
            top = max(measured, key=measured.get)
            shares = ", ".join(f"{p} {v / spent:.0%}" for p, v in measured.items())
            out.append(f"Of its measured time, {top} dominates ({shares}).")
        cache = row.get("cache_build_s_mean")
        if _finite(cache) and cache > 0:
            out.append(
                f"Building the frozen-encoder feature cache took {cache:.1f} s, paid once per run "
                f"({cache / row['train_time_s_mean']:.0%} of its training time)."
            )
        spe = row["s_per_epoch_mean"]
        if fastest is not None and _finite(spe) and fastest["strategy"] != row["strategy"]:
            out.append(
                f"{spe:.2f} s/epoch: {spe / fastest['s_per_epoch_mean']:.2f}× the fastest, {fastest['strategy']}."
            )
        elif _finite(spe):
            out.append(f"{spe:.2f} s/epoch: the fastest trained strategy.")
    mem = row["peak_mem_mb_mean"]
    if _finite(mem):
        out.append(f"Peak memory {mem:,.0f} MB.")
    return " ".join(out)


def _trained(summary: pd.DataFrame) -> pd.DataFrame:
    ok = (
        (summary["train_time_s_mean"] > 0)
        & summary["s_per_epoch_mean"].notna()
        & (summary["s_per_epoch_mean"] > 0)
    )
    return summary[ok]


def explain_gap(summary: pd.DataFrame, parts: list[str]) -> str:
    """Which measured part makes the slowest trained strategy slower than the fastest one."""
    trained = _trained(summary)
    if len(trained) < 2:
        return ""
    fast = trained.loc[trained["train_time_s_mean"].idxmin()]
    slow = trained.loc[trained["train_time_s_mean"].idxmax()]
    gap = slow["train_time_s_mean"] - fast["train_time_s_mean"]
    text = (
        f"The fastest trained strategy is {fast['strategy']} ({fast['train_time_s_mean']:.1f} s per run), the "
        f"slowest {slow['strategy']} ({slow['train_time_s_mean']:.1f} s, "
        f"{slow['train_time_s_mean'] / fast['train_time_s_mean']:.1f}×)."
    )
    diffs = {p: v - _parts(fast, parts).get(p, 0.0) for p, v in _parts(slow, parts).items()}
    if diffs and gap > 0:
        top = max(diffs, key=diffs.get)
        text += f" Most of the {gap:.1f} s gap is {top} time ({diffs[top]:.1f} s more)."
    return text


# --- provenance ------------------------------------------------------------------------------


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_tables(runs: list[Run]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(settings that differ between runs: one row per run; settings all runs share: key, value).

    ``out``, ``strategy``, ``seed`` and ``train_cases`` are left out: the run's name already says them.
    """
    flat = [_flatten(r.config) for r in runs]
    keys = sorted({k for f in flat for k in f} - {"out", "strategy", "seed", "train_cases"})
    varying = [k for k in keys if len({repr(f.get(k)) for f in flat}) > 1]
    diff = pd.DataFrame(
        [{"run": r.path.name, **{k: f.get(k, "–") for k in varying}} for r, f in zip(runs, flat)]
    )
    shared = pd.DataFrame(
        [{"setting": k, "value": flat[0].get(k)} for k in keys if k not in varying],
        columns=["setting", "value"],
    )
    return diff, shared


def _provenance(runs: list[Run]) -> tuple[pd.DataFrame, pd.DataFrame]:
    commits = Counter(
        (str((r.info.get("git") or {}).get("commit")), bool((r.info.get("git") or {}).get("dirty")))
        for r in runs
    )
    git = pd.DataFrame([{"commit": c, "dirty": d, "runs": n} for (c, d), n in commits.items()])
    hw_keys = ("cpu", "gpu", "torch", "cuda", "num_processes")
    hws = Counter(tuple(str((r.info.get("hardware") or {}).get(k)) for k in hw_keys) for r in runs)
    hw = pd.DataFrame([{**dict(zip(hw_keys, h)), "runs": n} for h, n in hws.items()])
    return git, hw


# --- writing ---------------------------------------------------------------------------------


def _table(df: pd.DataFrame, name: str, row_classes: list[str] | None = None) -> Markup:
    """``df`` as an escaped HTML table, each cell ``str()`` of its value, a missing one ``–``.

    Args:
        df: the table; its index is not shown.
        name: unique within the page; the Styler's element ids start with ``T_<name>``.
        row_classes: a CSS class per row ('' for none); the Styler sets it on every cell of the row.
    """
    # The cells are formatted already; str() keeps pandas from re-formatting floats (0.7527 -> 0.752700).
    cells = df.astype(str)
    styler = Styler(cells, uuid=name, cell_ids=False).hide(axis="index")
    styler = styler.format(na_rep="–", escape="html").format_index(escape="html", axis=1)
    if row_classes is not None:
        styler = styler.set_td_classes(
            pd.DataFrame({c: row_classes for c in cells.columns}, index=cells.index)
        )
    return Markup(styler.to_html())


def _figure(path: Path | None) -> dict[str, str] | None:
    """A PNG as a data URI (the page needs no file beside it), with its file name; None stays None."""
    if path is None:
        return None
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return {"src": f"data:image/png;base64,{data}", "name": path.name, "stem": path.stem}


def _excluded_note(table: pd.DataFrame) -> str:
    bad = table[table["status"] != FINISHED]
    if bad.empty:
        return ""
    cases = bad["train_cases"] if "train_cases" in bad else [ALL_CASES] * len(bad)
    listed = ", ".join(
        f"{s} seed {d}{'' if c == ALL_CASES else f' on {c} cases'} ({st})"
        for s, d, c, st in zip(bad["strategy"], bad["seed"], cases, bad["status"])
    )
    return f"{len(bad)} unfinished run(s) are listed below but excluded from every mean, table and plot: {listed}."


def no_val_note(table: pd.DataFrame) -> str:
    """A sentence naming the runs whose data had no val case (their val columns stay empty)."""
    bare = table[table["val_cases"] == 0] if "val_cases" in table else table.iloc[:0]
    if bare.empty:
        return ""
    listed = ", ".join(f"{s} seed {d}" for s, d in zip(bare["strategy"], bare["seed"]))
    return f"No val split: {len(bare)} run(s) trained on data without val cases, so they have no val scores: {listed}."


def cleanup_markdown(runs: list[Run] | None) -> list[str]:
    """results.md lines of the clean-up gain tables (none when no run has both scores)."""
    lines = []
    for metric, title in (("dsc", "3D DSC"), ("nsd", "NSD")):
        long = cleanup_gain_table(runs or [], metric)
        if not long.empty:
            lines += [
                f"## 3D clean-up (lcc): val {title} gain",
                "",
                gain_display(long).to_markdown(index=False),
                "",
            ]
    return lines


def write_markdown(
    path: Path,
    summary: pd.DataFrame,
    dsc: pd.DataFrame,
    nsd: pd.DataFrame,
    table: pd.DataFrame,
    runs: list[Run] | None = None,
    *,
    sections: dict[str, pd.DataFrame] | None = None,
) -> Path:
    """results.md: the aggregate table and the per-organ tables, in Markdown.

    Args:
        sections: more tables (heading -> display table) placed before the list of runs; empty
            tables are left out.
    """
    lines = [
        "# clipseg-bench results",
        "",
        "Mean ± sample std (ddof=1) over seeds; `± –` means a single seed. Finished runs only.",
        "",
    ]
    for note in (_excluded_note(table), no_val_note(table)):
        if note:
            lines += [f"> {note}", ""]
    if summary.empty:
        lines += ["No finished runs yet.", ""]
    else:
        lines += ["## Strategies", "", summary_display(summary).to_markdown(index=False), ""]
        lines += ["## Per-organ val 3D DSC", "", per_organ_display(dsc).to_markdown(index=False), ""]
        lines += ["## Per-organ val NSD", "", per_organ_display(nsd).to_markdown(index=False), ""]
        lines += cleanup_markdown(runs)
    for heading, df in (sections or {}).items():
        if not df.empty:
            lines += [f"## {heading}", "", df.to_markdown(index=False), ""]
    lines += ["## Runs", "", runs_display(table).to_markdown(index=False), ""]
    write_text_atomic(path, "\n".join(lines))
    return path


def make_plots(
    runs: list[Run],
    table: pd.DataFrame,
    summary: pd.DataFrame,
    dsc: pd.DataFrame,
    nsd: pd.DataFrame,
    folder: Path,
) -> dict[str, Path | None]:
    """All report plots as PNGs in ``folder``; a value is None when that plot had no data."""
    pngs = {
        "pareto": plots.plot_pareto(summary, table, folder / "pareto.png"),
        "time_breakdown": plots.plot_time_breakdown(
            summary, breakdown_keys(runs), folder / "time_breakdown.png"
        ),
        "per_organ": plots.plot_per_organ(dsc, nsd, folder / "per_organ.png"),
        "curves": plots.plot_curves(runs, folder / "curves.png"),
        "overlays": plots.plot_overlays(runs, folder / "overlays.png"),
    }
    return _drop_stale(pngs, folder)


def _drop_stale(pngs: dict[str, Path | None], folder: Path) -> dict[str, Path | None]:
    for name, path in pngs.items():
        if path is None:  # a plot from an earlier report must not outlive the data it showed
            (folder / f"{name}.png").unlink(missing_ok=True)
    return pngs


def question_tables(every: list[Run], table: pd.DataFrame, summary: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The tables behind the study's three questions (the raw numbers, not yet formatted).

    Args:
        every: all runs, every training-case level.
        table: :func:`~clipseg_bench.study.results.runs_table` of ``every``.
        summary: :func:`~clipseg_bench.study.results.summary_table` of the full-data runs.

    Returns:
        ``{"summary": summary (prompt reliance), "efficiency": val 3D DSC per strategy and training
        cases, "paired": paired differences}``.
    """
    return {
        "summary": summary,
        "efficiency": efficiency_table(table),
        "paired": paired_differences(table, case_scores(every)),
    }


def make_question_plots(questions: dict[str, pd.DataFrame], folder: Path) -> dict[str, Path | None]:
    """The prompt-reliance and data-efficiency plots (None where there is nothing to draw)."""
    pngs = {
        "reliance": plots.plot_reliance(questions["summary"], folder / "reliance.png"),
        "data_efficiency": plots.plot_data_efficiency(
            questions["efficiency"], folder / "data_efficiency.png"
        ),
    }
    return _drop_stale(pngs, folder)


def question_sections(questions: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """The question tables as display tables, by heading (results.md and report.html)."""
    efficiency = questions["efficiency"]
    return {
        "Prompt reliance (val 2D Dice)": reliance_display(questions["summary"]),
        "Data efficiency (val 3D DSC)": efficiency_display(efficiency)
        if efficiency["train_cases"].nunique() > 1
        else pd.DataFrame(),
        "Paired differences (over val case and seed)": paired_display(questions["paired"]),
    }


def _questions_context(questions: dict[str, pd.DataFrame]) -> dict:
    """Each question's HTML table, or None when it has no data."""
    sections = list(question_sections(questions).values())
    names = ("reliance", "efficiency", "paired")
    return {n: _table(df, n) if not df.empty else None for n, df in zip(names, sections)}


def _results_context(
    runs: list[Run], table: pd.DataFrame, summary: pd.DataFrame, dsc: pd.DataFrame, nsd: pd.DataFrame
) -> dict:
    """What the sections about finished runs show (the template skips them when none finished)."""
    parts = breakdown_keys(runs)
    trained = _trained(summary)
    fastest = trained.loc[trained["s_per_epoch_mean"].idxmin()] if len(trained) else None
    finished = table["status"] == FINISHED
    return {
        "summary": _table(summary_display(summary), "summary"),
        "dsc": _table(per_organ_display(dsc), "dsc"),
        "nsd": _table(per_organ_display(nsd), "nsd"),
        **cleanup_context(full_data_runs(runs)),  # the clean-up's gain on the largest training set
        "mem_kinds": sorted({str(k) for k in table.loc[finished, "peak_mem_kind"].dropna()}),
        "gap": explain_gap(summary, parts),
        "strategies": [
            {
                "name": r["strategy"],
                "description": strategy_description(r["strategy"]),
                "explanation": explain_strategy(r, parts, fastest),
            }
            for _, r in summary.iterrows()
        ],
    }


def _provenance_context(runs: list[Run]) -> dict:
    """Commits, hardware and settings of the runs, with a warning where they make runs incomparable."""
    git, hw = _provenance(runs)
    diff, shared = config_tables(runs)
    warnings = []
    if len(git) > 1 or git["dirty"].any():
        warnings.append("runs come from more than one commit or from uncommitted code")
    if len(hw) > 1:
        warnings.append("runs ran on different hardware, so their timings are not directly comparable")
    return {
        "warnings": warnings,
        "code": _table(git, "code"),
        "hardware": _table(hw, "hardware"),
        "differing": _table(diff, "differing") if diff.shape[1] > 1 else None,  # "run" alone: none differ
        "shared": _table(shared, "shared"),
    }


def render_html(
    *,
    runs: list[Run],
    table: pd.DataFrame,
    summary: pd.DataFrame,
    dsc: pd.DataFrame,
    nsd: pd.DataFrame,
    pngs: dict[str, Path | None],
    sources: list[Path],
    questions: dict[str, pd.DataFrame] | None = None,
) -> str:
    """The whole report as one HTML string (images inline), from ``templates/report.html.j2``.

    Args:
        runs, table: every run (listed, provenance); ``summary``, ``dsc`` and ``nsd`` describe
            the runs on the largest training set.
        questions: :func:`question_tables`, for the reliance, data-efficiency and paired sections.
    """
    unfinished = ["" if s == FINISHED else "unfinished" for s in table["status"]]
    return _TEMPLATES.get_template("report.html.j2").render(
        n_runs=len(table),
        n_finished=int((table["status"] == FINISHED).sum()),
        sources=sources,
        excluded=_excluded_note(table),
        no_val=no_val_note(table),
        results=None if summary.empty else _results_context(runs, table, summary, dsc, nsd),
        figures={name: _figure(path) for name, path in pngs.items()},
        study=_table(ORIGINAL_STUDY, "study"),
        all_runs=_table(runs_display(table), "runs", unfinished),
        audit=_table(audit_display(runs), "audit"),
        provenance=_provenance_context(runs),
        questions=None if questions is None or summary.empty else _questions_context(questions),
        data_axis=_has_data_axis(table),
    )


REPORT_FORMAT = "clipseg-bench-report/1"  # marks an --out folder the report wrote into


def _ours(folder: Path) -> bool:
    """A folder the report may write into: a BENCH folder (or its runs/), or one a report marked."""
    return (
        is_bench_folder(folder)
        or (folder / "runs").is_dir()
        or any((d / "run.json").is_file() for d in folder.iterdir() if d.is_dir())
        or folder_format(folder, REPORT_FORMAT) == REPORT_FORMAT
    )


def write_report(bench_dirs: list[Path], out: Path | None = None, *, overwrite: bool = False) -> Path:
    """Write results.csv, results.md, plots/*.png and report.html for one benchmark.

    Args:
        bench_dirs: BENCH folders; several are shards of one benchmark and are merged
            (see :func:`clipseg_bench.study.results.merge_runs`).
        out: folder to write into (default: the first BENCH folder). Another folder must be new,
            empty, or one an earlier report wrote into, unless ``overwrite``.
        overwrite: write into a non-empty ``out`` that is not ours.

    Returns:
        Path of report.html.

    Raises:
        InputError: a folder is absent or has no runs, a run file is unreadable, two shards
            disagree about the same finished run, or ``out`` cannot or may not be written.
    """
    bench_dirs = [Path(b) for b in bench_dirs]
    every = read_bench(bench_dirs)
    for run in every:  # the plots read these later: a bad one must refuse before the first write
        if run.finished and run.samples is not None:
            plots.load_samples(run.samples)
    out = Path(out) if out is not None else bench_dirs[0]
    check_output_folder(out, command="report", ours=_ours, overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    if not _ours(out):
        mark_folder(out, REPORT_FORMAT)
    table = runs_table(every)
    with replacing(out / "results.csv") as tmp:
        table.to_csv(tmp, index=False)
    # The strategy tables and plots describe the largest training set; the data axis has its own.
    runs = full_data_runs(every)
    main = runs_table(runs)
    summary = summary_table(main)
    with replacing(out / "results_summary.csv") as tmp:
        summary.to_csv(tmp, index=False)
    dsc, nsd = per_organ_table(main, "dsc"), per_organ_table(main, "nsd")
    questions = question_tables(every, table, summary)
    write_markdown(out / "results.md", summary, dsc, nsd, table, runs, sections=question_sections(questions))
    pngs = make_plots(runs, main, summary, dsc, nsd, out / "plots")
    pngs.update(make_question_plots(questions, out / "plots"))
    report = out / "report.html"
    html = render_html(
        runs=every,
        table=table,
        summary=summary,
        dsc=dsc,
        nsd=nsd,
        pngs=pngs,
        sources=bench_dirs,
        questions=questions,
    )
    write_text_atomic(report, html)
    return report
