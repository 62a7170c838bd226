"""Metrics on hand-made masks with values worked out by hand, and agreement with the official FLARE22
evaluation (DeepMind's ``surface-distance`` package, the code FLARE22's ``SurfaceDice.py`` copies)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage

from clipseg_bench.evaluation.metrics import (
    cross_dice,
    dice,
    dice_2d_pairs,
    false_positive_slices,
    flare_dsc_nsd,
    organs_present,
    present_pairs_dice,
    score_case,
    summarize,
)
from clipseg_bench.organs import BY_ID, ORGANS, Z_CROPPED_IDS

SPACING = (3.0, 2.0, 1.0)  # mm, anisotropic on purpose


def _vol(shape=(24, 24, 24)) -> np.ndarray:
    return np.zeros(shape, dtype=bool)


# --- Dice -------------------------------------------------------------------------------------


def test_dice_by_hand():
    p, g = np.zeros(10, bool), np.zeros(10, bool)
    p[[1, 2]] = True
    g[[2, 3, 4]] = True
    assert dice(p, g) == pytest.approx(2 * 1 / 5)
    assert dice(g, g) == 1.0
    assert dice(p, np.zeros(10, bool)) == 0.0
    assert dice(np.zeros((3, 4)), np.zeros((3, 4))) == 1.0  # both empty: the FLARE22 convention


def test_dice_takes_torch_and_ints():
    p = torch.tensor([[1, 1, 0], [0, 0, 0]])
    g = np.array([[0, 1, 0], [0, 0, 0]], dtype=np.uint8)
    assert dice(p, g) == pytest.approx(2 * 1 / 3)
    with pytest.raises(ValueError):
        dice(p, g[:1])


def test_dice_2d_pairs_by_hand():
    p, g = np.zeros((4, 3, 3), bool), np.zeros((4, 3, 3), bool)
    p[0, 0, :2] = True
    g[0, 0, 1:] = True  # overlap 1 of 2 + 2 -> 0.5
    p[1, 1, 1] = True  # predicted, absent -> 0
    g[2] = True  # present, missed -> 0
    # pair 3 empty in both -> 1
    np.testing.assert_allclose(dice_2d_pairs(p, g), [0.5, 0.0, 0.0, 1.0])
    np.testing.assert_allclose(dice_2d_pairs(torch.from_numpy(p), torch.from_numpy(g)), [0.5, 0.0, 0.0, 1.0])


def test_present_pairs_dice_leaves_out_absent_organs():
    """dice2d's rule: pairs whose ground truth is empty are not averaged (empty-both would score 1)."""
    p, g = np.zeros((4, 3, 3), bool), np.zeros((4, 3, 3), bool)
    p[0, 0, :2] = True
    g[0, 0, 1:] = True  # present: 0.5
    p[1, 1, 1] = True  # absent, predicted: left out
    g[2] = True  # present, missed: 0
    # pair 3 empty in both: left out
    np.testing.assert_allclose(present_pairs_dice(p, g), [0.5, 0.0])
    on_torch = present_pairs_dice(torch.from_numpy(p), torch.from_numpy(g).float())
    np.testing.assert_allclose(on_torch, [0.5, 0.0])
    assert present_pairs_dice(p[[1, 3]], g[[1, 3]]).size == 0


def test_one_dice_for_2d_pairs_and_3d_volumes():
    rng = np.random.default_rng(2)
    p, g = rng.random((3, 5, 6, 4)) > 0.5, rng.random((3, 5, 6, 4)) > 0.4
    np.testing.assert_allclose(dice_2d_pairs(p, g), [dice(a, b) for a, b in zip(p, g)])
    inter, total = np.logical_and(p[0], g[0]).sum(), p[0].sum() + g[0].sum()
    assert dice(p[0], g[0]) == 2 * inter / total


def test_dice_2d_pairs_equals_dice_per_slice():
    rng = np.random.default_rng(1)
    p, g = rng.random((6, 8, 8)) > 0.6, rng.random((6, 8, 8)) > 0.5
    np.testing.assert_allclose(dice_2d_pairs(p, g), [dice(a, b) for a, b in zip(p, g)])


# --- FLARE22 3D DSC/NSD: empty-mask rules ------------------------------------------------------


def test_empty_rules():
    empty, blob = _vol(), _vol()
    blob[5:8, 5:8, 5:8] = True
    assert flare_dsc_nsd(empty, empty, SPACING, 2.0) == (1.0, 1.0)
    assert flare_dsc_nsd(blob, empty, SPACING, 2.0) == (0.0, 0.0)  # predicted, absent from gt
    assert flare_dsc_nsd(empty, blob, SPACING, 2.0) == (0.0, 0.0)  # present in gt, missed
    # The z-crop never rescues a prediction of an organ the ground truth lacks.
    assert flare_dsc_nsd(blob, empty, SPACING, 2.0, z_crop=True) == (0.0, 0.0)


