"""Choices the tool makes from data, made on the training side's out-of-fold scores and recorded with
the data they were made on. Today one: which organs get the 3D clean-up (``--postprocess auto``).

nnU-Net chooses its post-processing on the pooled out-of-fold predictions of its five folds and
leaves the test data untouched; so does this module. Per (strategy, training cases) it takes the
runs on every fold (every seed's K folds: each labelled non-test case scored once per seed, by the
run that did not train on it), averages each case's score over seeds (the case is the unit), and
keeps ``lcc`` for an organ where the clean-up raised the organ's mean over those cases
(:func:`~clipseg_bench.evaluation.postprocess.choose_organ_modes`). The choice is written with the
folds, seeds, cases and runs it was made on: into BENCH/postprocess-auto.json and every run of the
group (RUN/postprocess.json, what ``segment`` and ``evaluate --postprocess auto`` apply), by
``benchmark --postprocess auto``; beside the report by ``report``. Without folds there is nothing
to choose on that the report does not score (the val cases are its numbers), so no choice is made.
"""

from __future__ import annotations

import math
from pathlib import Path

from clipseg_bench.evaluation.postprocess import choose_organ_modes
from clipseg_bench.provenance import write_json_atomic
from clipseg_bench.run_folder import RunFolder
from clipseg_bench.study.results import Run, read_bench, strategy_order

CHOICE_FILE = "postprocess-auto.json"
RULE = (
    "lcc for an organ where the mean over the out-of-fold cases (each case's gain averaged over seeds) "
    "of its score after lcc minus as predicted is > 0; none otherwise"
)


def postprocess_choices(runs: list[Run], metric: str = "dsc") -> tuple[list[dict], list[dict]]:
    """The per-organ clean-up of every (strategy, training cases) whose runs cover every fold.

    Args:
        runs: the benchmark's runs, read with their val (out-of-fold) scores.
        metric: the score the choice maximises (``dsc``).

    Returns:
        (choices, skipped). A choice: ``{"strategy", "train_cases", "organs": {organ key: "lcc" |
        "none"}, "gain": {organ key: mean gain}, "metric", "rule", "chosen_on": {"split":
        "out-of-fold", "folds", "seeds", "cases", "runs"}}``. Skipped: ``{"strategy",
        "train_cases", "why"}`` for groups without folds or with a fold missing.
    """
    groups: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        if r.finished and r.split == "val":
            groups.setdefault((r.strategy, r.train_cases_label), []).append(r)
    choices, skipped = [], []
    order = {s: i for i, s in enumerate(strategy_order({k[0] for k in groups}))}
    for (strategy, cases), group in sorted(groups.items(), key=lambda kv: (order[kv[0][0]], kv[0][1])):
        why = _incomplete(group)
        if why:
            skipped.append({"strategy": strategy, "train_cases": cases, "why": why})
            continue
        choices.append({"strategy": strategy, "train_cases": cases, **_choose(group, metric)})
    return choices, skipped


def _incomplete(group: list[Run]) -> str:
    """Why a group's runs cannot choose (empty when they can): no folds, a fold missing or unscored."""
    if any(r.fold is None for r in group):
        return "no folds: the only scores are the val cases the report scores"
    n_folds = max(int(r.info.get("folds") or 0) for r in group)
    for seed in sorted({r.seed for r in group}):
        scored = {r.fold for r in group if r.seed == seed and _has_both(r)}
        if scored != set(range(n_folds)):
            missing = sorted(set(range(n_folds)) - scored)
            return f"seed {seed} lacks out-of-fold scores with and without lcc on fold(s) {missing}"
    return ""


def _has_both(run: Run) -> bool:
    pp = (run.metrics or {}).get("postprocess_3d") or {}
    return all((pp.get(m) or {}).get("per_case") for m in ("none", "lcc"))


def _choose(group: list[Run], metric: str) -> dict:
    """The choice of one complete group, with what it was made on."""
    by_case: dict[str, dict[str, list[float]]] = {}  # organ -> case -> gain per seed
    for r in group:
        pp = r.metrics["postprocess_3d"]
        for case, organs in pp["none"]["per_case"].items():
            for organ, score in organs.items():
                gain = float(pp["lcc"]["per_case"][case][organ][metric]) - float(score[metric])
                by_case.setdefault(organ, {}).setdefault(case, []).append(gain)
    gains = {organ: [math.fsum(v) / len(v) for v in cases.values()] for organ, cases in by_case.items()}
    cases = sorted({c for per in by_case.values() for c in per})
    return {
        "organs": choose_organ_modes(gains),
        "gain": {organ: math.fsum(v) / len(v) for organ, v in gains.items()},
        "metric": metric,
        "rule": RULE,
        "chosen_on": {
            "split": "out-of-fold",
            "folds": sorted({r.fold for r in group}),
            "seeds": sorted({r.seed for r in group}),
            "cases": cases,
            "runs": sorted(r.path.name for r in group),
        },
    }


def record_choices(bench: Path) -> tuple[list[dict], list[dict]]:
    """Choose the clean-up from a BENCH folder's out-of-fold scores and record it: in
    BENCH/postprocess-auto.json and in each chosen group's runs (RUN/postprocess.json).

    Returns:
        :func:`postprocess_choices`'s (choices, skipped).
    """
    runs = read_bench([bench])
    choices, skipped = postprocess_choices(runs)
    write_choices(Path(bench) / CHOICE_FILE, choices, skipped)
    paths = {r.path.name: r.path for r in runs}
    for choice in choices:
        for name in choice["chosen_on"]["runs"]:
            RunFolder(paths[name]).write_postprocess_choice(choice)
    return choices, skipped


def write_choices(path: Path, choices: list[dict], skipped: list[dict]) -> None:
    """postprocess-auto.json: every choice with the data it was made on, and the groups skipped."""
    write_json_atomic(path, {"rule": RULE, "choices": choices, "skipped": skipped})
