"""DICOM series in: the same geometry as the series' NIfTI conversion, compressed series decoded,
and the series a volume cannot be built from refused in one line."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from data_helpers import nifti_conversion, save, small_case, write_dicom_series
from scipy.spatial.transform import Rotation
from test_prepare_errors import assert_one_line_error, run

from clipseg_bench.data.io import ct_sources, read_header, read_volume
from clipseg_bench.data.prepare import prepare
from clipseg_bench.errors import InputError

# Transfer syntax UIDs GDCM writes for SimpleITK's compressors: JPEG 2000 lossless, JPEG lossless (SV1).
TRANSFER_SYNTAX = {"JPEG2000": b"1.2.840.10008.1.2.4.90", "JPEG": b"1.2.840.10008.1.2.4.70"}


@pytest.fixture(scope="module")
def ct_nifti(shared_ct):
    return shared_ct / "images" / "TS_0001_0000.nii.gz"


@pytest.mark.parametrize("compressor", [None, "JPEG2000", "JPEG"])
def test_series_reads_as_its_nifti_conversion(ct_nifti, tmp_path, compressor):
    """Voxels, grid and RAS affine equal SimpleITK's NIfTI conversion (and the CT it was written from)."""
    series = write_dicom_series(ct_nifti, tmp_path / "series", compressor=compressor)
    if compressor:
        first = next(series.iterdir()).read_bytes()
        assert TRANSFER_SYNTAX[compressor] in first[:2000]  # really stored compressed
    array, affine, zooms = read_volume(series)
    converted = nib.load(nifti_conversion(series, tmp_path / "conv.nii.gz"))
    np.testing.assert_array_equal(array, converted.get_fdata(dtype=np.float32))
    np.testing.assert_allclose(affine, converted.affine, atol=1e-6)
    assert zooms == pytest.approx(converted.header.get_zooms())
    original = nib.load(ct_nifti)
    np.testing.assert_array_equal(array, original.get_fdata(dtype=np.float32))  # int16 holds these HU
    np.testing.assert_allclose(affine, original.affine, atol=1e-5)  # positions stored with 6 decimals
    header = read_header(series)  # slice headers only, no voxels decoded
    assert header.shape == array.shape
    np.testing.assert_allclose(header.affine, affine, atol=1e-9)


def test_lps_to_ras_on_an_oblique_series(tmp_path):
    """An oblique, flipped scan: every voxel lands where ITK puts it, with x and y negated (LPS -> RAS)."""
    import SimpleITK as sitk

    image, _ = small_case()
    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_euler("zx", [25, -10], degrees=True).as_matrix() @ np.diag(
        [-0.8, 0.9, 2.5]
    )
    affine[:3, 3] = [40.0, -120.0, 300.0]
    src = save(image, tmp_path / "oblique.nii.gz", affine)
    series = write_dicom_series(src, tmp_path / "series")
    array, ras, _ = read_volume(series)
    itk = sitk.ReadImage(nifti_conversion(series, tmp_path / "conv.nii.gz"))
    for index in [(0, 0, 0), (23, 0, 0), (0, 19, 0), (0, 0, 9), (5, 7, 3)]:
        lps = np.array(itk.TransformIndexToPhysicalPoint(index))
        np.testing.assert_allclose((ras @ [*index, 1])[:3], lps * [-1, -1, 1], atol=1e-6)
    np.testing.assert_allclose(ras, nib.load(tmp_path / "conv.nii.gz").affine, atol=1e-6)
    # every voxel holds the source's value at the same world position (the affine is left-handed,
    # so the series runs along k reversed: index equality would be the wrong test)
    ijk = np.indices(array.shape).reshape(3, -1)
    world = ras[:3, :3] @ ijk + ras[:3, 3:]
    src_ijk = np.linalg.solve(affine[:3, :3], world - affine[:3, 3:])
    np.testing.assert_allclose(src_ijk, np.round(src_ijk), atol=1e-4)
    np.testing.assert_array_equal(array.reshape(-1), image[tuple(np.round(src_ijk).astype(int))])


