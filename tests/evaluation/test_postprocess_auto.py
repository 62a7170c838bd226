"""`--postprocess auto` (issue 22): the per-organ clean-up is chosen on out-of-fold scores, recorded
with the cases it was chosen on, and applied per organ."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from clipseg_bench.data.volumes import volume_to_slices
from clipseg_bench.evaluation.evaluate import score_postprocessed
from clipseg_bench.evaluation.metrics import summarize
from clipseg_bench.evaluation.postprocess import choose_organ_modes, organ_modes, postprocess
from clipseg_bench.organs import BY_ID
from clipseg_bench.study.choices import postprocess_choices
from clipseg_bench.study.results import Run

LIVER, AORTA = 1, 5
AFFINE = np.diag([1.5, 1.5, 2.5, 1.0])
ORGANS = [BY_ID[LIVER], BY_ID[AORTA]]


def planted_case(shift: int) -> tuple[np.ndarray, np.ndarray]:
    """(truth, prediction) of one case: the prediction adds a stray liver blob far from the liver
    (the clean-up removes it: liver score up) and breaks the aorta, a tube along z, into two pieces
    (the clean-up keeps the longer piece: aorta score down)."""
    gt = np.zeros((32, 24, 30), dtype=np.uint8)
    gt[4 + shift : 14 + shift, 4:14, 6:20] = LIVER
    gt[22:24, 16:18, 2:28] = AORTA
    pred = gt.copy()
    pred[26:29, 2:5, 24:27] = LIVER  # the stray blob
    pred[22:24, 16:18, 15] = 0  # the break: pieces of 13 and 12 slices
    return gt, pred


def scores_of(gt: np.ndarray, pred: np.ndarray) -> dict:
    """Both clean-up modes' per-organ scores of one case, the way evaluate computes them."""
    gt_slices, meta = volume_to_slices(gt, AFFINE)
    meta["spacing"] = [1.5, 1.5, 2.5]
    pred_slices, _ = volume_to_slices(pred, AFFINE)
    return score_postprocessed(pred_slices, gt_slices, meta, ORGANS)


def fold_run(fold: int, case: str, scores: dict, *, seed: int = 0) -> Run:
    """A finished run on ``fold`` whose metrics.json scored ``case`` out of fold."""
    pp = {m: {"per_case": {case: s}, "summary": summarize({case: s})} for m, s in scores.items()}
    metrics = {"cases": [case], "per_case": pp["none"]["per_case"], "postprocess_3d": pp}
    path = Path(f"B/runs/decoder-s{seed}-f{fold}")
    return Run(Path("B"), path, "decoder", seed, "finished", {"folds": 2}, {}, metrics, None, None, fold)


def test_auto_keeps_lcc_where_it_raises_the_out_of_fold_score_and_not_where_it_lowers_it():
    cases = {"case_a": planted_case(0), "case_b": planted_case(3)}
    runs = [fold_run(k, c, scores_of(*cases[c])) for k, c in enumerate(cases)]
    for r in runs:  # the planted effects are real: lcc raises liver and lowers aorta on each case
        pp = r.metrics["postprocess_3d"]
        (case,) = r.metrics["cases"]
        assert pp["lcc"]["per_case"][case]["liver"]["dsc"] > pp["none"]["per_case"][case]["liver"]["dsc"]
        assert pp["lcc"]["per_case"][case]["aorta"]["dsc"] < pp["none"]["per_case"][case]["aorta"]["dsc"]

    (choice,), skipped = postprocess_choices(runs)
    assert skipped == []
    assert choice["organs"] == {"liver": "lcc", "aorta": "none"}
    assert choice["gain"]["liver"] > 0 > choice["gain"]["aorta"]
    on = choice["chosen_on"]
    assert on == {
        "split": "out-of-fold",
        "folds": [0, 1],
        "seeds": [0],
        "cases": ["case_a", "case_b"],
        "runs": ["decoder-s0-f0", "decoder-s0-f1"],
    }

    gt, pred = planted_case(1)  # a new CT, cleaned as segment --postprocess auto cleans it
    cleaned = postprocess(pred, AFFINE, "auto", organ_modes(choice))
    assert not cleaned[26:29, 2:5, 24:27].any()  # the stray liver blob is gone
    assert np.array_equal(cleaned == LIVER, gt == LIVER)
    assert np.array_equal(cleaned == AORTA, pred == AORTA)  # both aorta pieces kept


def test_lcc_only_where_the_mean_gain_is_positive():
    assert choose_organ_modes({"liver": [0.3, -0.1], "spleen": [0.01, -0.02]}) == {
        "liver": "lcc",
        "spleen": "none",
    }
    assert choose_organ_modes({"liver": [0.0, 0.0], "aorta": [float("nan")]}) == {
        "liver": "none",
        "aorta": "none",
    }


def test_no_choice_without_every_fold_or_without_folds():
    scores = scores_of(*planted_case(0))
    only_fold_0 = [fold_run(0, "case_a", scores)]
    choices, skipped = postprocess_choices(only_fold_0)
    assert choices == [] and "fold(s) [1]" in skipped[0]["why"]
    seed_1_short = [fold_run(0, "a", scores), fold_run(1, "b", scores), fold_run(0, "a", scores, seed=1)]
    assert postprocess_choices(seed_1_short)[0] == []
    plain = Run(
        Path("B"), Path("B/runs/decoder-s0"), "decoder", 0, "finished", {}, {}, only_fold_0[0].metrics, None
    )
    choices, skipped = postprocess_choices([plain])
    assert choices == [] and "no folds" in skipped[0]["why"]
