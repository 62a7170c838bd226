"""How often the report's verdicts are wrong, and how often they find a real difference (issue 20).

Synthetic benchmarks with a known truth (``clipseg_bench.study.simulate``): case difficulty shared by
every strategy, a strategy-by-case term (sd ``case_sd``) and seed noise (sd ``seed_sd``); strategy 0
is a deterministic one-seed baseline. Each benchmark is decided with the report's own functions
(seed average per case, Wilcoxon over cases, bootstrap interval over cases, Holm per family, TOST),
vectorised over benchmarks. For contrast, the rule the report used before issue 20: every (case,
seed) pair as a unit (the baseline's one score repeated per seed), a percentile bootstrap over the
pairs, "differs" when it excludes 0, and a Wilcoxon test over the pairs. Prints a Markdown table;
``--json`` writes the numbers. About a minute on 2 cores::

    python benchmarks/verdict_simulation.py --benchmarks 2000 --json verdict_simulation.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from clipseg_bench.study import simulate, stats

CALLED = (stats.HIGHER, stats.LOWER)


def _old_rule(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(bootstrap "differs", Wilcoxon p < 0.05) over (case, seed) pairs of strategy 1 vs 0: the
    pre-issue-20 rule, for the table's contrast."""
    b, _, c, k = scores.shape
    base = np.repeat(scores[:, 0, :, :1], k, axis=2)  # the deterministic baseline, run per seed
    diffs = (scores[:, 1] - base).reshape(b, c * k)
    means = diffs @ stats.resample_counts(c * k, 2_000, 0).T / (c * k)
    low, high = np.percentile(means, [2.5, 97.5], axis=-1)  # the plain percentile interval it used
    return (low > 0) | (high < 0), stats.wilcoxon_p(diffs) < 0.05


def null_rates(rng, benchmarks: int, cases: int, seeds: int, resamples: int) -> dict:
    """No true difference: six strategies (one deterministic baseline, five trained)."""
    scores = simulate.simulate_scores(
        rng, benchmarks=benchmarks, effects=[0.0] * 6, cases=cases, seeds=seeds, one_seed=[0]
    )
    versus = simulate.family_decisions(scores, [(s, 0) for s in range(1, 6)], n_resamples=resamples)
    pairs = [(a, b) for a in range(1, 6) for b in range(a + 1, 6)]
    trained = simulate.family_decisions(scores, pairs, n_resamples=resamples)
    old_boot, old_wilcoxon = _old_rule(scores)
    called = {n: np.isin(f["verdict"], CALLED) for n, f in (("versus", versus), ("trained", trained))}
    return {
        "cases x seeds": f"{cases} x {seeds}",
        "old bootstrap over pairs": float(old_boot.mean()),
        "old Wilcoxon over pairs": float(old_wilcoxon.mean()),
        "raw Wilcoxon over cases": float((versus["p_value"] < 0.05).mean()),
        "called, vs baseline (per comparison)": float(called["versus"].mean()),
        "called, vs baseline (family-wise, 5 tests)": float(called["versus"].any(axis=1).mean()),
        "called, trained pairs (per comparison)": float(called["trained"].mean()),
        "called, trained pairs (family-wise, 10 tests)": float(called["trained"].any(axis=1).mean()),
    }


def power(rng, benchmarks: int, cases: int, delta: float, resamples: int) -> dict:
    """A true difference ``delta``: alone in its family, and one of five with four nulls."""
    alone = simulate.simulate_scores(
        rng, benchmarks=benchmarks, effects=[0, delta], cases=cases, seeds=3, one_seed=[0]
    )
    v1 = simulate.family_decisions(alone, [(1, 0)], n_resamples=resamples)["verdict"][:, 0]
    mixed = simulate.simulate_scores(
        rng, benchmarks=benchmarks, effects=[0, delta, 0, 0, 0, 0], cases=cases, seeds=3, one_seed=[0]
    )
    v5 = simulate.family_decisions(mixed, [(s, 0) for s in range(1, 6)], n_resamples=resamples)["verdict"]
    return {
        "delta": delta,
        "cases": cases,
        "called higher (alone)": float((v1 == stats.HIGHER).mean()),
        "called higher (1 of 5 in the family)": float((v5[:, 0] == stats.HIGHER).mean()),
    }


