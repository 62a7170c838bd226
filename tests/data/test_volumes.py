"""volume <-> slices (exact, orientation-independent), windowing, and the gray label encoding."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from nibabel.affines import from_matvec
from nibabel.orientations import apply_orientation, inv_ornt_aff

from clipseg_bench.data.volumes import normalize, parse_window, slices_to_volume, volume_to_slices
from clipseg_bench.organs import ORGANS, gray_to_labels, labels_to_gray

SHAPE = (7, 5, 4)
RAS_AFFINE = from_matvec(np.diag([0.8, 0.9, 2.5]), [-10.0, 20.0, 30.0])


def all_orientations():
    """The 48 axis permutations x flips, as nibabel orientation arrays."""
    for perm in itertools.permutations(range(3)):
        for flips in itertools.product((1, -1), repeat=3):
            yield np.array([[p, f] for p, f in zip(perm, flips)], dtype=float)


def reoriented(array, affine, ornt):
    """The same voxels in world space, stored in another axis order: what a scanner could write."""
    return apply_orientation(array, ornt), affine @ inv_ornt_aff(ornt, array.shape)


@pytest.fixture
def volume():
    return np.random.default_rng(0).integers(0, 1000, size=SHAPE).astype(np.int16)


def test_every_orientation_gives_the_same_slices_and_restacks_exactly(volume):
    reference, ref_meta = volume_to_slices(volume, RAS_AFFINE)
    assert reference.shape == (SHAPE[2], SHAPE[1], SHAPE[0])
    for ornt in all_orientations():
        arr, aff = reoriented(volume, RAS_AFFINE, ornt)
        slices, meta = volume_to_slices(arr, aff)
        np.testing.assert_array_equal(slices, reference)
        assert meta["slice_spacing"] == pytest.approx(ref_meta["slice_spacing"])
        back = slices_to_volume(slices, meta)
        assert back.dtype == arr.dtype
        np.testing.assert_array_equal(back, arr)
        assert meta["shape"] == list(arr.shape)


def test_display_convention_anterior_top_patient_right_left():
    """Row 0 is the most anterior row, column 0 the patient's right, z runs upward."""
    vol = np.zeros(SHAPE, np.uint8)
    vol[-1, 0, 0] = 1  # most Right, most Posterior, most Inferior voxel of a RAS array
    vol[0, -1, -1] = 2  # most Left, most Anterior, most Superior
    slices, _ = volume_to_slices(vol, RAS_AFFINE)
    z, r, c = np.argwhere(slices == 1)[0]
    assert (z, r, c) == (0, SHAPE[1] - 1, 0)  # inferior slice, bottom row (posterior), left column (right)
    z, r, c = np.argwhere(slices == 2)[0]
    assert (z, r, c) == (SHAPE[2] - 1, 0, SHAPE[0] - 1)


def test_anisotropic_spacing_follows_the_axes():
    # Array axis 0 runs posterior (0.8 mm), axis 1 superior (0.9 mm), axis 2 to the left (2.5 mm).
    permuted = from_matvec(np.array([[0, 0, -2.5], [-0.8, 0, 0], [0, 0.9, 0]]), [0, 0, 0])
    slices, meta = volume_to_slices(np.zeros(SHAPE), permuted)
    assert meta["orientation"] == "PSL"
    assert meta["spacing"] == pytest.approx([0.8, 0.9, 2.5])
    assert meta["slice_spacing"] == pytest.approx([0.8, 2.5, 0.9])  # rows (A-P), columns (R-L), slices (S)
    assert slices.shape == (SHAPE[1], SHAPE[0], SHAPE[2])


def test_oblique_affine_round_trips(volume):
    theta = np.deg2rad(20)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    aff = from_matvec(rot @ np.diag([0.7, 0.7, 3.0]), [1, 2, 3])
    slices, meta = volume_to_slices(volume, aff)
    np.testing.assert_array_equal(
        slices_to_volume(slices.astype(np.float32), meta), volume.astype(np.float32)
    )


def test_slices_to_volume_rejects_wrong_shape(volume):
    slices, meta = volume_to_slices(volume, RAS_AFFINE)
    with pytest.raises(ValueError):
        slices_to_volume(slices[:-1], meta)


def test_hu_window_maps_level_and_edges():
    w = parse_window("40,400")
    assert w == {"mode": "hu", "level": 40.0, "width": 400.0}
    hu = np.array([[-1000.0, -160.0, 40.0, 240.0, 3000.0]])
    np.testing.assert_array_equal(normalize(hu, w), [[0, 0, 128, 255, 255]])
    assert normalize(hu, "40,400").dtype == np.uint8


def test_minmax_stretches_each_slice():
    slices = np.stack([np.linspace(-500, 100, 12).reshape(3, 4), np.full((3, 4), 7.0)])
    out = normalize(slices, "minmax")
    assert out[0].min() == 0 and out[0].max() == 255
    assert (out[1] == 0).all()  # a constant slice has nothing to stretch


@pytest.mark.parametrize("bad", ["soft", "40", "40,0", "40,-1", "a,b", "1,2,3", "nan,400"])
def test_parse_window_rejects(bad):
    with pytest.raises(ValueError):
        parse_window(bad)


def test_gray_encoding_round_trip():
    labels = np.random.default_rng(0).integers(0, 14, size=(50, 50)).astype(np.uint8)
    gray = labels_to_gray(labels)
    assert set(np.unique(gray).tolist()) <= {0} | {o.gray for o in ORGANS}
    assert gray[labels == 13].min() == 255
    np.testing.assert_array_equal(gray_to_labels(gray), labels)
