"""The CLI's one field -> flag table: errors below the CLI name fields; the line a user sees names the flag."""

from __future__ import annotations

import argparse

import pytest

from clipseg_bench import cli
from clipseg_bench.errors import FieldError


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


@pytest.mark.parametrize("command", sorted(_commands()))
def test_every_flag_has_help_text(command):
    missing = [a.option_strings[0] for a in _commands()[command]._actions if a.option_strings and not a.help]
    assert not missing, f"{command}: {missing}"


def test_a_field_error_names_the_flag_it_came_from(capsys, monkeypatch):
    def fail(args):
        raise FieldError(args.field, "bad value")

    build = cli.build_parser

    for argv, field, shown in (
        (["benchmark", "--data", "d", "--out", "o"], "strategy", "--strategies"),  # TrainConfig field
        (["benchmark", "--data", "d", "--out", "o"], "max_steps", "--max-steps"),  # the option's dest
        (["train", "--set", "input_channels=gray"], "input_channels", "--set input_channels"),
        (["segment", "--ct", "c", "--out", "o"], "threshold", "--threshold"),
        (["train"], "strategy_options.rank", None),  # no flag sets it: named as the field
    ):
        args = build().parse_args(argv)
        args.field = field
        monkeypatch.setattr(cli, "build_parser", lambda args=args: _Fixed(args))
        args.func = fail
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        expected = shown or field
        assert err.startswith(f"error: {expected}: ") and err.endswith("bad value"), err


class _Fixed:
    def __init__(self, args):
        self.args = args

    def parse_args(self, argv):
        return self.args
