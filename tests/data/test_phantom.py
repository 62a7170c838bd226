"""The phantom generator: valid, deterministic, anatomical, plausible HU, two distinct styles."""

from __future__ import annotations

import time

import nibabel as nib
import numpy as np
import pytest

from clipseg_bench.cli import main
from clipseg_bench.data.phantom import make_phantom, write_phantoms
from clipseg_bench.errors import InputError
from clipseg_bench.organs import BY_KEY, ORGANS


def centroid_mm(labels: np.ndarray, affine: np.ndarray, organ_id: int) -> np.ndarray:
    """World (RAS, mm) centroid of one organ."""
    ijk = np.argwhere(labels == organ_id).mean(axis=0)
    return affine[:3, :3] @ ijk + affine[:3, 3]


@pytest.fixture(scope="module")
def cases():
    return {
        (style, i): make_phantom(seed=3, index=i, style=style, size=64) for style in "AB" for i in range(3)
    }


def test_all_13_organs_in_every_case(cases):
    for (style, i), (image, labels, _) in cases.items():
        assert image.dtype == np.int16 and labels.dtype == np.uint8
        assert set(np.unique(labels).tolist()) == set(range(14)), (style, i)


def test_deterministic_and_varying():
    a = make_phantom(seed=3, index=1, style="A", size=64)
    b = make_phantom(seed=3, index=1, style="A", size=64)
    c = make_phantom(seed=3, index=2, style="A", size=64)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert a[0].shape != c[0].shape or not np.array_equal(a[1], c[1])


def test_geometry_anisotropic_and_plausible_body_size(cases):
    for (_, _), (image, _, affine) in cases.items():
        size, _, n_slices = image.shape
        assert size == 64 and 32 <= n_slices <= 48
        sx, sy, sz = np.abs(np.diag(affine)[:3])
        assert sx == sy and 290 <= sx * size <= 440  # a 30-43 cm field of view around the body
        assert 2.5 <= sz <= 5.0
        assert nib.aff2axcodes(affine) == ("R", "A", "S")


def test_organs_in_their_anatomical_places(cases):
    for (style, i), (_, labels, affine) in cases.items():
        c = {o.key: centroid_mm(labels, affine, o.id) for o in ORGANS}
        x, y, z = 0, 1, 2  # RAS: +x patient right, +y anterior, +z superior
        assert c["liver"][x] > 0 and c["spleen"][x] < 0, (style, i)
        assert c["right_kidney"][x] > 0 > c["left_kidney"][x]
        assert (
            c["right_kidney"][y] < c["liver"][y] and c["left_kidney"][y] < c["stomach"][y]
        )  # kidneys posterior
        assert c["aorta"][x] < c["inferior_vena_cava"][x]  # IVC to the right of the aorta
        assert (
            c["right_adrenal_gland"][z] > c["right_kidney"][z]
            and c["left_adrenal_gland"][z] > c["left_kidney"][z]
        )
        assert c["esophagus"][z] > c["pancreas"][z] and c["liver"][z] > c["gallbladder"][z]
        sizes = np.bincount(labels.ravel(), minlength=14)
        assert sizes[BY_KEY["liver"].id] == sizes[1:].max()  # the liver is the largest organ


def test_hu_values_plausible(cases):
    for style in "AB":
        image, labels, _ = cases[(style, 0)]
        med = {o.key: np.median(image[labels == o.id]) for o in ORGANS}
        assert np.median(image[:, :, :][image < -900]) == pytest.approx(-1000, abs=60)  # air outside
        assert 150 <= med["aorta"] <= 260
        assert 40 <= med["liver"] <= 120
        assert image.max() >= 400  # bone
        assert image.min() >= -1024


def test_style_b_is_a_shifted_look(cases):
    def noise_std(image):  # air outside the body is flat, so its spread is the noise
        return image[:4, :4, :].std()

    a_img, a_lab, _ = cases[("A", 0)]
    b_img, b_lab, _ = cases[("B", 0)]
    liver, ivc = BY_KEY["liver"].id, BY_KEY["inferior_vena_cava"].id
    assert np.median(b_img[b_lab == liver]) - np.median(a_img[a_lab == liver]) > 25
    assert np.median(b_img[b_lab == ivc]) < np.median(a_img[a_lab == ivc]) - 30
    assert noise_std(b_img) > 1.8 * noise_std(a_img)
    a_liver = np.mean([(c[1] == liver).sum() for k, c in cases.items() if k[0] == "A"])
    b_liver = np.mean([(c[1] == liver).sum() for k, c in cases.items() if k[0] == "B"])
    assert b_liver < 0.85 * a_liver  # other organ sizes


def test_write_phantoms_flare_layout_and_fast(tmp_path):
    t0 = time.perf_counter()
    ids = write_phantoms(tmp_path, cases=4, seed=0, style="B", size=64)
    seconds = time.perf_counter() - t0
    assert ids == [f"phantomB_{i:04d}" for i in range(4)]
    for case in ids:
        img = nib.load(tmp_path / "images" / f"{case}_0000.nii.gz")
        lab = nib.load(tmp_path / "labels" / f"{case}.nii.gz")
        assert img.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
        np.testing.assert_allclose(img.affine, lab.affine)
    assert seconds < 10.0, seconds  # ~1 s on a laptop core; generous for a shared CI machine


def test_cli_phantom(tmp_path, capsys):
    assert main(["phantom", "--out", str(tmp_path), "--cases", "2", "--size", "48", "--seed", "1"]) == 0
    assert "2 phantom cases" in capsys.readouterr().out
    assert len(list((tmp_path / "images").glob("*.nii.gz"))) == 2


@pytest.mark.parametrize("kwargs", [{"cases": 0}, {"cases": 1, "style": "C"}, {"cases": 1, "size": 8}])
def test_bad_phantom_options(tmp_path, kwargs):
    with pytest.raises(InputError):
        write_phantoms(tmp_path / "p", **kwargs)


def test_phantoms_are_valid_prepare_input(prepared_dir):
    import json

    doc = json.loads((prepared_dir / "dataset.json").read_text())
    assert len(doc["cases"]) == 4
    assert doc["organs_found"] == list(range(1, 14))
    assert sorted(c["split"] for c in doc["cases"].values()) == ["train", "train", "train", "val"]
