"""What the report says about differences, rankings and spreads: tables as text, and the findings.

Every number comes from :mod:`clipseg_bench.study.results` (which applies
:mod:`clipseg_bench.study.stats`); this module only formats them and writes the sentences that open
the report. A sentence may state a difference only where the paired table holds a verdict for it
("higher", "lower", "equivalent" after Holm's correction, with its interval and number of cases);
everything else is said to be inconclusive or untested.
"""

from __future__ import annotations

import math

import pandas as pd

from clipseg_bench.organs import ORGANS
from clipseg_bench.study import stats
from clipseg_bench.study.results import ALL_CASES

METRIC_NAMES = {"dsc": "val 3D DSC", "nsd": "val NSD", "dsc_present": "val 3D DSC (organs present)"}
FAMILY_NAMES = {
    "vs untrained": "against the untrained baseline",
    "trained pairs": "between trained strategies",
    "across models": "the same strategy across models",
}


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def num(x, fmt: str) -> str:
    """``format(x, fmt)``, or ``–`` for a missing value."""
    return format(x, fmt) if _finite(x) else "–"


def fmt_ci(mean: float, low: float, high: float, digits: int, sign: str = "") -> str:
    """``mean [low, high]`` with fixed decimals (``sign="+"`` for differences); ``–`` without a mean."""
    if not _finite(mean):
        return "–"
    f = f"{sign}.{digits}f"
    return f"{mean:{f}} [{num(low, f)}, {num(high, f)}]"


def cases_label(level: str) -> str:
    """A training-case level as words: ``all training cases``, ``1 training case``, ``5 training cases``."""
    if level == ALL_CASES:
        return "all training cases"
    return f"{level} training case{'' if str(level) == '1' else 's'}"


# --- tables as text -----------------------------------------------------------------------------


def _comparison_columns(rows: pd.DataFrame, levels: bool) -> dict:
    """The columns every table of comparisons starts with: level, metric, comparison, cases, and the
    mean difference over cases with its 95% interval over cases."""
    return {
        **({"Training cases": rows["train_cases"]} if levels else {}),
        "Metric": rows["metric"].map(METRIC_NAMES),
        "Comparison": [f"{s} − {r}" for s, r in zip(rows["strategy"], rows["reference"])],
        "Cases": rows["n_cases"],
        "Mean difference [95% CI over cases]": [
            fmt_ci(m, lo, hi, 4, "+") for m, lo, hi in zip(rows["mean"], rows["ci_low"], rows["ci_high"])
        ],
    }


def paired_display(paired: pd.DataFrame) -> pd.DataFrame:
    """paired.csv as text: per comparison the mean difference over cases with its 95% interval over
    cases, the raw and Holm-adjusted Wilcoxon p, the equivalence p, and the verdict."""
    return pd.DataFrame(
        {
            **_comparison_columns(paired, (paired["train_cases"] != ALL_CASES).any()),
            "Family": paired["family"],
            "Seeds": [f"{a} / {b}" for a, b in zip(paired["n_seeds"], paired["n_seeds_reference"])],
            "Wilcoxon p": [num(x, ".3g") for x in paired["p_value"]],
            "Holm p": [num(x, ".3g") for x in paired["p_adjusted"]],
            "Equivalence p (Holm)": [num(x, ".3g") for x in paired["p_equivalence_adjusted"]],
            "Verdict": paired["verdict"],
            "Note": paired["note"],
        }
    )


def ranking_display(ranking: pd.DataFrame) -> pd.DataFrame:
    """ranking.csv as text: mean over cases, mean rank, 95% rank interval and P(rank 1)."""
    levels = {"Training cases": ranking["train_cases"]} if (ranking["train_cases"] != ALL_CASES).any() else {}
    return pd.DataFrame(
        {
            **levels,
            "Metric": ranking["metric"].map(METRIC_NAMES),
            "Strategy": ranking["strategy"],
            "Cases": ranking["n_cases"],
            "Mean over cases": [num(x, ".4f") for x in ranking["mean"]],
            "Mean rank": [num(x, ".2f") for x in ranking["mean_rank"]],
            "95% rank interval": [
                f"{num(lo, 'g')}–{num(hi, 'g')}" for lo, hi in zip(ranking["rank_low"], ranking["rank_high"])
            ],
            "P(rank 1)": [num(x, ".2f") for x in ranking["p_first"]],
        }
    )


