"""--postprocess lcc on hand-made volumes and on the real CT's anatomy (issue 14)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from clipseg_bench.evaluation.metrics import score_case
from clipseg_bench.evaluation.postprocess import grid_midline_x, keep_largest_components, postprocess
from clipseg_bench.organs import BY_ID

LIVER, R_KIDNEY, L_KIDNEY, L_ADRENAL = 1, 2, 13, 8
RAS = np.diag([2.0, 2.0, 3.0, 1.0])  # array axis 0 = +x = the patient's right; midline at the grid centre
LPS = np.diag([-2.0, -2.0, 3.0, 1.0])  # axis 0 runs toward the patient's left


def _volume(shape=(20, 12, 10)) -> np.ndarray:
    return np.zeros(shape, dtype=np.uint8)


def test_a_stray_blob_is_removed_and_the_organ_kept():
    labels = _volume()
    labels[12:18, 2:9, 2:8] = LIVER
    labels[2:4, 2:4, 2:4] = LIVER  # stray blob, 8 voxels
    out = keep_largest_components(labels, RAS)
    assert (out[12:18, 2:9, 2:8] == LIVER).all()
    assert (out[2:4, 2:4, 2:4] == 0).all()
    assert (out == LIVER).sum() == 6 * 7 * 6


def test_a_left_kidney_predicted_on_the_right_is_removed():
    labels = _volume()
    labels[13:17, 3:8, 2:7] = L_KIDNEY  # high x = the patient's right in RAS: wrong side
    labels[3:5, 3:5, 3:5] = L_KIDNEY  # smaller, but on the left side
    out = keep_largest_components(labels, RAS)
    assert (out[13:17, 3:8, 2:7] == 0).all()
    assert (out[3:5, 3:5, 3:5] == L_KIDNEY).all()
    # Only the wrong-side component: the organ becomes empty.
    only_wrong = np.where(labels == L_KIDNEY, 0, labels)
    only_wrong[13:17, 3:8, 2:7] = L_KIDNEY
    assert not (keep_largest_components(only_wrong, RAS) == L_KIDNEY).any()


def test_sides_come_from_the_affine_not_the_array_order():
    labels = _volume()
    labels[13:17, 3:8, 2:7] = L_KIDNEY  # high array x: the patient's LEFT when axis 0 points left (LPS)
    out = keep_largest_components(labels, LPS)
    assert (out == L_KIDNEY).sum() == (labels == L_KIDNEY).sum()
    labels[13:17, 3:8, 2:7] = R_KIDNEY  # and a right kidney there is on the wrong side
    assert not (keep_largest_components(labels, LPS) == R_KIDNEY).any()
    assert grid_midline_x((20, 12, 10), RAS) == pytest.approx(19.0)  # (20 - 1) / 2 voxels * 2 mm


def test_an_organ_split_by_the_slice_grid_but_connected_in_3d_is_kept():
    labels = _volume()
    # Slice z=2 and z=3 hold two separate in-plane pieces; slice z=4 joins them (a U shape).
    labels[2:5, 2:4, 2:4] = LIVER
    labels[2:5, 8:10, 2:4] = LIVER
    labels[2:5, 2:10, 4] = LIVER
    # and a piece that touches the next slice only at a corner (26-connectivity)
    labels[5, 10, 5] = LIVER
    labels[6, 11, 6] = LIVER
    out = keep_largest_components(labels, RAS)
    assert np.array_equal(out, labels)


def test_each_organ_is_cleaned_on_its_own():
    labels = _volume()
    labels[12:18, 2:9, 2:8] = LIVER
    labels[2:6, 2:6, 2:6] = L_ADRENAL  # left side, one component: untouched
    labels[5, 5, 5] = LIVER  # a liver voxel touching the adrenal is still a separate liver component
    out = keep_largest_components(labels, RAS)
    assert (out == L_ADRENAL).sum() == (labels == L_ADRENAL).sum()
    assert out[5, 5, 5] == 0


def _dsc(pred, gt, organ):
    return score_case(pred, gt, (2.0, 2.0, 3.0), [BY_ID[organ]])[BY_ID[organ].key]["dsc"]


def test_clean_up_raises_scores_where_it_should_and_lowers_them_where_it_should():
    gt = _volume()
    gt[12:18, 2:9, 2:8] = LIVER
    # A stray blob in the prediction: clean-up must raise the DSC (to 1 here).
    pred = gt.copy()
    pred[2:4, 2:4, 2:4] = LIVER
    before, after = _dsc(pred, gt, LIVER), _dsc(postprocess(pred, RAS, "lcc"), gt, LIVER)
    assert before < 1.0 and after == pytest.approx(1.0) and after > before
    # An organ that truly has two pieces, predicted perfectly: clean-up drops one, so DSC must fall.
    gt2 = gt.copy()
    gt2[2:5, 2:5, 2:5] = LIVER
    after2 = _dsc(postprocess(gt2, RAS, "lcc"), gt2, LIVER)
    assert after2 < 1.0
    # A left kidney on the right, where the truth has none: 0 before (predicted but absent), 1 after.
    pred3 = gt.copy()
    pred3[13:15, 10:12, 8:10] = L_KIDNEY
    assert _dsc(pred3, gt, L_KIDNEY) == 0.0
    assert _dsc(postprocess(pred3, RAS, "lcc"), gt, L_KIDNEY) == 1.0
    # A true left kidney (left side) is never dropped: its DSC stays 1.
    gt4 = gt.copy()
    gt4[2:6, 2:6, 2:6] = L_KIDNEY
    assert _dsc(postprocess(gt4, RAS, "lcc"), gt4, L_KIDNEY) == 1.0


def test_ties_are_broken_the_same_whatever_the_memory_order():
    labels = _volume()
    labels[1, 1, 8:10] = LIVER  # two components of 2 voxels: this one comes first in C order,
    labels[5:7, 1, 1] = LIVER  # this one first in Fortran order
    c_order = keep_largest_components(labels, RAS)
    assert np.array_equal(keep_largest_components(np.asfortranarray(labels), RAS), c_order)
    assert (c_order[1, 1, 8:10] == LIVER).all() and (c_order == LIVER).sum() == 2


def test_none_returns_the_labels_and_unknown_modes_raise():
    labels = _volume()
    labels[1, 1, 1] = LIVER
    assert postprocess(labels, RAS, "none") is labels
    with pytest.raises(ValueError, match="unknown"):
        postprocess(labels, RAS, "largest")


def test_real_ct_paired_organs_are_on_their_side_of_the_midline(shared_ct):
    """On real anatomy the grid-centre midline keeps every kidney and adrenal, and a swap is caught."""
    img = nib.load(shared_ct / "labels" / "TS_0001.nii.gz")
    gt = np.asarray(img.dataobj).astype(np.uint8)
    out = keep_largest_components(gt, img.affine)
    for organ in (2, 7, 8, 13):
        kept = (out == organ).sum() / (gt == organ).sum()
        assert kept > 0.98, (organ, kept)
    swapped = gt.copy()
    swapped[gt == R_KIDNEY], swapped[gt == L_KIDNEY] = L_KIDNEY, R_KIDNEY
    cleaned = keep_largest_components(swapped, img.affine)
    assert not (cleaned == L_KIDNEY).any() and not (cleaned == R_KIDNEY).any()
