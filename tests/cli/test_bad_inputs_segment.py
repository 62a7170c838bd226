"""Every bad input to `segment`: exit 2, one line naming the flag or file, and no file changed: above
all the CT itself (issue 12: `--out` equal to `--ct` replaced the CT with the mask)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from cli_helpers import assert_one_line_error, digest, run_cli


def _args(run, ct, out, *extra) -> list:
    return ["segment", "--run", run, "--ct", ct, "--out", out, *extra]


def _here(ct: Path, tmp: Path) -> Path:
    """The CT copied into the scratch folder, so relative spellings and links can point at it."""
    copy = tmp / "ct.nii.gz"
    shutil.copy(ct, copy)
    return copy


def _out_is_ct(r, ct, t):
    c = _here(ct, t)
    return _args(r, c, c), c


def _out_is_ct_spelled_otherwise(r, ct, t):
    c = _here(ct, t)
    other = t / "sub" / ".." / "ct.nii.gz"
    (t / "sub").mkdir()
    return _args(r, c, other), other


def _out_is_link_to_ct(r, ct, t):
    c = _here(ct, t)
    link = t / "link.nii.gz"
    os.symlink(c, link)
    return _args(r, c, link), link


def _ct_is_link_out_is_ct(r, ct, t):
    c = _here(ct, t)
    link = t / "link.nii.gz"
    os.symlink(c, link)
    return _args(r, link, c), c


def _overwrite_cannot_replace_an_input(r, ct, t):
    c = _here(ct, t)
    return _args(r, c, c, "--overwrite"), c


def _foreign_nifti(r, ct, t):
    out = _here(ct, t).with_name("someone_elses.nii.gz")
    shutil.copy(ct, out)
    return _args(r, ct, out), out


def _foreign_text(r, ct, t):
    out = t / "notes.nii.gz"
    out.write_text("not even an image")
    return _args(r, ct, out), out


def _foreign_probabilities(r, ct, t):
    (t / "m_probabilities.nii.gz").write_text("mine")
    return _args(r, ct, t / "m.nii.gz", "--probabilities"), t / "m_probabilities.nii.gz"


def _out_is_a_folder(r, ct, t):
    (t / "masks.nii.gz").mkdir()
    return _args(r, ct, t / "masks.nii.gz"), t / "masks.nii.gz"


def _nan_ct(r, ct, t):
    img = nib.load(str(ct))
    data = np.asarray(img.dataobj, dtype=np.float32)
    data[0, 0, 0] = np.nan
    bad = t / "nan.nii.gz"
    nib.save(nib.Nifti1Image(data, img.affine), str(bad))
    return _args(r, bad, t / "m.nii.gz"), bad


def _corrupt_run_json(r, ct, t):
    run = t / "run"
    shutil.copytree(r, run)
    (run / "run.json").write_text("{")
    return _args(run, ct, t / "m.nii.gz"), run / "run.json"


def _choice_of_an_unknown_organ(r, ct, t):
    run = t / "run"
    shutil.copytree(r, run)
    (run / "postprocess.json").write_text('{"organs": {"brain": "lcc"}}')
    return _args(run, ct, t / "m.nii.gz", "--postprocess", "auto"), run / "postprocess.json"


def _text_ct(r, ct, t):
    bad = t / "ct_text.nii.gz"
    bad.write_bytes(b"this is a README")
    return _args(r, bad, t / "m.nii.gz"), bad


def _ct_folder(ct: Path, tmp: Path, n: int = 2) -> Path:
    """A folder of ``n`` CTs (copies of one), as `segment --ct FOLDER` reads it."""
    folder = tmp / "cts"
    folder.mkdir()
    for i in range(n):
        shutil.copy(ct, folder / f"case{i}_0000.nii.gz")
    return folder


def _foreign_organ_mask(r, ct, t):
    organ_dir = t / "m" / "segmentations"
    organ_dir.mkdir(parents=True)
    (organ_dir / "liver.nii.gz").write_text("someone's own liver mask")
    return _args(r, ct, t / "m.nii.gz", "--per-organ"), organ_dir / "liver.nii.gz"


def _folder_out_is_ct_folder(r, ct, t):
    folder = _ct_folder(ct, t)
    return _args(r, folder, folder), folder


def _folder_out_is_a_file(r, ct, t):
    folder = _ct_folder(ct, t)
    (t / "masks").write_text("a file")
    return _args(r, folder, t / "masks"), t / "masks"


def _folder_out_is_a_mask_name(r, ct, t):
    folder = _ct_folder(ct, t)
    return _args(r, folder, t / "m.nii.gz"), t / "m.nii.gz"


def _folder_foreign_file_in_out(r, ct, t):
    folder = _ct_folder(ct, t)
    (t / "masks").mkdir()
    (t / "masks" / "case1.nii.gz").write_text("someone else's case1 mask")
    return _args(r, folder, t / "masks"), t / "masks" / "case1.nii.gz"


def _folder_out_inside_is_a_ct(r, ct, t):
    """--out names a folder whose <case>.nii.gz would be one of the CTs it reads (--ct a link to it)."""
    folder = _ct_folder(ct, t, n=1)
    shutil.move(folder / "case0_0000.nii.gz", folder / "case0.nii.gz")
    link = t / "cts_link"
    os.symlink(folder, link)
    return _args(r, link, folder), folder


def _folder_two_cts_one_case(r, ct, t):
    """``case0.nii.gz`` beside ``case0_0000.nii.gz``: one case id, so one mask for two CTs (issue 25)."""
    folder = _ct_folder(ct, t, n=1)
    shutil.copy(ct, folder / "case0.nii.gz")
    return _args(r, folder, t / "masks"), folder / "case0.nii.gz"  # the line names case0_0000 too


def _zero_spacing_ct(r, ct, t):
    img = nib.load(str(ct))
    bare = nib.Nifti1Image(np.asanyarray(img.dataobj), None)
    bare.header.set_qform(None, code=0)
    bare.header.set_sform(None, code=0)
    bare.header["pixdim"][1:4] = 0
    bad = t / "no_spacing.nii.gz"
    nib.save(bare, str(bad))
    return _args(r, bad, t / "m.nii.gz"), bad


def _corrupt_model(r, ct, t):
    from clipseg_bench.model.load import load_model, save_model

    model = t / "model"
    save_model(load_model("tiny", image_size=64), model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a download cut short
    return ["segment", "--model", model, "--strategy", "zeroshot", "--ct", ct, "--out", t / "m.nii.gz"], model


CASES = {
    "--out is the CT": _out_is_ct,
    "--out is the CT through ..": _out_is_ct_spelled_otherwise,
    "--out is a link to the CT": _out_is_link_to_ct,
    "--ct is a link, --out the CT": _ct_is_link_out_is_ct,
    "--overwrite does not allow the CT": _overwrite_cannot_replace_an_input,
    "--out someone else's NIfTI": _foreign_nifti,
    "--out someone else's file": _foreign_text,
    "--probabilities file someone else's": _foreign_probabilities,
    "--out is a folder": _out_is_a_folder,
    "--out not NIfTI": lambda r, ct, t: (_args(r, ct, t / "m.txt"), t / "m.txt"),
    "--out in a missing folder": lambda r, ct, t: (
        _args(r, ct, t / "no" / "m.nii.gz"),
        t / "no" / "m.nii.gz",
    ),
    "--organs ,": lambda r, ct, t: (_args(r, ct, t / "m.nii.gz", "--organs", ","), "--organs"),
    "--organs nope": lambda r, ct, t: (_args(r, ct, t / "m.nii.gz", "--organs", "liver,nope"), "--organs"),
    "--threshold 2": lambda r, ct, t: (_args(r, ct, t / "m.nii.gz", "--threshold", "2"), "--threshold"),
    "--threshold x": lambda r, ct, t: (_args(r, ct, t / "m.nii.gz", "--threshold", "x"), "--threshold"),
    "--ct missing": lambda r, ct, t: (_args(r, t / "no.nii.gz", t / "m.nii.gz"), t / "no.nii.gz"),
    "--ct not an image": _text_ct,
    "--ct with NaN": _nan_ct,
    "--run not a run": lambda r, ct, t: (_args(t, ct, t / "m.nii.gz"), t),
    "--run corrupt run.json": _corrupt_run_json,
    "neither --run nor --model": lambda r, ct, t: (["segment", "--ct", ct, "--out", t / "m.nii.gz"], "--run"),
    "--model without zeroshot": lambda r, ct, t: (
        ["segment", "--model", "tiny", "--strategy", "lora", "--ct", ct, "--out", t / "m.nii.gz"],
        "--strategy",
    ),
    "no --ct": lambda r, ct, t: (["segment", "--run", r, "--out", t / "m.nii.gz"], "--ct"),
    "--per-organ over someone else's organ mask": _foreign_organ_mask,
    "--per-organ all": lambda r, ct, t: (_args(r, ct, t / "m.nii.gz", "--per-organ", "all"), "--per-organ"),
    "--postprocess biggest": lambda r, ct, t: (
        _args(r, ct, t / "m.nii.gz", "--postprocess", "biggest"),
        "--postprocess",
    ),
    "--postprocess auto without a recorded choice": lambda r, ct, t: (
        _args(r, ct, t / "m.nii.gz", "--postprocess", "auto"),
        r,
    ),
    "--postprocess auto with a postprocess.json naming an unknown organ": _choice_of_an_unknown_organ,
    "--postprocess auto without --run": lambda r, ct, t: (
        [
            "segment",
            "--model",
            "tiny",
            "--strategy",
            "zeroshot",
            "--ct",
            ct,
            "--out",
            t / "m.nii.gz",
            "--postprocess",
            "auto",
        ],
        "--postprocess",
    ),
    "folder: --out is the --ct folder": _folder_out_is_ct_folder,
    "folder: --out is a file": _folder_out_is_a_file,
    "folder: --out a .nii.gz name": _folder_out_is_a_mask_name,
    "folder: someone else's mask in --out": _folder_foreign_file_in_out,
    "folder: --out is the CT folder through a link": _folder_out_inside_is_a_ct,
    "folder: two CTs with one case id": _folder_two_cts_one_case,
    "--ct with zero voxel spacing": _zero_spacing_ct,
    "--model with a truncated model.safetensors": _corrupt_model,
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_segment_refuses_and_changes_nothing(case, tiny_run, ct_file, tmp_path, capsys):
    args, names = case(tiny_run, ct_file, tmp_path)
    capsys.readouterr()  # what setting the case up printed (a saved model's progress bar)
    before = digest(tiny_run, ct_file, tmp_path)
    rc, _, err = run_cli(args, capsys)
    assert_one_line_error(rc, err, names)
    assert digest(tiny_run, ct_file, tmp_path) == before


def test_segment_replaces_its_own_mask_and_others_only_with_overwrite(tiny_run, ct_file, tmp_path, capsys):
    mask = tmp_path / "m.nii.gz"
    assert run_cli(_args(tiny_run, ct_file, mask), capsys)[0] == 0
    assert run_cli(_args(tiny_run, ct_file, mask), capsys)[0] == 0  # its own file: replaced
    foreign = tmp_path / "f.nii.gz"
    foreign.write_text("x")
    assert run_cli(_args(tiny_run, ct_file, foreign), capsys)[0] == 2
    assert foreign.read_text() == "x"
    assert run_cli(_args(tiny_run, ct_file, foreign, "--overwrite"), capsys)[0] == 0
    assert nib.load(str(foreign)).shape == nib.load(str(ct_file)).shape