def test_prepare_reads_a_dicom_series_like_the_nifti(shared_ct, ct_nifti, tmp_path):
    """images/<case>/ (a DICOM series) prepares to the slices of images/<case>_0000.nii.gz."""
    images, labels = tmp_path / "images", tmp_path / "labels"
    write_dicom_series(ct_nifti, images / "TS_0001", compressor="JPEG2000")
    labels.mkdir()
    (labels / "TS_0001.nii.gz").symlink_to(shared_ct / "labels" / "TS_0001.nii.gz")
    dcm = prepare(images=images, labels=labels, out=tmp_path / "dcm", png=False)
    ref = prepare(images=shared_ct / "images", labels=shared_ct / "labels", out=tmp_path / "ref", png=False)
    for kind in ("image", "label"):
        np.testing.assert_array_equal(
            np.load(dcm / "cache" / f"TS_0001_{kind}.npy"), np.load(ref / "cache" / f"TS_0001_{kind}.npy")
        )
    a, b = (json.loads((o / "dataset.json").read_text())["cases"]["TS_0001"] for o in (dcm, ref))
    np.testing.assert_allclose(a["affine"], b["affine"], atol=1e-5)
    assert a["image"] == str(images / "TS_0001") and a["shape"] == b["shape"]


@pytest.fixture
def small_nifti(tmp_path):
    image, _ = small_case()
    return save(image, tmp_path / "small.nii.gz")


@pytest.mark.parametrize(
    ("kind", "expect"),
    [
        ("two_series", "holds 2 DICOM series"),
        ("missing_slice", "1 missing slice"),
        ("uneven", "uneven slice spacing"),
        ("not_ct", "modality MR, not CT"),
        ("duplicate", "two slices at the same position"),
    ],
)
def test_series_a_volume_cannot_be_built_from(small_nifti, tmp_path, kind, expect):
    folder = tmp_path / "series"
    if kind == "two_series":
        write_dicom_series(small_nifti, folder)
        write_dicom_series(small_nifti, folder, series_uid="1.2.826.0.1.3680043.2.1125.1.2")
    elif kind == "missing_slice":
        write_dicom_series(small_nifti, folder, skip=(4,))
    elif kind == "uneven":
        write_dicom_series(small_nifti, folder, shift_mm={k: 0.4 * k for k in range(5, 10)})
    elif kind == "not_ct":
        write_dicom_series(small_nifti, folder, modality="MR")
    else:
        write_dicom_series(small_nifti, folder, shift_mm={3: 2.5})  # slice 3 on top of slice 4
    for read in (read_header, read_volume):
        with pytest.raises(InputError, match=expect) as info:
            read(folder)
        assert info.value.path == str(folder)


def test_bad_series_is_one_line_in_prepare(small_nifti, tmp_path, capsys):
    images, labels = tmp_path / "images", tmp_path / "labels"
    write_dicom_series(small_nifti, images / "c1", skip=(2,))
    _, flare = small_case()
    save(flare, labels / "c1.nii.gz")
    rc, _, err = run(
        ["prepare", "--images", str(images), "--labels", str(labels), "--out", str(tmp_path / "o")], capsys
    )
    assert "missing slice" in assert_one_line_error(rc, err, str(images / "c1"))
    assert not (tmp_path / "o").exists()


def test_ct_sources_lists_files_series_and_folders(small_nifti, tmp_path):
    folder = tmp_path / "cts"
    write_dicom_series(small_nifti, folder / "patient7")
    (folder / "scan_0000.nii.gz").symlink_to(small_nifti)
    assert ct_sources(folder) == {"patient7": folder / "patient7", "scan": folder / "scan_0000.nii.gz"}
    assert ct_sources(folder / "patient7") == {"patient7": folder / "patient7"}
    assert ct_sources(small_nifti) == {"small": small_nifti}
    (folder / "scan_0000.json").write_text("{}")  # a BIDS sidecar is not a CT, and no error
    assert set(ct_sources(folder)) == {"patient7", "scan"}
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no CT here"):
        ct_sources(tmp_path / "empty")


def test_segment_writes_the_mask_on_the_series_grid(ct_nifti, tmp_path):
    """`segment` over a folder holding a compressed DICOM series and that series' NIfTI conversion:
    both masks have the conversion's grid and affine, and the same voxels."""
    from clipseg_bench.evaluation.segment import segment

    cts = tmp_path / "cts"
    write_dicom_series(ct_nifti, cts / "series", compressor="JPEG2000")
    nifti_conversion(cts / "series", cts / "converted.nii.gz")
    out = segment(model="tiny", strategy="zeroshot", ct=cts, out=tmp_path / "masks", organs="liver,spleen")
    converted = nib.load(cts / "converted.nii.gz")
    from_series, from_nifti = nib.load(out / "series.nii.gz"), nib.load(out / "converted.nii.gz")
    for mask in (from_series, from_nifti):
        assert mask.shape == converted.shape
        np.testing.assert_allclose(mask.affine, converted.affine, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(from_series.dataobj), np.asarray(from_nifti.dataobj))
    assert np.asarray(from_series.dataobj).any()  # the comparison is not between two empty masks
