"""`prepare` on the real abdominal CT in ../shared/data/ct, as given and reoriented/rescaled copies."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

from clipseg_bench.data.prepare import prepare
from clipseg_bench.data.volumes import normalize, slices_to_volume
from clipseg_bench.errors import InputError
from clipseg_bench.organs import BY_KEY, load_label_map

# The scan's README: 12 of the 13 organs (no esophagus), labels on z slices 57..111 of 112.
LABELLED_Z = range(57, 112)


def reoriented(img, axcodes: str):
    """The same scan stored in another voxel order (its affine adjusted by nibabel)."""
    return img.as_reoriented(ornt_transform(io_orientation(img.affine), axcodes2ornt(axcodes)))


def rescaled(img, zooms):
    """The same voxels with other voxel sizes (another scanner's grid, as far as prepare can tell)."""
    affine = img.affine.copy()
    affine[:3, :3] = img.affine[:3, :3] @ np.diag(np.asarray(zooms) / np.asarray(img.header.get_zooms()[:3]))
    return img.__class__(np.asanyarray(img.dataobj), affine)


@pytest.fixture(scope="module")
def variants(shared_ct, tmp_path_factory):
    """The CT as given (RAS), flipped to LAS, permuted to PIR, and with 0.8 x 0.8 x 2.5 mm voxels."""
    root = tmp_path_factory.mktemp("ct")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    image = nib.load(shared_ct / "images" / "TS_0001_0000.nii.gz")
    label = nib.load(shared_ct / "labels" / "TS_0001.nii.gz")
    made = {
        "ras": (image, label),
        "las": (reoriented(image, "LAS"), reoriented(label, "LAS")),
        "pir": (reoriented(image, "PIR"), reoriented(label, "PIR")),
        "fine": (rescaled(image, (0.8, 0.8, 2.5)), rescaled(label, (0.8, 0.8, 2.5))),
    }
    for case, (img, lab) in made.items():
        nib.save(img, root / "images" / f"{case}_0000.nii.gz")
        nib.save(lab, root / "labels" / f"{case}.nii.gz")
    out = prepare(images=root / "images", labels=root / "labels", out=root / "prepared", val_fraction=0.0)
    return root, out, made


def test_orientation_of_the_variants(variants):
    _, _, made = variants
    assert {c: "".join(nib.aff2axcodes(i.affine)) for c, (i, _) in made.items()} == {
        "ras": "RAS",
        "las": "LAS",
        "pir": "PIR",
        "fine": "RAS",
    }


def test_real_ct_organs_and_slices(variants):
    _, out, _ = variants
    doc = json.loads((out / "dataset.json").read_text())
    ras = doc["cases"]["ras"]
    assert ras["organs_found"] == [i for i in range(1, 14) if i != BY_KEY["esophagus"].id]
    assert ras["n_slices"] == 112 and ras["n_kept"] == len(LABELLED_Z)
    assert ras["orientation"] == "RAS" and ras["spacing"] == pytest.approx([3.0, 3.0, 3.0])
    with (out / "manifest.csv").open() as fh:
        kept = [int(r["z"]) for r in csv.DictReader(fh) if r["case"] == "ras" and r["kept"] == "1"]
    assert kept == list(LABELLED_Z)
    labels = np.load(out / "cache" / "ras_label.npy")
    liver = np.argwhere(labels == BY_KEY["liver"].id)[:, 2].mean()
    spleen = np.argwhere(labels == BY_KEY["spleen"].id)[:, 2].mean()
    assert liver < labels.shape[2] / 2 < spleen  # radiological view: the liver on the image's left


def test_every_variant_prepares_to_the_same_slices(variants):
    _, out, _ = variants
    ref_image, ref_label = np.load(out / "cache" / "ras_image.npy"), np.load(out / "cache" / "ras_label.npy")
    for case in ("las", "pir", "fine"):
        np.testing.assert_array_equal(np.load(out / "cache" / f"{case}_image.npy"), ref_image)
        np.testing.assert_array_equal(np.load(out / "cache" / f"{case}_label.npy"), ref_label)


def test_spacing_follows_the_header(variants):
    _, out, _ = variants
    with (out / "manifest.csv").open() as fh:
        rows = {r["case"]: r for r in csv.DictReader(fh) if r["z"] == "0"}
    assert [float(rows["fine"][k]) for k in ("spacing_x", "spacing_y", "spacing_z")] == pytest.approx(
        [0.8, 0.8, 2.5]
    )
    assert [float(rows["pir"][k]) for k in ("spacing_x", "spacing_y", "spacing_z")] == pytest.approx(
        [3.0, 3.0, 3.0]
    )


def test_exact_reassembly_on_each_original_grid(variants):
    root, out, made = variants
    doc = json.loads((out / "dataset.json").read_text())
    for case, (img, lab) in made.items():
        meta = doc["cases"][case]
        assert meta["shape"] == list(img.shape)
        np.testing.assert_allclose(meta["affine"], img.affine, atol=1e-6)
        labels = slices_to_volume(np.load(out / "cache" / f"{case}_label.npy"), meta)
        np.testing.assert_array_equal(labels, np.asanyarray(lab.dataobj))
        image = slices_to_volume(np.load(out / "cache" / f"{case}_image.npy"), meta)
        np.testing.assert_array_equal(image, normalize(img.get_fdata(), doc["window"]))


def test_totalsegmentator_label_map(shared_ct, tmp_path):
    """TotalSegmentator ids (and structures FLARE22 does not score) map back onto FLARE22 ids."""
    label = nib.load(shared_ct / "labels" / "TS_0001.nii.gz")
    flare = np.asanyarray(label.dataobj)
    ts_of_flare = {v: k for k, v in load_label_map("totalsegmentator").mapping.items() if k != 0}
    ts = np.zeros(flare.shape, np.uint8)
    for flare_id, ts_id in ts_of_flare.items():
        ts[flare == flare_id] = ts_id
    ts[(flare == 0)[:, :, :] & (np.arange(flare.shape[2]) > 100)[None, None, :]] = (
        12  # e.g. lung: not FLARE22
    )
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    (tmp_path / "images" / "ts_0000.nii.gz").symlink_to(shared_ct / "images" / "TS_0001_0000.nii.gz")
    nib.save(nib.Nifti1Image(ts, label.affine), tmp_path / "labels" / "ts.nii.gz")
    out = prepare(
        images=tmp_path / "images",
        labels=tmp_path / "labels",
        out=tmp_path / "o",
        label_map="totalsegmentator",
        png=False,
    )
    meta = json.loads((out / "dataset.json").read_text())["cases"]["ts"]
    np.testing.assert_array_equal(slices_to_volume(np.load(out / "cache" / "ts_label.npy"), meta), flare)
    with pytest.raises(InputError, match="does not know: 19, 52, 63") as info:  # FLARE22 ids stop at 13
        prepare(
            images=tmp_path / "images", labels=tmp_path / "labels", out=tmp_path / "o2", label_map="flare22"
        )
    assert info.value.path == str(tmp_path / "labels" / "ts.nii.gz")
    assert not (tmp_path / "o2").exists()