def test_identical_masks_score_one():
    g = _vol()
    g[3:9, 4:15, 2:20] = True
    g[10:12, 10:12, 10:12] = True
    assert flare_dsc_nsd(g, g, SPACING, 0.0) == (1.0, 1.0)


# --- FLARE22 3D NSD by hand ---------------------------------------------------------------------
# DeepMind's surfels sit at voxel corners. A lone voxel has 8 corner surfels of one and the same
# area (its 8 neighbour codes are mirror images), so NSD reduces to counting corners.


def test_nsd_single_voxels_two_slices_apart():
    # gt voxel at z=10 has corners at z in {10, 11}; the prediction at z=12 has corners at {12, 13}
    # (1 mm spacing along z). From gt: 4 corners at 1 mm, 4 at 2 mm; from pred the same.
    g, p = _vol(), _vol()
    g[10, 10, 10] = True
    p[10, 10, 12] = True
    assert flare_dsc_nsd(p, g, SPACING, 0.9)[1] == pytest.approx(0.0, abs=1e-6)
    assert flare_dsc_nsd(p, g, SPACING, 1.0)[1] == pytest.approx(8 / 16, abs=1e-6)
    assert flare_dsc_nsd(p, g, SPACING, 2.0) == pytest.approx((0.0, 1.0), abs=1e-6)


def test_nsd_one_of_two_voxels_found():
    # gt: two lone voxels 10 voxels (30 mm) apart; pred: one of them. Every surfel has the same area
    # a: correct = 8a (gt, found) + 8a (pred) out of 16a + 8a -> 2/3. DSC = 2*1/(2+1) = 2/3 too.
    g, p = _vol(), _vol()
    g[5, 5, 5] = g[15, 5, 5] = True
    p[5, 5, 5] = True
    dsc, nsd = flare_dsc_nsd(p, g, SPACING, 5.0)
    assert dsc == pytest.approx(2 / 3)
    assert nsd == pytest.approx(2 / 3, abs=1e-6)


def test_nsd_uses_spacing_in_mm():
    # The same voxel shift is 1 mm along z but 3 mm along x: tolerance 1 mm accepts only the first.
    g, pz, px = _vol(), _vol(), _vol()
    g[10, 10, 10] = True
    pz[10, 10, 11] = True
    px[11, 10, 10] = True
    assert flare_dsc_nsd(pz, g, SPACING, 1.0)[1] == pytest.approx(1.0, abs=1e-6)
    assert flare_dsc_nsd(px, g, SPACING, 1.0)[1] < 0.75


# --- the aorta / IVC / esophagus slice rule ------------------------------------------------------


def _column(z0: int, z1: int) -> np.ndarray:
    """A 2x2 column on slices z0..z1-1."""
    m = _vol()
    m[10:12, 10:12, z0:z1] = True
    return m


def test_z_crop_drops_the_top_labelled_slice():
    g = _column(2, 6)  # labelled slices 2..5; official crop 2:5 scores 2, 3, 4
    p = _column(2, 5)  # misses slice 5, which the crop leaves out anyway
    assert flare_dsc_nsd(p, g, SPACING, 2.0, z_crop=True) == pytest.approx((1.0, 1.0), abs=1e-6)
    assert flare_dsc_nsd(p, g, SPACING, 2.0)[0] == pytest.approx(2 * 12 / (16 + 12))


def test_z_crop_ignores_prediction_outside_the_range():
    g = _column(2, 6)
    p = _column(2, 4) | _column(8, 12) | _column(0, 1)  # slices 2, 3 inside; 0 and 8..11 outside
    # crop 2:5 -> gt slices 2, 3, 4 (12 voxels), pred slices 2, 3 (8 voxels): 2*8/(12+8)
    assert flare_dsc_nsd(p, g, SPACING, 2.0, z_crop=True)[0] == pytest.approx(0.8)
    # uncropped: gt 4 slices (16 voxels), pred 7 slices (28 voxels), 8 shared
    assert flare_dsc_nsd(p, g, SPACING, 2.0)[0] == pytest.approx(2 * 8 / (16 + 28))


def test_z_crop_with_prediction_only_outside_the_range_scores_zero():
    g, p = _column(2, 6), _column(8, 12)
    assert flare_dsc_nsd(p, g, SPACING, 2.0, z_crop=True) == (0.0, 0.0)