def equivalence(rng, benchmarks: int, resamples: int) -> dict:
    """TOST at the margin (its error) and inside it (its power), 20 cases, case sd 0.005."""
    out = {}
    for name, delta in (("at the margin (0.01)", 0.01), ("inside (0)", 0.0)):
        s = simulate.simulate_scores(
            rng, benchmarks=benchmarks, effects=[0, delta], cases=20, seeds=3, case_sd=0.005, one_seed=[0]
        )
        v = simulate.family_decisions(s, [(1, 0)], n_resamples=resamples)["verdict"][:, 0]
        out[f"called equivalent, true difference {name}"] = float((v == stats.EQUIVALENT).mean())
    return out


def coverage(rng, benchmarks: int, cases: int, resamples: int) -> float:
    """How often the 95% percentile interval over cases holds the true difference (0.02)."""
    s = simulate.simulate_scores(
        rng, benchmarks=benchmarks, effects=[0, 0.02], cases=cases, seeds=3, one_seed=[0]
    )
    f = simulate.family_decisions(s, [(1, 0)], n_resamples=resamples)
    return float(((f["ci_low"] <= 0.02) & (f["ci_high"] >= 0.02)).mean())


def ranking(rng, benchmarks: int) -> dict:
    same = np.nanmean(
        simulate.simulate_scores(rng, benchmarks=benchmarks, effects=[0] * 4, cases=20, seeds=3), axis=-1
    )
    top = np.nanmean(
        simulate.simulate_scores(rng, benchmarks=benchmarks, effects=[0, 0, 0, 0.05], cases=20, seeds=3),
        axis=-1,
    )
    r_same, r_top = stats.rank_stability(same), stats.rank_stability(top)
    return {
        "identical: mean P(rank 1) per strategy": [
            round(float(x), 3) for x in r_same["p_first"].mean(axis=0)
        ],
        "identical: median 95% rank-interval width": float(
            np.median(r_same["rank_high"] - r_same["rank_low"])
        ),
        "one +0.05 better: mean P(rank 1)": float(r_top["p_first"][:, 3].mean()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--benchmarks", type=int, default=2000, help="synthetic benchmarks per setting")
    ap.add_argument(
        "--resamples", type=int, default=stats.N_RESAMPLES, help="bootstrap resamples per interval"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the numbers here")
    a = ap.parse_args()
    t0 = time.perf_counter()
    rng = np.random.default_rng(a.seed)
    out = {
        "null": [null_rates(rng, a.benchmarks, c, k, a.resamples) for c, k in ((3, 2), (10, 3), (20, 3))],
        "power": [power(rng, a.benchmarks, c, 0.03, a.resamples) for c in (10, 20)],
        "equivalence": equivalence(rng, a.benchmarks, a.resamples),
        "coverage of the 95% interval": {
            str(c): coverage(rng, a.benchmarks, c, a.resamples) for c in (6, 10, 20)
        },
        "ranking": ranking(rng, min(a.benchmarks, 500)),
        "benchmarks": a.benchmarks,
        "resamples": a.resamples,
        "seed": a.seed,
    }
    out["total_s"] = time.perf_counter() - t0
    keys = list(out["null"][0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in out["null"]:
        print("| " + " | ".join(v if isinstance(v, str) else f"{v:.1%}" for v in row.values()) + " |")
    for key in ("power", "equivalence", "coverage of the 95% interval", "ranking"):
        print(f"\n{key}: {json.dumps(out[key])}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
