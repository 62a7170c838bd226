"""Every bad input to `score`: exit 2, one line naming the flag or file, and no volume or earlier CSV
changed (issue 12: `--out` on a label file replaced it with the CSV; ids outside 0-13 and NaNs
were scored)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from cli_helpers import assert_one_line_error, digest, run_cli

AFFINE = np.diag([0.8, 0.8, 2.5, 1.0])


def _volume(seed: int) -> np.ndarray:
    labels = np.zeros((20, 18, 8), np.uint8)
    labels[3 + seed : 10, 4:12, 2:6] = 1
    labels[12:16, 10:15, 3:5] = 13
    return labels


def _save(path: Path, data: np.ndarray, affine=AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


@pytest.fixture
def folders(tmp_path) -> tuple[Path, Path]:
    """pred/ and labels/ with two good cases each."""
    for i, case in enumerate(["a", "b"]):
        _save(tmp_path / "labels" / f"{case}.nii.gz", _volume(0))
        _save(tmp_path / "pred" / f"{case}.nii.gz", _volume(i))
    return tmp_path / "pred", tmp_path / "labels"


def _args(pred, labels, *extra) -> list:
    return ["score", "--pred", pred, "--labels", labels, *extra]


def _value_in(folder_index: int, value, dtype=np.uint8):
    def make(pred, labels, t):
        target = [pred, labels][folder_index] / "b.nii.gz"
        data = _volume(1).astype(dtype)
        data[0, 0, 0] = value
        _save(target, data)
        return _args(pred, labels), target

    return make


def _foreign_csv(pred, labels, t):
    out = t / "mine.csv"
    out.write_text("my,own,table\n1,2,3\n")
    return _args(pred, labels, "--out", out), out


def _grid_differs(pred, labels, t):
    shifted = AFFINE.copy()
    shifted[:3, 3] = [4.0, 0, 0]
    target = _save(pred / "a.nii.gz", _volume(0), shifted)
    return _args(pred, labels), target


def _out_under_a_file(pred, labels, t):
    blocker = t / "file"
    blocker.write_text("x")
    return _args(pred, labels, "--out", blocker / "s.csv"), blocker / "s.csv"


def _missing_prediction(pred, labels, t):
    (pred / "b.nii.gz").unlink()
    return _args(pred, labels), pred / "b.nii.gz"


def _prediction_without_truth(pred, labels, t):
    extra = _save(pred / "c.nii.gz", _volume(0))
    return _args(pred, labels), extra


def _corrupt_label(pred, labels, t):
    (labels / "a.nii.gz").write_bytes(b"not gzip")
    return _args(pred, labels), labels / "a.nii.gz"


def _empty_labels(pred, labels, t):
    (t / "empty").mkdir()
    return _args(pred, t / "empty"), t / "empty"


CASES = {
    "--out is a label file": lambda p, gt, t: (_args(p, gt, "--out", gt / "a.nii.gz"), gt / "a.nii.gz"),
    "--out is a prediction": lambda p, gt, t: (_args(p, gt, "--out", p / "b.nii.gz"), p / "b.nii.gz"),
    "--out is the labels folder": lambda p, gt, t: (_args(p, gt, "--out", gt), gt),
    "--out is a label, --overwrite": lambda p, gt, t: (
        _args(p, gt, "--out", gt / "a.nii.gz", "--overwrite"),
        gt / "a.nii.gz",
    ),
    "--out someone else's CSV": _foreign_csv,
    "--out under a file": _out_under_a_file,
    "prediction id 42": _value_in(0, 42),
    "ground-truth id 14": _value_in(1, 14),
    "prediction NaN": _value_in(0, np.nan, np.float32),
    "prediction 1.5": _value_in(0, 1.5, np.float32),
    "prediction -1": _value_in(0, -1, np.int16),
    "--pred is --labels": lambda p, gt, t: (_args(gt, gt), gt),
    "--pred missing": lambda p, gt, t: (_args(t / "nope", gt), t / "nope"),
    "--labels empty": _empty_labels,
    "prediction grid differs": _grid_differs,
    "missing prediction": _missing_prediction,
    "prediction without truth": _prediction_without_truth,
    "corrupt label file": _corrupt_label,
    "no --labels": lambda p, gt, t: (["score", "--pred", p], "--labels"),
    "--postprocess biggest": lambda p, gt, t: (_args(p, gt, "--postprocess", "biggest"), "--postprocess"),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_score_refuses_and_changes_nothing(case, folders, tmp_path, capsys):
    pred, labels = folders
    args, names = case(pred, labels, tmp_path)
    before = digest(tmp_path)
    rc, _, err = run_cli(args, capsys)
    assert_one_line_error(rc, err, names)
    assert digest(tmp_path) == before


def test_score_replaces_its_own_csv_and_others_only_with_overwrite(folders, tmp_path, capsys):
    pred, labels = folders
    out = tmp_path / "s.csv"
    assert run_cli(_args(pred, labels, "--out", out), capsys)[0] == 0
    assert run_cli(_args(pred, labels, "--out", out), capsys)[0] == 0  # its own CSV: replaced
    assert list(pd.read_csv(out).columns) == ["case", "organ", "dsc", "nsd"]
    mine = tmp_path / "mine.csv"
    mine.write_text("x\n")
    assert run_cli(_args(pred, labels, "--out", mine), capsys)[0] == 2
    assert run_cli(_args(pred, labels, "--out", mine, "--overwrite"), capsys)[0] == 0
    assert len(pd.read_csv(mine)) == 2 * 13


def _segments_own(path: Path, data: np.ndarray) -> Path:
    """A file as `segment` writes it: its header description marks it."""
    from clipseg_bench.data.io import SEGMENT_DESCRIPTION

    img = nib.Nifti1Image(data, AFFINE)
    img.header["descrip"] = SEGMENT_DESCRIPTION
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def test_score_skips_what_segment_writes_beside_its_masks(folders, capsys):
    """Issue 25: `score --pred` on a folder `segment --probabilities --per-organ` wrote refused its own
    `_probabilities` file as a prediction without ground truth. A file of that name segment did not
    write is still a prediction (and refused without its ground truth)."""
    pred, labels = folders
    _segments_own(pred / "a_probabilities.nii.gz", np.zeros((20, 18, 8, 2), np.float32))
    _segments_own(pred / "a" / "segmentations" / "liver.nii.gz", (_volume(0) == 1).astype(np.uint8))
    rc, out, err = run_cli(_args(pred, labels), capsys)
    assert rc == 0, err
    assert "(2 cases)" in out
    _save(pred / "b_probabilities.nii.gz", _volume(0))  # someone's own file: a prediction
    rc, _, err = run_cli(_args(pred, labels), capsys)
    assert_one_line_error(rc, err, pred / "b_probabilities.nii.gz")
