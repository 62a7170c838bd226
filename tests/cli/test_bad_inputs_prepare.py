"""`prepare` cases beyond tests/data/test_prepare_errors.py: an output that is an input, and a folder
written by another format version of prepare (not ours: refused unless --overwrite)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from cli_helpers import assert_one_line_error, digest, run_cli

from clipseg_bench.data.phantom import write_phantoms
from clipseg_bench.data.prepare import FORMAT, MARKER


@dataclass
class Layout:
    images: Path
    labels: Path

    def args(self, out, *extra) -> list:
        return ["prepare", "--images", self.images, "--labels", self.labels, "--out", out, *extra]


@pytest.fixture
def layout(tmp_path) -> Layout:
    write_phantoms(tmp_path / "in", cases=1, size=32)
    return Layout(tmp_path / "in" / "images", tmp_path / "in" / "labels")


def _future_version(lay: Layout, tmp: Path):
    out = tmp / "out"
    out.mkdir()
    (out / MARKER).write_text(FORMAT.replace("/1", "/2") + "\n")
    (out / "dataset.json").write_text('{"format": "clipseg-bench-prepared/2"}')
    return lay.args(out), out


def _zero_spacing(lay: Layout, tmp: Path):
    """A CT whose header has no sform/qform and pixdim 0: nibabel would load it at 1 mm (issue 25)."""
    image = next(lay.images.iterdir())
    img = nib.load(image)
    bare = nib.Nifti1Image(np.asanyarray(img.dataobj), None)
    bare.header.set_qform(None, code=0)
    bare.header.set_sform(None, code=0)
    bare.header["pixdim"][1:4] = 0
    nib.save(bare, image)
    return lay.args(tmp / "out"), image


def _two_cts_one_case(lay: Layout, tmp: Path):
    """``a.nii.gz`` beside ``a_0000.nii.gz``: one case id, two CTs (one would be dropped)."""
    image, label = next(lay.images.iterdir()), next(lay.labels.iterdir())
    image.rename(lay.images / "a_0000.nii.gz")
    label.rename(lay.labels / "a.nii.gz")
    (lay.images / "a.nii.gz").write_bytes((lay.images / "a_0000.nii.gz").read_bytes())
    return lay.args(tmp / "out"), lay.images / "a.nii.gz"  # the line names a_0000.nii.gz too


CASES = {
    "--out is --images": lambda lay, t: (lay.args(lay.images), lay.images),
    "--out is --images, --overwrite": lambda lay, t: (lay.args(lay.images, "--overwrite"), lay.images),
    "--out is --labels": lambda lay, t: (lay.args(lay.labels), lay.labels),
    "--out written by another version": _future_version,
    "--workers x": lambda lay, t: (lay.args(t / "out", "--workers", "x"), "--workers"),
    "--val-fraction x": lambda lay, t: (lay.args(t / "out", "--val-fraction", "x"), "--val-fraction"),
    "--seed -1": lambda lay, t: (lay.args(t / "out", "--seed", "-1"), "--seed"),
    "CT with zero voxel spacing": _zero_spacing,
    "two CTs with one case id": _two_cts_one_case,
    "--folds 1": lambda lay, t: (lay.args(t / "out", "--folds", "1"), "--folds"),
    "--folds 3 with one case": lambda lay, t: (lay.args(t / "out", "--folds", "3"), "--folds"),
    "--test-fraction 1": lambda lay, t: (lay.args(t / "out", "--test-fraction", "1"), "--test-fraction"),
    "--test-fraction with one case": lambda lay, t: (
        lay.args(t / "out", "--test-fraction", "0.5"),
        "--test-fraction",
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_prepare_refuses_and_changes_nothing(case, layout, tmp_path, capsys):
    args, names = case(layout, tmp_path)
    before = digest(tmp_path)
    rc, _, err = run_cli(args, capsys)
    assert_one_line_error(rc, err, names)
    assert digest(tmp_path) == before  # a folder it created would be listed too
