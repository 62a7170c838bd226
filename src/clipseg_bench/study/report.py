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

from clipseg_bench.errors import FieldError, InputError
from clipseg_bench.provenance import (
    check_output_folder,
    folder_format,
    mark_folder,
    output_lock,
    replacing,
    write_json_atomic,
    write_text_atomic,
)
from clipseg_bench.study import evidence, plots, stats
from clipseg_bench.study.results import (
    ALL_CASES,
    FINISHED,
    VARIANT_PREFIX,
    Run,
    audit_cells,
    base_strategy,
    breakdown_keys,
    case_scores,
    case_summary_table,
    cleanup_gain_table,
    efficiency_table,
    full_data_runs,
    is_bench_folder,
    organ_map_table,
    organ_scores,
    organ_summary_table,
    paired_differences,
    pool_folds,
    prompt_confusion_table,
    ranking_table,
    read_bench,
    runs_table,
    summary_table,
)
from clipseg_bench.study.sweep import sweep_display, sweep_table

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


def summary_display(summary: pd.DataFrame, over_cases: pd.DataFrame | None = None) -> pd.DataFrame:
    """The study's table extended with 3D scores and costs, as strings. Every ± says what it is
    over: run-level numbers are mean ± sd over seeds; the 3D scores are the mean over val cases with
    its 95% interval over cases, and their sd over seeds in a column of its own.

    Args:
        summary: :func:`~clipseg_bench.study.results.summary_table` (one row per strategy).
        over_cases: :func:`~clipseg_bench.study.results.case_summary_table` rows of the same
            training-case level (None: the 3D columns are left empty).
    """
    tmax = float(summary["train_time_s_mean"].max()) if len(summary) else 0.0
    div, unit = plots.time_unit(tmax)
    cases = over_cases if over_cases is not None else pd.DataFrame(columns=["strategy", "metric"])

    def case_row(strategy: str, metric: str):
        g = cases[(cases["strategy"] == strategy) & (cases["metric"] == metric)]
        return g.iloc[0] if len(g) else None

    rows = []
    for _, r in summary.iterrows():
        dsc = case_row(r["strategy"], "dsc")
        dsc_text, dsc_sd = evidence.over_cases_cells(dsc)
        nsd_text, nsd_sd = evidence.over_cases_cells(case_row(r["strategy"], "nsd"))
        present, _ = evidence.over_cases_cells(case_row(r["strategy"], "dsc_present"))
        rows.append(
            {
                "Strategy": r["strategy"],
                "Seeds": r["n_seeds"],
                "Val cases": "–" if dsc is None else dsc["n_cases"],
                "Trainable params": _fmt_params(
                    r["trainable_params_mean"], r["trainable_params_std"], r["total_params_mean"]
                ),
                "Train Dice ± sd(seeds)": fmt_pm(r["train_dice_mean"], r["train_dice_std"], 4),
                "Val Dice ± sd(seeds)": fmt_pm(r["val_dice_mean"], r["val_dice_std"], 4),
                "FP slice rate ± sd(seeds)": fmt_pm(
                    r.get("fp_slice_rate_mean"), r.get("fp_slice_rate_std"), 3
                ),
                "Val 3D DSC [95% CI over cases]": dsc_text,
                "3D DSC sd(seeds)": dsc_sd,
                "Val NSD [95% CI over cases]": nsd_text,
                "NSD sd(seeds)": nsd_sd,
                "3D DSC, organs present [95% CI]": present,
                f"Training time ({unit}) ± sd(seeds)": fmt_pm(
                    r["train_time_s_mean"] / div, r["train_time_s_std"] / div, 2
                ),
                f"Training CPU time ({unit}) ± sd(seeds)": fmt_pm(
                    r.get("train_cpu_s_mean", float("nan")) / div,
                    r.get("train_cpu_s_std", float("nan")) / div,
                    2,
                ),
                "Steady step (ms) ± sd(seeds)": fmt_pm(
                    r.get("step_time_s_mean", float("nan")) * 1e3,
                    r.get("step_time_s_std", float("nan")) * 1e3,
                    1,
                ),
                "s/epoch ± sd(seeds)": fmt_pm(r["s_per_epoch_mean"], r["s_per_epoch_std"], 3),
                "Peak memory (MB) ± sd(seeds)": fmt_pm(r["peak_mem_mb_mean"], r["peak_mem_mb_std"], 1),
            }
        )
    return pd.DataFrame(rows)


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
    if "fold" in table and table["fold"].notna().any():
        cases["Scored on"] = table["scored_on"]
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
    """Per strategy, mean ± sd over seeds (3 decimals): where the masks for each organ's name land
    (organ means of the prompt-confusion matrix: follows, ignores, the normalised reliance), the
    older pair-weighted numbers (val 2D Dice with the right prompt, with a wrong organ's name, their
    difference) and val 2D Dice under each rewording. Strategies evaluated before the reliance
    scores existed are left out; the confusion-matrix columns are empty for runs evaluated before
    it (``–``)."""
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
            "Reliance (0-1)": fmt_pm(
                r.get("prompt_reliance_norm_mean"), r.get("prompt_reliance_norm_std"), 3
            ),
            "Follows": fmt_pm(r.get("prompt_follows_mean"), r.get("prompt_follows_std"), 3),
            "Ignores": fmt_pm(r.get("prompt_ignores_mean"), r.get("prompt_ignores_std"), 3),
            "Right prompt": fmt_pm(r["val_dice_mean"], r["val_dice_std"], 3),
            "Wrong organ's name": fmt_pm(r["dice2d_wrong_prompt_mean"], r["dice2d_wrong_prompt_std"], 3),
            "Prompt reliance": fmt_pm(r["prompt_reliance_mean"], r["prompt_reliance_std"], 3),
        }
        for v in variants:
            row[f"Wording: {v[len(VARIANT_PREFIX) :]}"] = fmt_pm(r[f"{v}_mean"], r[f"{v}_std"], 3)
        out.append(row)
    return pd.DataFrame(out)