def organ_verdicts_display(organ_map: pd.DataFrame) -> pd.DataFrame:
    """The per-organ comparisons that hold a verdict after Holm's correction over the whole map."""
    held = organ_map[organ_map["verdict"].isin([stats.HIGHER, stats.LOWER, stats.EQUIVALENT])]
    return pd.DataFrame(
        {
            "Organ": held["name"],
            **_comparison_columns(held, (organ_map["train_cases"] != ALL_CASES).any()),
            "Holm p": [num(x, ".3g") for x in held["p_adjusted"]],
            "Verdict": held["verdict"],
        }
    )


def over_cases_cells(row, digits: int = 4) -> tuple[str, str]:
    """(``mean [95% CI over cases]``, ``sd over seeds``) of one summary-over-cases row (or None)."""
    if row is None:
        return "–", "–"
    return fmt_ci(row["mean"], row["ci_low"], row["ci_high"], digits), num(row["sd_seeds"], f".{digits}f")


def per_organ_display(long: pd.DataFrame) -> pd.DataFrame:
    """Organs as rows; per strategy the mean over cases [95% CI over cases] and the sd over seeds.

    Args:
        long: :func:`~clipseg_bench.study.results.organ_summary_table` rows of one level.
    """
    out = pd.DataFrame({"Organ": [o.name for o in ORGANS]})
    for strategy in dict.fromkeys(long["strategy"]):
        g = long[long["strategy"] == strategy].set_index("organ").reindex([o.key for o in ORGANS])
        cells = [over_cases_cells(None if not _finite(r["mean"]) else r, 3) for _, r in g.iterrows()]
        out[f"{strategy} [95% CI]"] = [c[0] for c in cells]
        out[f"{strategy} sd(seeds)"] = [c[1] for c in cells]
    return out


# --- the findings that open the report ----------------------------------------------------------


def _listing(items: list[str], limit: int = 6) -> str:
    if len(items) > limit:
        return ", ".join(items[:limit]) + f" and {len(items) - limit} more"
    return ", ".join(items)


def _held_sentence(rows: pd.DataFrame, family: str) -> str:
    """One sentence listing the higher/lower verdicts of one family."""
    parts = [
        f"{r.strategy} is {r.verdict} than {r.reference} by {r.mean:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}] "
        f"({r.n_cases} cases, Holm p = {r.p_adjusted:.2g})"
        for r in rows.itertuples()
    ]
    return f"{FAMILY_NAMES.get(family, family).capitalize()}: " + "; ".join(parts) + "."


def cases_needed(m: int, alpha: float = stats.ALPHA) -> int:
    """The fewest cases with which a family of ``m`` tests can show a difference at all: Holm's
    smallest adjusted p is m times the smallest exact two-sided Wilcoxon p, m * 2 / 2**n."""
    n = 1
    while m * 2 / 2**n >= alpha:
        n += 1
    return n


def _reach_sentence(family_rows: pd.DataFrame, family: str) -> list[str]:
    """Why a family cannot show any difference with its number of cases (empty when it can)."""
    tested = family_rows[family_rows["verdict"] != stats.TOO_FEW]
    if tested.empty:
        return []
    m, n = len(tested), int(tested["n_cases"].max())
    if m * 2 / 2**n < stats.ALPHA:
        return []
    return [
        f"{FAMILY_NAMES.get(family, family).capitalize()}: no difference can be shown with {n} cases and "
        f"{m} comparisons (the smallest Holm-adjusted p is {m} × 2/2^{n} = {m * 2 / 2**n:.3g}); "
        f"{cases_needed(m)} cases are needed."
    ]


