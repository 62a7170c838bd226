"""Every bad input to `strategies`: exit 2 and one line naming the flag or the model folder."""

from __future__ import annotations

import json

import pytest
from cli_helpers import assert_one_line_error, run_cli


def _folder_with(config: str | None):
    def make(t):
        folder = t / "model"
        folder.mkdir()
        if config is not None:
            (folder / "config.json").write_text(config)
        return ["strategies", "--model", folder], folder

    return make


def _a_file(t):
    (t / "weights.bin").write_bytes(b"\0" * 16)
    return ["strategies", "--model", t / "weights.bin"], t / "weights.bin"


CASES = {
    "--model missing folder": lambda t: (["strategies", "--model", t / "nope"], t / "nope"),
    "--model a file": _a_file,
    "--model folder without config.json": _folder_with(None),
    "--model of another type": _folder_with(json.dumps({"model_type": "bert"})),
    "--model corrupt config.json": _folder_with("{"),
    "--model clipseg config without weights": _folder_with(json.dumps({"model_type": "clipseg"})),
    "unknown flag": lambda t: (["strategies", "--bogus"], "--bogus"),
    "--json with a value": lambda t: (["strategies", "--json", "yes"], "yes"),
    "--model without a value": lambda t: (["strategies", "--model"], "--model"),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_strategies_refuses_with_one_line(case, tmp_path, capsys):
    args, names = case(tmp_path)
    rc, _, err = run_cli(args, capsys)
    assert_one_line_error(rc, err, names)