def test_z_crop_of_a_single_labelled_slice_scores_that_slice():
    # The official crop z_min:z_max is empty here (its code fails); we score the one slice.
    g = _column(7, 8)
    assert flare_dsc_nsd(g, g, SPACING, 2.0, z_crop=True) == (1.0, 1.0)
    assert flare_dsc_nsd(_column(7, 9), g, SPACING, 2.0, z_crop=True) == (1.0, 1.0)
    assert flare_dsc_nsd(_column(8, 9), g, SPACING, 2.0, z_crop=True) == (0.0, 0.0)


# --- score_case and summarize ----------------------------------------------------------------


def test_score_case_applies_the_rules_per_organ():
    gt = np.zeros((24, 24, 24), np.int16)
    gt[2:10, 2:10, 2:10] = 1  # liver
    gt[15:17, 15:17, 4:12] = 5  # aorta on slices 4..11
    pred = gt.copy()
    pred[15:17, 15:17, 11] = 0  # aorta's top slice missed: cropped away
    pred[15:17, 15:17, 12:20] = 5  # aorta above the labelled range: cropped away
    pred[20:22, 2:4, 2:4] = 3  # spleen, absent from gt
    pred[2:10, 2:10, 9] = 0  # liver loses its top slice: 7/8 of it, a 1 mm step
    s = score_case(pred, gt, SPACING)
    assert list(s) == [o.key for o in ORGANS]
    assert s["aorta"] == pytest.approx({"dsc": 1.0, "nsd": 1.0}, abs=1e-6)
    assert s["spleen"] == {"dsc": 0.0, "nsd": 0.0}
    assert s["liver"]["dsc"] == pytest.approx(2 * 7 / 15)
    assert s["liver"]["nsd"] == pytest.approx(1.0, abs=1e-6)  # 1 mm off, within liver's 5 mm
    absent = [o.key for o in ORGANS if o.id not in (1, 3, 5)]
    assert all(s[k] == {"dsc": 1.0, "nsd": 1.0} for k in absent)
    only = score_case(pred, gt, SPACING, organs=[BY_ID[5], BY_ID[1]])
    assert list(only) == ["aorta", "liver"] and only["liver"] == s["liver"]


def test_score_case_uses_each_organs_tolerance():
    # A block moved one voxel along x (3 mm): every surfel has a counterpart exactly 3 mm away, so the
    # right kidney (3 mm tolerance) scores NSD 1, the gallbladder (2 mm) less.
    gt = np.zeros((24, 24, 24), np.int16)
    gt[4:8, 4:10, 4:10] = 2  # right kidney
    gt[12:16, 4:10, 4:10] = 9  # gallbladder
    pred = np.roll(gt, 1, axis=0)
    s = score_case(pred, gt, SPACING)
    assert BY_ID[2].nsd_tolerance_mm == 3 and BY_ID[9].nsd_tolerance_mm == 2
    assert s["right_kidney"]["nsd"] == pytest.approx(1.0, abs=1e-6)
    assert 0 < s["gallbladder"]["nsd"] < 0.9
    assert s["right_kidney"]["dsc"] == s["gallbladder"]["dsc"] == pytest.approx(0.75)


def test_summarize_by_hand():
    per_case = {
        "a": {"liver": {"dsc": 0.5, "nsd": 1.0}, "spleen": {"dsc": 1.0, "nsd": 0.0}},
        "b": {"liver": {"dsc": 0.7, "nsd": 0.2}, "spleen": {"dsc": 0.0, "nsd": 0.4}},
    }
    s = summarize(per_case)
    assert s["per_organ"]["liver"] == pytest.approx({"dsc": 0.6, "nsd": 0.6})
    assert s["per_organ"]["spleen"] == pytest.approx({"dsc": 0.5, "nsd": 0.2})
    assert s["dsc"] == pytest.approx(2.2 / 4)
    assert s["nsd"] == pytest.approx(1.6 / 4)
    with pytest.raises(ValueError):
        summarize({})


def test_summarize_over_present_organs_by_hand():
    # case a: spleen absent from the truth and predicted (0); case b: spleen absent and not predicted (1)
    per_case = {
        "a": {"liver": {"dsc": 0.5, "nsd": 1.0}, "spleen": {"dsc": 0.0, "nsd": 0.0}},
        "b": {"liver": {"dsc": 0.7, "nsd": 0.2}, "spleen": {"dsc": 1.0, "nsd": 1.0}},
    }
    s = summarize(per_case, {"a": ["liver"], "b": ["liver"]})
    assert s["dsc"] == pytest.approx(2.2 / 4)  # the FLARE22 mean is unchanged
    assert s["dsc_present"] == pytest.approx(0.6) and s["nsd_present"] == pytest.approx(0.6)
    # a case with no organ present is left out; none at all gives NaN
    assert summarize(per_case, {"a": ["liver", "spleen"], "b": []})["dsc_present"] == pytest.approx(0.25)
    assert math.isnan(summarize(per_case, {"a": []})["dsc_present"])
    assert "dsc_present" not in summarize(per_case)


