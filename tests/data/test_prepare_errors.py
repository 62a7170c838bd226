"""Every bad input to `prepare`: exit code 2, one stderr line naming the file, nothing written."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from data_helpers import AFFINE, save, small_case

from clipseg_bench.cli import main


def run(args: list[str], capsys) -> tuple[int, str, str]:
    rc = main(args)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_one_line_error(rc: int, err: str, names: str) -> str:
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert names in lines[0], lines[0]
    return lines[0]


def _corrupt(lay, case):
    lay.add(case)
    lay.image_path(case).write_bytes(np.random.default_rng(0).bytes(2000))
    return lay.image_path(case)


def _truncated(lay, case):
    image = np.random.default_rng(1).integers(-1000, 1000, size=(40, 40, 20)).astype(np.int16)
    labels = np.zeros(image.shape, np.uint8)
    lay.add(case, image=image, labels=labels)
    data = lay.image_path(case).read_bytes()
    lay.image_path(case).write_bytes(data[: len(data) * 2 // 3])  # header intact, voxels cut off
    return lay.image_path(case)


def _text(lay, case):
    lay.add(case)
    lay.image_path(case).write_bytes(gzip.compress(b"this is a README, not a CT scan\n"))
    return lay.image_path(case)


def _not_nifti(lay, case):
    lay.add(case)
    (lay.images / "notes.txt").write_text("hello")
    return lay.images / "notes.txt"


def _two_d(lay, case):
    image, labels = small_case()
    lay.add(case, image=image[:, :, 0], labels=labels[:, :, 0])
    return lay.image_path(case)


def _four_d(lay, case):
    image, labels = small_case()
    lay.add(case, image=np.stack([image, image], -1), labels=labels)
    return lay.image_path(case)


def _shape_mismatch(lay, case):
    image, labels = small_case()
    lay.add(case, image=image, labels=labels[:, :, :-1])
    return lay.label_path(case)


def _affine_mismatch(lay, case):
    other = AFFINE.copy()
    other[:3, 3] = [5.0, 0.0, 0.0]
    lay.add(case, label_affine=other)
    return lay.label_path(case)


def _unknown_label(lay, case):
    _, labels = small_case()
    labels[0, 0, 0] = 42
    lay.add(case, labels=labels)
    return lay.label_path(case)


def _fractional_label(lay, case):
    _, labels = small_case()
    labels = labels.astype(np.float32)
    labels[0, 0, 0] = 1.5
    lay.add(case, labels=labels)
    return lay.label_path(case)


def _negative_label(lay, case):
    _, labels = small_case()
    labels = labels.astype(np.int16)
    labels[0, 0, 0] = -1
    lay.add(case, labels=labels)
    return lay.label_path(case)


def _nan(lay, case):
    image, _ = small_case()
    image = image.astype(np.float32)
    image[3, 3, 3] = np.nan
    lay.add(case, image=image)
    return lay.image_path(case)


def _inf(lay, case):
    image, _ = small_case()
    image = image.astype(np.float32)
    image[3, 3, 3] = np.inf
    lay.add(case, image=image)
    return lay.image_path(case)


def _no_label(lay, case):
    lay.add(case)
    lay.label_path(case).unlink()
    return lay.image_path(case)


def _no_image(lay, case):
    lay.add(case)
    lay.image_path(case).unlink()
    return lay.label_path(case)


def _duplicate(lay, case):
    lay.add(case)
    image, _ = small_case()
    save(image, lay.images / f"{case}_0000.nii")  # same case id, other extension
    return lay.images / f"{case}_0000.nii"


BAD_CASES = {
    "corrupt file": _corrupt,
    "truncated file": _truncated,
    "text, not an image": _text,
    "file that is not NIfTI": _not_nifti,
    "2D volume": _two_d,
    "4D volume": _four_d,
    "shape differs": _shape_mismatch,
    "affine differs": _affine_mismatch,
    "unknown label value": _unknown_label,
    "non-integer label": _fractional_label,
    "negative label": _negative_label,
    "NaN intensity": _nan,
    "inf intensity": _inf,
    "image with no label": _no_label,
    "label with no image": _no_image,
    "duplicate case id": _duplicate,
}


@pytest.mark.parametrize("make_bad", BAD_CASES.values(), ids=BAD_CASES.keys())
def test_bad_case_exits_2_names_file_writes_nothing(make_bad, layout, tmp_path, capsys):
    layout.add("a_good")  # a good case first: it is processed before the bad one is found
    bad = make_bad(layout, "b_bad")
    out = tmp_path / "out"
    rc, _, err = run(layout.args(out), capsys)
    assert_one_line_error(rc, err, str(bad))
    assert not out.exists()


@pytest.mark.parametrize("make_bad", [_nan, _unknown_label, _truncated], ids=["nan", "label", "truncated"])
def test_bad_case_in_parallel_run_writes_nothing(make_bad, layout, tmp_path, capsys):
    layout.add("a_good")
    bad = make_bad(layout, "b_bad")
    out = tmp_path / "out"
    rc, _, err = run(layout.args(out, "--workers", "2"), capsys)
    assert_one_line_error(rc, err, str(bad))
    assert not out.exists()


def test_bad_case_leaves_an_earlier_prepared_folder_as_it_was(layout, tmp_path, capsys):
    layout.add("a_good")
    out = tmp_path / "out"
    assert run(layout.args(out), capsys)[0] == 0
    before = {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    bad = _nan(layout, "b_bad")
    rc, _, err = run(layout.args(out), capsys)
    assert_one_line_error(rc, err, str(bad))
    after = {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert list(json.loads((out / "dataset.json").read_text())["cases"]) == ["a_good"]


def test_empty_input_folder(layout, tmp_path, capsys):
    out = tmp_path / "out"
    rc, _, err = run(layout.args(out), capsys)
    assert_one_line_error(rc, err, str(layout.images))
    assert "empty" in err
    assert not out.exists()


def test_missing_input_folder(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["prepare", "--images", str(tmp_path / "nope"), "--labels", str(tmp_path), "--out", str(out)]
    rc, _, err = run(args, capsys)
    assert_one_line_error(rc, err, str(tmp_path / "nope"))
    assert not out.exists()


def test_output_under_a_file_cannot_be_written(layout, tmp_path, capsys):
    layout.add("a")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    rc, _, err = run(layout.args(blocker / "out"), capsys)
    assert_one_line_error(rc, err, str(blocker / "out"))
    assert blocker.read_text() == "x"


def test_output_that_is_a_file(layout, tmp_path, capsys):
    layout.add("a")
    target = tmp_path / "out.txt"
    target.write_text("keep me")
    rc, _, err = run(layout.args(target), capsys)
    assert_one_line_error(rc, err, str(target))
    assert target.read_text() == "keep me"


def test_output_the_filesystem_refuses(layout, tmp_path, capsys, monkeypatch):
    """A permission error from the OS (read-only disk, no rights; simulated: tests may run as root)."""
    layout.add("a")
    out = tmp_path / "out"
    real_mkdir = Path.mkdir

    def refuse(self, *args, **kwargs):
        if str(self).startswith(str(out)):
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    rc, _, err = run(layout.args(out), capsys)
    assert_one_line_error(rc, err, str(out))
    assert "Permission denied" in err
    assert not out.exists()


def test_foreign_non_empty_output_refused_unless_overwrite(layout, tmp_path, capsys):
    layout.add("a")
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.docx").write_text("precious")
    rc, _, err = run(layout.args(out), capsys)
    assert_one_line_error(rc, err, str(out))
    assert "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["thesis.docx"]
    rc, _, _ = run(layout.args(out, "--overwrite"), capsys)
    assert rc == 0
    assert (out / "dataset.json").is_file() and (out / "thesis.docx").read_text() == "precious"


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--window", "soft"), ("--window", "40,0"), ("--val-fraction", "1.5"), ("--workers", "0")],
)
def test_bad_option_names_the_option(flag, value, layout, tmp_path, capsys):
    layout.add("a")
    out = tmp_path / "out"
    rc, _, err = run(layout.args(out, flag, value), capsys)
    assert_one_line_error(rc, err, flag)
    assert not out.exists()


def test_split_file_with_leakage_is_refused(layout, tmp_path, capsys):
    layout.add("a").add("b", seed=1)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["a", "b"], "val": ["b"]}))
    out = tmp_path / "out"
    rc, _, err = run(layout.args(out, "--split-file", str(split)), capsys)
    assert_one_line_error(rc, err, str(split))
    assert not out.exists()


def test_unknown_label_map_file(layout, tmp_path, capsys):
    layout.add("a")
    rc, _, err = run(layout.args(tmp_path / "out", "--label-map", str(tmp_path / "nope.yaml")), capsys)
    assert_one_line_error(rc, err, str(tmp_path / "nope.yaml"))


def test_real_process_prints_one_line_and_no_traceback(layout, tmp_path):
    layout.add("a_good")
    bad = _nan(layout, "b_bad")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "clipseg_bench.cli", *layout.args(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_one_line_error(proc.returncode, proc.stderr, str(bad))
    assert not out.exists()