def efficiency_display(efficiency: pd.DataFrame) -> pd.DataFrame:
    """Strategies as rows, training-case counts as columns: val 3D DSC as the mean over val cases
    [95% CI over cases] and its sd over seeds (``mean ± sd over seeds`` for runs without per-case
    scores)."""
    labels = _cases_order(efficiency["train_cases"])
    out = []
    for strategy in dict.fromkeys(efficiency["strategy"]):
        g = efficiency[efficiency["strategy"] == strategy].set_index("train_cases")
        row = {"Strategy": strategy}
        for label in labels:
            n = efficiency.loc[efficiency["train_cases"] == label, "n_train_cases"].max()
            head = f"all ({n:.0f}) cases" if label == ALL_CASES and _finite(n) else f"{label} cases"
            row["1 case" if label == "1" else head] = (
                _efficiency_cell(g.loc[label]) if label in g.index else "–"
            )
        out.append(row)
    return pd.DataFrame(out)


def _efficiency_cell(r: pd.Series) -> str:
    if not _finite(r.get("ci_low")):
        return fmt_pm(r["mean"], r["std"], 3) + " (sd over seeds)"
    return f"{evidence.fmt_ci(r['mean'], r['ci_low'], r['ci_high'], 3)}; sd(seeds) {evidence.num(r['std'], '.3f')}"


def choices_display(choices: list[dict]) -> pd.DataFrame:
    """The clean-up choices (:func:`~clipseg_bench.study.choices.postprocess_choices`): per strategy
    the organs that get ``lcc`` with their mean gain, and the data the choice was made on."""
    rows = []
    for c in choices:
        on = c["chosen_on"]
        lcc = [f"{k} ({c['gain'][k]:+.3f})" for k, m in c["organs"].items() if m == "lcc"]
        rows.append(
            {
                "Strategy": c["strategy"],
                "Training cases": c["train_cases"],
                f"lcc for (mean {c['metric'].upper()} gain)": ", ".join(lcc) or "no organ",
                "Chosen on": f"{len(on['cases'])} out-of-fold cases (folds "
                f"{','.join(map(str, on['folds']))}; seeds {','.join(map(str, on['seeds']))})",
            }
        )
    return pd.DataFrame(rows)