def test_organs_present_reads_the_truth():
    gt = np.zeros((4, 4, 4), np.int16)
    gt[0, 0, 0], gt[1, 1, 1] = 3, 1
    assert organs_present(gt) == ["liver", "spleen"]  # FLARE22 order
    assert organs_present(gt, [BY_ID[3], BY_ID[2]]) == ["spleen"]


def test_cross_dice_by_hand():
    """One slice of 2 x 2, two prompts, two organs: organ 0 the top row, organ 1 absent."""
    gt = np.zeros((1, 2, 2, 2), bool)
    gt[0, 0, 0, :] = True
    pred = np.zeros_like(gt)
    pred[0, 0, 0, :] = True  # prompt 0: exactly organ 0
    pred[0, 1, :, 0] = True  # prompt 1: the left column
    c = cross_dice(pred, gt)[0]
    # [prompt, organ]: 1 on organ 0; 0 against the empty organ 1 (one empty); 2*1/(2+2) = 0.5
    np.testing.assert_allclose(c, [[1.0, 0.0], [0.5, 0.0]])
    assert cross_dice(np.zeros_like(gt), np.zeros_like(gt))[0, 0, 0] == 1.0  # both empty
    # the diagonal is the project's one Dice
    np.testing.assert_allclose(np.diagonal(c), dice_2d_pairs(pred[0], gt[0]))


def test_false_positive_slices_by_hand():
    gt = np.zeros((3, 2, 2, 2), bool)
    gt[0, 0, 0, 0] = True  # organ 0 present on slice 0 only; organ 1 never
    pred = np.zeros_like(gt)
    pred[0, 1, 1, 1] = True  # organ 1 painted on slice 0 (absent there): a false positive
    pred[2, 0, 0, 0] = True  # organ 0 painted on slice 2 (absent there): a false positive
    pred[0, 0, 0, 0] = True  # organ 0 found where present: not counted
    absent, fp = false_positive_slices(pred, gt)
    assert absent.tolist() == [2, 3] and fp.tolist() == [1, 1]


# --- agreement with the official FLARE22 evaluation -----------------------------------------------


def official_flare22_case(seg_data: np.ndarray, gt_data: np.ndarray, case_spacing) -> dict:
    """Test-only reference: the per-case loop of the official FLARE22_DSC_NSD_Eval.py
    (github.com/JunMa11/FLARE, FLARE22/Evaluation), unrounded, on DeepMind's surface-distance code."""
    from surface_distance import (
        compute_dice_coefficient,
        compute_surface_dice_at_tolerance,
        compute_surface_distances,
    )

    out = {}
    for o in ORGANS:
        i = o.id
        if np.sum(gt_data == i) == 0 and np.sum(seg_data == i) == 0:
            dsc_i = nsd_i = 1
        elif np.sum(gt_data == i) == 0 and np.sum(seg_data == i) > 0:
            dsc_i = nsd_i = 0
        else:
            if i in (5, 6, 10):
                z_index = np.where(gt_data == i)[2]
                z_lower, z_upper = np.min(z_index), np.max(z_index)
                gt_i, seg_i = gt_data[:, :, z_lower:z_upper] == i, seg_data[:, :, z_lower:z_upper] == i
            else:
                gt_i, seg_i = gt_data == i, seg_data == i
            with warnings.catch_warnings():  # it imports from scipy.ndimage's deprecated submodules
                warnings.simplefilter("ignore", DeprecationWarning)
                surface_distances = compute_surface_distances(gt_i, seg_i, case_spacing)
            dsc_i = compute_dice_coefficient(gt_i, seg_i)
            nsd_i = compute_surface_dice_at_tolerance(surface_distances, o.nsd_tolerance_mm)
        out[o.key] = {"dsc": float(dsc_i), "nsd": float(nsd_i)}
    return out