def _level_findings(rows: pd.DataFrame, margin: float) -> list[str]:
    """The sentences of one training-case level, primary metric (DSC) first."""
    dsc = rows[rows["metric"] == "dsc"]
    if dsc.empty:
        return []
    if (dsc["verdict"] == stats.TOO_FEW).all():
        n = int(dsc["n_cases"].max())
        return [
            f"No comparison can be tested: {n} val case{'' if n == 1 else 's'} "
            f"(a verdict needs at least {stats.MIN_CASES}; with 5 the smallest two-sided Wilcoxon p is "
            "0.0625, so 6 or more are needed to reach p < 0.05). The differences in the tables describe "
            "these cases; they are not findings."
        ]
    out = []
    for family, g in dsc.groupby("family", sort=False):
        held = g[g["verdict"].isin([stats.HIGHER, stats.LOWER])]
        if len(held):
            out.append(_held_sentence(held, family))
        out += _reach_sentence(g, family)
    same = dsc[dsc["verdict"] == stats.EQUIVALENT]
    if len(same):
        pairs = [f"{r.strategy} and {r.reference} ({r.n_cases} cases)" for r in same.itertuples()]
        out.append(f"Equivalent within ±{margin:g} (two one-sided tests, Holm): {_listing(pairs)}.")
    open_ = dsc[dsc["verdict"] == stats.INCONCLUSIVE]
    if len(open_):
        pairs = [f"{r.strategy} vs {r.reference}" for r in open_.itertuples()]
        out.append(
            f"Inconclusive (neither a difference nor equivalence within ±{margin:g} shown): {_listing(pairs)}."
        )
    few = dsc[dsc["verdict"] == stats.TOO_FEW]
    if len(few):
        pairs = [f"{r.strategy} vs {r.reference} ({r.n_cases} cases)" for r in few.itertuples()]
        out.append(f"Too few cases to test: {_listing(pairs)}.")
    nsd = rows[rows["metric"] == "nsd"]
    if len(nsd):
        verdicts = nsd["verdict"].isin([stats.HIGHER, stats.LOWER, stats.EQUIVALENT]).sum()
        hold = "holds" if verdicts == 1 else "hold"
        out.append(f"NSD (secondary): {verdicts} of {len(nsd)} comparisons {hold} a verdict (paired.csv).")
    return out


def _ranking_sentence(ranking: pd.DataFrame) -> str:
    """P(rank 1) and rank intervals of the primary metric, or why there are none."""
    g = ranking[ranking["metric"] == "dsc"]
    if g.empty:
        return ""
    n = int(g["n_cases"].max())
    if n < stats.MIN_CASES:
        return f"No ranking: {n} val case{'' if n == 1 else 's'} cannot show how stable one is."
    g = g.sort_values(["p_first", "mean_rank"], ascending=[False, True])
    listed = _listing(
        [
            f"{r.strategy} {r.p_first:.2f} (ranks {num(r.rank_low, 'g')}–{num(r.rank_high, 'g')})"
            for r in g.itertuples()
        ]
    )
    return (
        f"Ranking by val 3D DSC over {stats.RANK_RESAMPLES:,} bootstrap resamples of the {n} cases, "
        f"P(rank 1) and 95% rank interval: {listed}. A rank is not a verdict: see the tests above."
    )


def findings(paired: pd.DataFrame, ranking: pd.DataFrame, margin: float) -> list[dict]:
    """The report's opening findings, generated from paired.csv and ranking.csv.

    Args:
        paired: :func:`~clipseg_bench.study.results.paired_differences` output.
        ranking: :func:`~clipseg_bench.study.results.ranking_table` output.
        margin: the equivalence margin the verdicts used.

    Returns:
        One ``{"level": words, "sentences": [...]}`` per training-case level (the full training set
        first); empty when there is nothing to compare.
    """
    out = []
    for level in dict.fromkeys(paired["train_cases"]):
        sentences = _level_findings(paired[paired["train_cases"] == level], margin)
        ranked = _ranking_sentence(ranking[ranking["train_cases"] == level])
        if ranked:
            sentences.append(ranked)
        if sentences:
            out.append({"level": cases_label(level), "sentences": sentences})
    return out


def findings_markdown(found: list[dict]) -> list[str]:
    """results.md lines of :func:`findings`."""
    lines = []
    for f in found:
        lines += [f"**{f['level'].capitalize()}.**", ""] + [f"- {s}" for s in f["sentences"]] + [""]
    return lines
