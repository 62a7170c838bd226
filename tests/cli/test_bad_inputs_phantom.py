"""Bad input to `phantom`: one line, exit 2, nothing written (and nobody's folder filled with phantoms)."""

from __future__ import annotations

import pytest
from cli_helpers import assert_one_line_error, digest, run_cli


def _foreign(t):
    (t / "mine").mkdir()
    (t / "mine" / "scan.nii.gz").write_text("precious")
    return ["phantom", "--out", t / "mine", "--cases", "1"], t / "mine"


def _a_file(t):
    (t / "f.txt").write_text("keep")
    return ["phantom", "--out", t / "f.txt", "--cases", "1"], t / "f.txt"


CASES = {
    "--out someone else's folder": _foreign,
    "--out a file": _a_file,
    "--size 3": lambda t: (["phantom", "--out", t / "P", "--size", "3"], "--size"),
    "--cases 0": lambda t: (["phantom", "--out", t / "P", "--cases", "0"], "--cases"),
    "--style C": lambda t: (["phantom", "--out", t / "P", "--style", "C"], "--style"),
    "--seed -1": lambda t: (["phantom", "--out", t / "P", "--seed", "-1"], "--seed"),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_phantom_refuses_and_writes_nothing(case, tmp_path, capsys):
    args, names = case(tmp_path)
    before = digest(tmp_path)
    rc, _, err = run_cli(args, capsys)
    assert_one_line_error(rc, err, names)
    assert digest(tmp_path) == before
    assert not (tmp_path / "P").exists()
