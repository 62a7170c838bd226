"""`score`: a folder of predicted NIfTI label volumes against ground truth, through score_case."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from clipseg_bench.cli import main
from clipseg_bench.errors import InputError
from clipseg_bench.evaluation.metrics import score_case, summarize
from clipseg_bench.evaluation.score import score_folder
from clipseg_bench.organs import ORGANS

SPACING = (0.8, 1.2, 3.0)  # mm
# A flipped first axis and an origin, like a real scanner header; zooms = SPACING.
AFFINE = np.array([[-0.8, 0, 0, 120.0], [0, 1.2, 0, -80.0], [0, 0, 3.0, -300.0], [0, 0, 0, 1]])
SHAPE = (32, 28, 16)


def _labels(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(pred, gt) uint8 label volumes: liver, spleen, aorta in gt; the prediction is off a little."""
    rng = np.random.default_rng(seed)
    gt = np.zeros(SHAPE, np.uint8)
    gt[4:14, 4:16, 2:12] = 1  # liver
    gt[18:24, 6:12, 4:9] = 3  # spleen
    gt[20:23, 18:21, 3:13] = 5  # aorta
    noise = ndimage.gaussian_filter(rng.standard_normal(SHAPE), 1.5)
    pred = gt.copy()
    pred[(noise > 2 * noise.std()) & (gt == 0)] = 1  # false-positive liver specks
    pred[19:21, 8:10, 5:7] = 0  # a hole in the spleen
    pred[20:23, 18:21, 13:15] = 5  # aorta beyond the labelled range
    pred[26:29, 2:5, 2:4] = 9  # a gallbladder the gt lacks
    return pred, gt


def _save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


@pytest.fixture
def folders(tmp_path) -> tuple[Path, Path, dict]:
    """labels/ and pred/ with cases c01 (.nii.gz), c02 (.nii, float prediction); returns the arrays too."""
    arrays = {c: _labels(i) for i, c in enumerate(["c02", "c01"])}
    _save(tmp_path / "labels" / "c01.nii.gz", arrays["c01"][1])
    _save(tmp_path / "pred" / "c01.nii.gz", arrays["c01"][0])
    _save(tmp_path / "labels" / "c02.nii.gz", arrays["c02"][1])
    _save(tmp_path / "pred" / "c02.nii", arrays["c02"][0].astype(np.float32))
    (tmp_path / "pred" / "notes.txt").write_text("not a volume")
    return tmp_path / "pred", tmp_path / "labels", arrays


def test_score_folder_is_score_case_per_case(folders, tmp_path, capsys):
    pred, labels, arrays = folders
    out = tmp_path / "results" / "scores.csv"
    table = score_folder(pred=pred, labels=labels, out=out)

    assert list(table.columns) == ["case", "organ", "dsc", "nsd"]
    assert len(table) == 2 * len(ORGANS)
    assert list(table["case"].unique()) == ["c01", "c02"]
    per_case = {}
    for case, (p, g) in arrays.items():
        spacing = nib.load(labels / f"{case}.nii.gz").header.get_zooms()  # float32: 0.8 -> 0.80000001
        assert spacing == pytest.approx(SPACING)
        per_case[case] = score_case(p, g, spacing)
        rows = table[table["case"] == case].set_index("organ")
        assert list(rows.index) == [o.key for o in ORGANS]
        for key, s in per_case[case].items():
            assert rows.loc[key, "dsc"] == pytest.approx(s["dsc"], abs=1e-12)
            assert rows.loc[key, "nsd"] == pytest.approx(s["nsd"], abs=1e-12)
    rows = table.set_index(["case", "organ"])
    assert rows.loc[("c01", "gallbladder"), "dsc"] == 0.0  # predicted, absent from gt
    assert rows.loc[("c01", "stomach"), "nsd"] == 1.0  # absent from both
    assert rows.loc[("c01", "aorta"), "dsc"] == 1.0  # beyond the labelled range: not counted
    assert 0 < rows.loc[("c01", "liver"), "dsc"] < 1

    pd.testing.assert_frame_equal(pd.read_csv(out), table, check_exact=False, rtol=1e-9)
    printed = capsys.readouterr().out
    means = summarize(per_case)
    assert f"{means['dsc']:.4f}" in printed.splitlines()[-2]  # the "mean" line, then "-> out"
    assert f"{means['per_organ']['liver']['nsd']:.4f}" in printed


def test_missing_prediction_is_an_error_or_empty(folders):
    pred, labels, arrays = folders
    (pred / "c02.nii").unlink()
    with pytest.raises(InputError, match="missing prediction") as info:
        score_folder(pred=pred, labels=labels, out=None)
    assert "c02" in info.value.message and "\n" not in info.value.message

    table = score_folder(pred=pred, labels=labels, out=None, missing_as_empty=True).set_index(
        ["case", "organ"]
    )
    gt_ids = set(np.unique(arrays["c02"][1])) - {0}
    for o in ORGANS:
        expected = 0.0 if o.id in gt_ids else 1.0
        assert table.loc[("c02", o.key), "dsc"] == expected == table.loc[("c02", o.key), "nsd"]


@pytest.mark.parametrize(
    "bad,problem",
    [
        (lambda p: _save(p, np.zeros((32, 28, 15), np.uint8)), "shape"),
        (lambda p: _save(p, np.zeros(SHAPE, np.uint8), np.diag([0.8, 1.2, 3.0, 1.0])), "affine"),
    ],
)
def test_mismatched_prediction_is_an_error(folders, bad, problem):
    pred, labels, _ = folders
    bad(pred / "c01.nii.gz")
    with pytest.raises(InputError, match=problem) as info:
        score_folder(pred=pred, labels=labels, out=None)
    assert info.value.path.endswith("c01.nii.gz")


def test_prediction_without_ground_truth_is_an_error(folders):
    pred, labels, _ = folders
    _save(pred / "c03.nii.gz", np.zeros(SHAPE, np.uint8))
    with pytest.raises(InputError, match="no ground truth"):
        score_folder(pred=pred, labels=labels, out=None)


def test_bad_folders(tmp_path, folders):
    pred, labels, _ = folders
    with pytest.raises(InputError, match="not a folder"):
        score_folder(pred=tmp_path / "nope", labels=labels, out=None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no <case>.nii.gz"):
        score_folder(pred=pred, labels=tmp_path / "empty", out=None)
    (labels / "c01.nii.gz").write_bytes(b"not gzip")
    with pytest.raises(InputError, match="cannot read"):
        score_folder(pred=pred, labels=labels, out=None)


def test_cli_score(folders, tmp_path, capsys):
    pred, labels, _ = folders
    out = tmp_path / "s.csv"
    assert main(["score", "--pred", str(pred), "--labels", str(labels), "--out", str(out)]) == 0
    assert len(pd.read_csv(out)) == 2 * len(ORGANS)
    (pred / "c01.nii.gz").unlink()
    capsys.readouterr()
    assert main(["score", "--pred", str(pred), "--labels", str(labels)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1 and "c01" in err
    assert main(["score", "--pred", str(pred), "--labels", str(labels), "--missing-as-empty"]) == 0