def scores_note(runs: list[Run]) -> str:
    """Which split every score of the report comes from: the val split of one train/val split,
    pooled out of fold over K folds, or the held-out test split (with the clean-up it was scored with)."""
    done = [r for r in runs if r.finished and (r.metrics or {}).get("cases")]
    if not done:
        return ""

    def n_cases(rs) -> int:
        return len({c for r in rs for c in r.metrics["cases"]})

    folded, plain = [r for r in done if r.fold is not None], [r for r in done if r.fold is None]
    if done[0].split == "test":
        modes = sorted({str(r.metrics.get("postprocess", "none")) for r in done})
        return (
            f"Every score is from the held-out test split ({n_cases(done)} cases), which no training, "
            "tuning or choice read"
            + ("; with folds, a case's score is the mean over the fold models' scores" if folded else "")
            + f". 3D clean-up of these scores: {', '.join(modes)}"
            + (" (per organ, as chosen on out-of-fold scores)" if "auto" in modes else "")
            + ". 'Val' in the tables below means these test scores."
        )
    parts = []
    if folded:
        k = max(int(r.info.get("folds") or 0) for r in folded)
        parts.append(
            f"Scores are pooled out of fold over {k} folds: each of the {n_cases(folded)} labelled non-test "
            "cases is scored once per strategy and seed, by the run that did not train on it ('Val' in the "
            "tables means these out-of-fold scores)."
        )
    if plain:
        parts.append(f"Scores are from the val split of one train/val split ({n_cases(plain)} cases).")
    return " ".join(parts)


# --- explanations ----------------------------------------------------------------------------


def strategy_description(name: str) -> str:
    """The strategy's one-sentence description from the registry; empty for a name it does not know
    (a run of a strategy this install lacks)."""
    # Imported on use: the registry imports torch and every strategy (peft), ~1.5 s that reading
    # result files does not otherwise need.
    from clipseg_bench.strategies import get

    try:
        return get(base_strategy(name)).description.strip()  # an arm's: its strategy's
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


def _spread(a: pd.Series, b: pd.Series, column: str) -> float:
    """sqrt(sd_a² + sd_b²) of a ``<column>_std`` over seeds: NaN unless both ran two seeds or more."""
    sds = [r.get(f"{column}_std") for r in (a, b)]
    if min(a["n_seeds"], b["n_seeds"]) < 2 or not all(_finite(x) for x in sds):
        return math.nan
    return math.hypot(*sds)