def _blob(rng, shape, sigma: float, threshold: float) -> np.ndarray:
    """Smoothed noise above ``threshold`` standard deviations: irregular, sometimes split blobs."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field > threshold * field.std()


def _random_case(seed: int, shape=(48, 40, 28)) -> tuple[np.ndarray, np.ndarray]:
    """Irregular organs: the prediction grows, shrinks or shifts each one and adds noise specks."""
    rng = np.random.default_rng(seed)
    gt, pred = np.zeros(shape, np.int16), np.zeros(shape, np.int16)
    for o in ORGANS:
        if o.id in (7, 8):  # adrenal glands: absent from gt; one predicted anyway, one not
            if o.id == 7:
                pred[_blob(rng, shape, 2, 2.5) & (pred == 0)] = o.id
            continue
        g = _blob(rng, shape, 3, 1.6)
        if o.id in Z_CROPPED_IDS:  # tubes labelled on part of the z-range, predicted beyond it
            g[:, :, : rng.integers(2, 8)] = False
            g[:, :, rng.integers(18, 26) :] = False
        p = g.copy()
        match o.id % 3:
            case 0:
                p = ndimage.binary_dilation(p, iterations=1)
            case 1:
                p = np.roll(p, shift=(1, -1, 2), axis=(0, 1, 2))
            case 2:
                p = ndimage.binary_erosion(p)
        p ^= _blob(rng, shape, 1.5, 2.5)
        if o.id in Z_CROPPED_IDS:
            p |= np.roll(g, 4, axis=2)
        gt[g & (gt == 0)] = o.id
        pred[p & (pred == 0)] = o.id
    return pred, gt


@pytest.mark.parametrize("seed,spacing", [(0, (0.8, 0.8, 2.5)), (1, (1.5, 0.7, 3.0)), (2, (1.0, 1.0, 1.0))])
def test_score_case_agrees_with_official_flare22(seed, spacing):
    pred, gt = _random_case(seed)
    ours = score_case(pred, gt, spacing)
    ref = official_flare22_case(pred, gt, spacing)
    partial = [k for k in ref if 0.05 < ref[k]["nsd"] < 0.99]
    assert len(partial) >= 8, ref  # most organs are present and imperfect: a real test of NSD
    for key in ref:
        for m in ("dsc", "nsd"):
            assert math.isclose(ours[key][m], ref[key][m], abs_tol=1e-4), (key, m, ours[key][m], ref[key][m])


def test_device_counting_path_equals_numpy(monkeypatch):
    """On a GPU the training Dice counts with torch on the device (only counts come back); forced on
    here, it must give exactly the numpy path's numbers, empty-mask rules included."""
    from clipseg_bench.evaluation import metrics

    gen = torch.Generator().manual_seed(0)
    pred = torch.rand(24, 16, 16, generator=gen) > 0.6
    gt = (torch.rand(24, 16, 16, generator=gen) > 0.85).float()
    gt[:6] = 0  # absent organs: left out by present_pairs_dice, Dice 1 or 0 by the rules
    pred[:3] = False
    expected_pairs = dice_2d_pairs(pred.numpy(), gt.numpy())
    expected_present = present_pairs_dice(pred.numpy(), gt.numpy())
    monkeypatch.setattr(metrics, "_on_accelerator", lambda p, g: True)
    np.testing.assert_array_equal(dice_2d_pairs(pred, gt), expected_pairs)
    np.testing.assert_array_equal(present_pairs_dice(pred, gt), expected_present)
    assert len(expected_present) == 18 and expected_pairs[:3].tolist() == [1.0, 1.0, 1.0]


def test_device_confusion_and_false_positive_counts_equal_numpy(monkeypatch):
    """evaluate counts the prompt-confusion overlaps and the false-positive slices where the masks are
    (a GPU in a study); forced onto that path here, the numbers are the numpy path's, exactly."""
    from clipseg_bench.evaluation import metrics

    gen = torch.Generator().manual_seed(1)
    pred = torch.rand(5, 4, 12, 12, generator=gen) > 0.7
    gt = torch.rand(5, 4, 12, 12, generator=gen) > 0.8
    gt[1, 2] = False  # an absent organ
    pred[3] = False  # a slice with no mask at all
    expected_cross = metrics.cross_dice(pred.numpy(), gt.numpy())
    expected_fp = metrics.false_positive_slices(pred.numpy(), gt.numpy())
    monkeypatch.setattr(metrics, "_on_accelerator", lambda p, g: True)
    np.testing.assert_array_equal(metrics.cross_dice(pred, gt), expected_cross)
    for got, want in zip(metrics.false_positive_slices(pred, gt), expected_fp):
        np.testing.assert_array_equal(got, want)
    assert expected_fp[0].sum() >= 1 and not np.allclose(expected_cross, expected_cross[:, :1, :1])