def explain_gap(summary: pd.DataFrame, parts: list[str]) -> str:
    """The slowest trained strategy against the fastest: their times, and the per-part differences.

    A part is said to account for most of the gap only when its difference is more than half the
    gap and more than twice its spread over seeds (sqrt of the two sds squared, each over two or
    more seeds); otherwise the per-part differences are listed without a claim.
    """
    trained = _trained(summary)
    if len(trained) < 2:
        return ""
    fast = trained.loc[trained["train_time_s_mean"].idxmin()]
    slow = trained.loc[trained["train_time_s_mean"].idxmax()]
    gap = slow["train_time_s_mean"] - fast["train_time_s_mean"]
    text = (
        f"The fastest trained strategy is {fast['strategy']} ({fast['train_time_s_mean']:.1f} s per run), the "
        f"slowest {slow['strategy']} ({slow['train_time_s_mean']:.1f} s, "
        f"{slow['train_time_s_mean'] / fast['train_time_s_mean']:.1f}×; means over seeds)."
    )
    diffs = {p: v - _parts(fast, parts).get(p, 0.0) for p, v in _parts(slow, parts).items()}
    if not diffs or gap <= 0:
        return text
    listed = ", ".join(f"{p} {d:+.1f} s" for p, d in diffs.items())
    text += f" Per part, {slow['strategy']} minus {fast['strategy']}: {listed}."
    top = max(diffs, key=diffs.get)
    spread = _spread(slow, fast, f"time_{top}_s")
    if diffs[top] > gap / 2 and _finite(spread) and diffs[top] > 2 * spread:
        text += (
            f" Most of the {gap:.1f} s gap is {top} time: {diffs[top]:.1f} s, more than twice its spread "
            f"over seeds ({spread:.2f} s)."
        )
    elif not _finite(spread):
        text += " With one seed there is no spread to judge these differences by."
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

    ``out``, ``strategy``, ``seed``, ``train_cases`` and ``fold`` are left out: the run's name already
    says them.
    """
    flat = [_flatten(r.config) for r in runs]
    keys = sorted({k for f in flat for k in f} - {"out", "strategy", "seed", "train_cases", "fold"})
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
                gain_display(long).to_markdown(index=False, disable_numparse=True),
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
    over_cases: pd.DataFrame | None = None,
    findings: list[dict] | None = None,
    scores: str = "",
) -> Path:
    """results.md: the findings, the aggregate table and the per-organ tables, in Markdown.

    Args:
        dsc, nsd: :func:`~clipseg_bench.study.results.organ_summary_table` rows of the largest
            training set.
        sections: more tables (heading -> display table) placed before the list of runs; empty
            tables are left out.
        over_cases: :func:`~clipseg_bench.study.results.case_summary_table` rows of the largest
            training set (the 3D columns of the strategy table).
        findings: :func:`~clipseg_bench.study.evidence.findings`, placed first.
        scores: :func:`scores_note`, which split the scores come from (placed before the findings).
    """
    lines = ["# clipseg-bench results", ""] + ([f"> {scores}", ""] if scores else [])
    if findings:
        lines += ["## Findings", ""] + evidence.findings_markdown(findings)
    lines += [WHAT_SPREADS_MEAN, ""]
    for note in (_excluded_note(table), no_val_note(table)):
        if note:
            lines += [f"> {note}", ""]
    if summary.empty:
        lines += ["No finished runs yet.", ""]
    else:
        lines += [
            "## Strategies",
            "",
            summary_display(summary, over_cases).to_markdown(index=False, disable_numparse=True),
            "",
        ]
        lines += [
            "## Per-organ val 3D DSC",
            "",
            evidence.per_organ_display(dsc).to_markdown(index=False, disable_numparse=True),
            "",
        ]
        lines += [
            "## Per-organ val NSD",
            "",
            evidence.per_organ_display(nsd).to_markdown(index=False, disable_numparse=True),
            "",
        ]
        lines += cleanup_markdown(runs)
    for heading, df in (sections or {}).items():
        if not df.empty:
            lines += [f"## {heading}", "", df.to_markdown(index=False, disable_numparse=True), ""]
    lines += ["## Runs", "", runs_display(table).to_markdown(index=False, disable_numparse=True), ""]
    write_text_atomic(path, "\n".join(lines))
    return path


WHAT_SPREADS_MEAN = (
    "Finished runs only. `mean ± sd(seeds)`: mean and sample sd (ddof=1) over seeds of a per-run number "
    "(`± –`: a single seed). `mean [95% CI]`: mean over val cases (each case's seeds averaged first) with "
    "its 95% bootstrap interval over cases; the case, not the seed, is the unit."
)


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


def question_tables(
    every: list[Run],
    table: pd.DataFrame,
    summary: pd.DataFrame,
    *,
    margin: float = stats.EQUIVALENCE_MARGIN,
) -> dict:
    """The tables behind the study's questions (the raw numbers, not yet formatted).

    Args:
        every: all runs, every training-case level.
        table: :func:`~clipseg_bench.study.results.runs_table` of ``every``.
        summary: :func:`~clipseg_bench.study.results.summary_table` of the full-data runs.
        margin: the equivalence margin of the verdicts.

    Returns:
        ``summary`` (prompt reliance), ``efficiency`` (val 3D DSC per strategy and training cases),
        ``paired`` (paired.csv), ``ranking`` (ranking.csv), ``organ_map`` (organ_map.csv),
        ``over_cases`` (means over cases with intervals, every level), ``organs_dsc``/``organs_nsd``
        (per organ, every level), ``level`` (the largest training set's label), ``margin`` and
        ``findings``.
    """
    scores, organs = case_scores(every), organ_scores(every)
    confusion = prompt_confusion_table(every)
    over_cases = case_summary_table(scores)
    paired = paired_differences(table, scores, margin=margin)
    ranking = ranking_table(scores)
    full = full_data_runs(every)
    return {
        "summary": summary,
        "efficiency": _efficiency_with_cases(efficiency_table(table), over_cases),
        "paired": paired,
        "ranking": ranking,
        "organ_map": organ_map_table(table, organs, margin=margin),
        "over_cases": over_cases,
        "organs_dsc": organ_summary_table(organs, "dsc"),
        "organs_nsd": organ_summary_table(organs, "nsd"),
        "confusion": confusion,
        "level": full[0].train_cases_label if full else ALL_CASES,
        "margin": margin,
        "findings": evidence.findings(paired, ranking, margin),
    }


def _efficiency_with_cases(efficiency: pd.DataFrame, over_cases: pd.DataFrame) -> pd.DataFrame:
    """The efficiency table with each cell's mean over cases and 95% interval over cases (DSC)."""
    dsc = over_cases[over_cases["metric"] == "dsc"][
        ["strategy", "train_cases", "n_cases", "ci_low", "ci_high"]
    ]
    return efficiency.merge(dsc, on=["strategy", "train_cases"], how="left")


def at_level(df: pd.DataFrame, level: str) -> pd.DataFrame:
    """The rows of one training-case level."""
    return df[df["train_cases"] == level].reset_index(drop=True)


def make_question_plots(questions: dict, folder: Path) -> dict[str, Path | None]:
    """The prompt-reliance, data-efficiency, ranking and per-organ map plots (None: nothing to draw)."""
    level = questions["level"]
    pngs = {
        "reliance": plots.plot_reliance(questions["summary"], folder / "reliance.png"),
        "prompt_confusion": plots.plot_prompt_confusion(
            at_level(questions["confusion"], level), folder / "prompt_confusion.png"
        ),
        "data_efficiency": plots.plot_data_efficiency(
            questions["efficiency"], folder / "data_efficiency.png"
        ),
        "ranking": plots.plot_ranking(at_level(questions["ranking"], level), folder / "ranking.png"),
        "organ_map": plots.plot_organ_map(at_level(questions["organ_map"], level), folder / "organ_map.png"),
    }
    return _drop_stale(pngs, folder)


def question_sections(questions: dict) -> dict[str, pd.DataFrame]:
    """The question tables as display tables, by heading (results.md and report.html)."""
    efficiency = questions["efficiency"]
    return {
        "Prompt reliance": reliance_display(questions["summary"]),
        "Data efficiency (val 3D DSC)": efficiency_display(efficiency)
        if efficiency["train_cases"].nunique() > 1
        else pd.DataFrame(),
        "Paired differences (over val cases, Holm-corrected)": evidence.paired_display(questions["paired"]),
        "Ranking stability (bootstrap over val cases)": evidence.ranking_display(questions["ranking"]),
        "Per-organ verdicts (Holm over each map)": evidence.organ_verdicts_display(questions["organ_map"]),
    }


def _questions_context(questions: dict) -> dict:
    """Each question's HTML table, or None when it has no data; the margin and the map's size."""
    sections = list(question_sections(questions).values())
    names = ("reliance", "efficiency", "paired", "ranking", "organ_verdicts")
    out = {n: _table(df, n) if not df.empty else None for n, df in zip(names, sections)}
    organ_map = at_level(questions["organ_map"], questions["level"])
    return {
        **out,
        "margin": questions["margin"],
        "organ_tests": int((organ_map["metric"] == "dsc").sum()),
        "has_organ_map": not organ_map.empty,
    }


def _results_context(
    runs: list[Run],
    table: pd.DataFrame,
    summary: pd.DataFrame,
    dsc: pd.DataFrame,
    nsd: pd.DataFrame,
    over_cases: pd.DataFrame | None = None,
) -> dict:
    """What the sections about finished runs show (the template skips them when none finished)."""
    parts = breakdown_keys(runs)
    trained = _trained(summary)
    fastest = trained.loc[trained["s_per_epoch_mean"].idxmin()] if len(trained) else None
    finished = table["status"] == FINISHED
    return {
        "summary": _table(summary_display(summary, over_cases), "summary"),
        "dsc": _table(evidence.per_organ_display(dsc), "dsc"),
        "nsd": _table(evidence.per_organ_display(nsd), "nsd"),
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
    questions: dict | None = None,
    scores: str = "",
    choices: pd.DataFrame | None = None,
    lr_sweep: pd.DataFrame | None = None,
) -> str:
    """The whole report as one HTML string (images inline), from ``templates/report.html.j2``.

    Args:
        runs, table: every run (listed, provenance); ``summary``, ``dsc`` and ``nsd`` describe
            the runs on the largest training set.
        questions: :func:`question_tables`, for the findings, the reliance, data-efficiency,
            paired, ranking and per-organ sections.
        scores: :func:`scores_note`; choices: :func:`choices_display` (None or empty: no section).
        lr_sweep: :func:`~clipseg_bench.study.sweep.sweep_display` (None or empty: no section).
    """
    unfinished = ["" if s == FINISHED else "unfinished" for s in table["status"]]
    over_cases = None if questions is None else at_level(questions["over_cases"], questions["level"])
    return _TEMPLATES.get_template("report.html.j2").render(
        n_runs=len(table),
        n_finished=int((table["status"] == FINISHED).sum()),
        sources=sources,
        scores=scores,
        choices=_table(choices, "choices") if choices is not None and not choices.empty else None,
        lr_sweep=_table(lr_sweep, "lr_sweep") if lr_sweep is not None and not lr_sweep.empty else None,
        findings=[] if questions is None else questions["findings"],
        excluded=_excluded_note(table),
        no_val=no_val_note(table),
        results=None if summary.empty else _results_context(runs, table, summary, dsc, nsd, over_cases),
        figures={name: _figure(path) for name, path in pngs.items()},
        study=_table(ORIGINAL_STUDY, "study"),
        all_runs=_table(runs_display(table), "runs", unfinished),
        audit=_table(audit_display(runs), "audit"),
        provenance=_provenance_context(runs),
        questions=None if questions is None or summary.empty else _questions_context(questions),
        data_axis=_has_data_axis(table),
        min_cases=stats.MIN_CASES,
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


def csv_tables(runs: list[Run], summary: pd.DataFrame, questions: dict) -> dict[str, pd.DataFrame]:
    """Every table the report shows, as the CSV files written beside report.html (file -> table).

    The statistics come as raw numbers (paired.csv, ranking.csv, organ_map.csv, over_cases.csv,
    per_organ.csv, efficiency.csv, cleanup.csv); the others as shown. results.csv (every run) and
    results_summary.csv (means and sds over seeds) are written first, by :func:`write_report`.
    """
    git, hw = _provenance(runs)
    diff, shared = config_tables(runs)
    full = full_data_runs(runs)
    cleanup = [cleanup_gain_table(full, m).assign(metric=m) for m in ("dsc", "nsd")]
    reliance = [c for c in summary.columns if c.startswith(("prompt_", "dice2d_", "val_dice"))]
    return {
        "over_cases.csv": questions["over_cases"],
        "per_organ.csv": pd.concat(
            [questions["organs_dsc"].assign(metric="dsc"), questions["organs_nsd"].assign(metric="nsd")],
            ignore_index=True,
        ),
        "paired.csv": questions["paired"],
        "ranking.csv": questions["ranking"],
        "organ_map.csv": questions["organ_map"],
        "efficiency.csv": questions["efficiency"],
        "reliance.csv": summary.reindex(columns=["strategy", "n_seeds", *reliance]),
        "prompt_confusion.csv": questions["confusion"],
        "cleanup.csv": pd.concat(cleanup, ignore_index=True),
        "audit.csv": audit_display(runs),
        "provenance_code.csv": git,
        "provenance_hardware.csv": hw,
        "settings_differing.csv": diff,
        "settings_shared.csv": shared,
    }


TEST_REPORT = "test_report"  # where `report --split test` writes by default, inside the first BENCH
CHOICES = "choices.json"  # beside the report: every data-driven choice it shows, with its data
CHOICES_HEADING = "3D clean-up chosen on out-of-fold scores (--postprocess auto)"


def write_report(
    bench_dirs: list[Path],
    out: Path | None = None,
    *,
    overwrite: bool = False,
    equivalence_margin: float = stats.EQUIVALENCE_MARGIN,
    split: str = "val",
) -> Path:
    """Write results.csv, results.md, the tables' CSVs, plots/*.png and report.html for one benchmark.

    With runs on folds, every table pools each (strategy, seed)'s folds: its scores cover every
    labelled non-test case once, out of fold (:func:`~clipseg_bench.study.results.pool_folds`,
    :func:`~clipseg_bench.study.results.case_scores`); results.csv keeps one row per run. The page
    says which split its scores come from (:func:`scores_note`). On the val split, the per-organ
    clean-up chosen on the out-of-fold scores is shown and written to choices.json.

    Args:
        bench_dirs: BENCH folders; several are shards of one benchmark and are merged
            (see :func:`clipseg_bench.study.results.merge_runs`).
        out: folder to write into (default: the first BENCH folder; for the test split its
            ``test_report/``). Another folder must be new, empty, or one an earlier report wrote
            into, unless ``overwrite``.
        overwrite: write into a non-empty ``out`` that is not ours.
        equivalence_margin: the margin (DSC and NSD units) within which two strategies can be
            shown equivalent; recorded in paired.csv and the report.
        split: "val" (metrics.json: the val split, or out of fold with folds) or "test"
            (metrics-test.json: the held-out test split).

    Returns:
        Path of report.html.

    Raises:
        InputError: a folder is absent or has no runs, a run file is unreadable, two shards
            disagree about the same finished run, a case is scored twice, ``out`` cannot or may not
            be written, the margin is not in (0, 1), or the split is neither val nor test.
    """
    if not (0 < equivalence_margin < 1):
        raise FieldError(
            "equivalence_margin", f"must be between 0 and 1 (a DSC difference), got {equivalence_margin}"
        )
    if split not in ("val", "test"):
        raise FieldError("split", f"must be val or test, got {split!r}")
    bench_dirs = [Path(b) for b in bench_dirs]
    every = read_bench(bench_dirs, split)
    for run in every:  # the plots read these later: a bad one must refuse before the first write
        if run.finished and run.samples is not None:
            plots.load_samples(run.samples)
    table = runs_table(every)
    # A seed's runs on the K folds count as one run whose scores cover every case (pool_folds).
    pooled = pool_folds(table)
    # The strategy tables and plots describe the largest training set; the data axis has its own.
    summary = summary_table(pool_folds(runs_table(full_data_runs(every))))
    questions = question_tables(every, pooled, summary, margin=equivalence_margin)  # refuses a case twice
    choices = _choices(every) if split == "val" else None
    out = Path(out) if out is not None else bench_dirs[0] / ("" if split == "val" else TEST_REPORT)
    check_output_folder(out, command="report", ours=_ours, overwrite=overwrite)
    with output_lock(out, "report"):  # a second `report` into this folder is refused while this one writes
        tables = {"table": table, "pooled": pooled, "summary": summary, "questions": questions}
        return _write(out, every, bench_dirs, **tables, choices=choices)


def _write(
    out: Path,
    every: list[Run],
    bench_dirs: list[Path],
    *,
    table: pd.DataFrame,
    pooled: pd.DataFrame,
    summary: pd.DataFrame,
    questions: dict,
    choices: tuple[list[dict], list[dict]] | None,
) -> Path:
    """Write the report's files into ``out`` (locked; every table computed before); returns report.html.

    Args:
        table: one row per run; pooled: each seed's folds pooled; summary, questions: the strategy
            tables and the study's questions (:func:`question_tables`); choices: the clean-up
            choices, None off folds or on the test split.
    """
    if not _ours(out):
        mark_folder(out, REPORT_FORMAT)
    with replacing(out / "results.csv") as tmp:
        table.to_csv(tmp, index=False)
    with replacing(out / "results_summary.csv") as tmp:
        summary.to_csv(tmp, index=False)
    for name, df in csv_tables(every, summary, questions).items():
        with replacing(out / name) as tmp:
            df.to_csv(tmp, index=False)
    if choices is not None:
        write_choices_file(out / CHOICES, *choices)
    return _write_pages(out, every, table, summary, questions, bench_dirs, choices)


def _write_pages(
    out: Path,
    every: list[Run],
    table: pd.DataFrame,
    summary: pd.DataFrame,
    questions: dict,
    sources: list[Path],
    choices: tuple[list[dict], list[dict]] | None = None,
) -> Path:
    """results.md, plots/*.png and report.html (the last file written); returns report.html's path.

    Args:
        table: one row per run (results.csv); the plots pool each seed's folds themselves.
    """
    runs = full_data_runs(every)
    level = questions["level"]
    dsc, nsd = at_level(questions["organs_dsc"], level), at_level(questions["organs_nsd"], level)
    sections = question_sections(questions)
    shown = None if choices is None else choices_display(choices[0])
    if shown is not None:
        sections[CHOICES_HEADING] = shown
    scores = scores_note(every)
    sections[SWEEP_HEADING] = sweep_display(sweep_table(sources), _runs_time(table))
    write_markdown(
        out / "results.md",
        summary,
        dsc,
        nsd,
        table,
        runs,
        sections=sections,
        over_cases=at_level(questions["over_cases"], level),
        findings=questions["findings"],
        scores=scores,
    )
    pngs = make_plots(runs, pool_folds(runs_table(runs)), summary, dsc, nsd, out / "plots")
    pngs.update(make_question_plots(questions, out / "plots"))
    swept = sweep_table(sources)
    pngs.update(
        _drop_stale({"lr_sweep": plots.plot_lr_sweep(swept, out / "plots" / "lr_sweep.png")}, out / "plots")
    )
    html = render_html(
        runs=every,
        table=table,
        summary=summary,
        dsc=dsc,
        nsd=nsd,
        pngs=pngs,
        sources=sources,
        questions=questions,
        scores=scores,
        choices=shown,
        lr_sweep=sections[SWEEP_HEADING],
    )
    write_text_atomic(out / "report.html", html)
    return out / "report.html"


SWEEP_HEADING = "Learning-rate sweep (chosen on tune cases the report never scores)"


def _runs_time(table: pd.DataFrame) -> dict[str, float]:
    """Per strategy, the summed training time of its finished runs (every seed, fold and size)."""
    done = table[table["status"] == FINISHED]
    return {str(k): float(v) for k, v in done.groupby("strategy")["train_time_s"].sum().items()}


def _choices(runs: list[Run]) -> tuple[list[dict], list[dict]] | None:
    """The clean-up choices of runs on folds (None when no run is on a fold: nothing to choose on)."""
    from clipseg_bench.study.choices import postprocess_choices

    if not any(r.fold is not None for r in runs):
        return None
    return postprocess_choices(runs)


def write_choices_file(path: Path, choices: list[dict], skipped: list[dict]) -> None:
    """choices.json beside the report: the clean-up choices with the data each was made on."""
    from clipseg_bench.study.choices import RULE

    write_json_atomic(path, {"postprocess": {"rule": RULE, "choices": choices, "skipped": skipped}})
