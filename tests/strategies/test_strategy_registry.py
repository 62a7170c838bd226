"""The registry: discovery of new strategy files, and the `strategies` command."""

from __future__ import annotations

import json
import sys
import textwrap

import clipseg_bench.strategies as strategies
from clipseg_bench.cli import main
from clipseg_bench.model.families import family_of
from clipseg_bench.model.load import load_model
from clipseg_bench.strategies import apply_strategy, available


def test_a_new_strategy_file_is_picked_up(tmp_path, monkeypatch, model):
    # A module placed on the package's search path (as a new file in the package folder would be)
    # registers itself with no other edit. The temp folder keeps the source tree untouched.
    (tmp_path / "film_only.py").write_text(
        textwrap.dedent("""
        from clipseg_bench.strategies.base import Strategy, register

        @register
        class FilmOnly(Strategy):
            name = "film-only-probe"
            description = "Only the decoder's FiLM layers train."
            lr = 1e-3

            def apply(self, model, options):
                model.decoder.film_mul.requires_grad_(True)
                model.decoder.film_add.requires_grad_(True)
    """)
    )
    monkeypatch.setattr(strategies, "__path__", [*strategies.__path__, str(tmp_path)])
    try:
        assert "film-only-probe" in available()
        counts = apply_strategy(model, "film-only-probe")
        film = [*model.decoder.film_mul.parameters(), *model.decoder.film_add.parameters()]
        assert counts.trainable == sum(p.numel() for p in film)
    finally:
        strategies.base._REGISTRY.pop("film-only-probe", None)
        sys.modules.pop("clipseg_bench.strategies.film_only", None)
    monkeypatch.undo()
    assert "film-only-probe" not in available()


def test_strategies_command_json(capsys):
    assert main(["strategies", "--model", "tiny", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["strategy"] for r in rows] == available()
    assert all(set(r) == {"strategy", "trainable_params", "total_params"} for r in rows)
    by = {r["strategy"]: r for r in rows}

    base = load_model("tiny").model  # 4 vision layers, all read: only CLIP's projections/scale unused
    total = sum(p.numel() for p in base.parameters())
    unused = sum(p.numel() for p in family_of(base).unused_parameters(base))
    assert by["zeroshot"] == {"strategy": "zeroshot", "trainable_params": 0, "total_params": total}
    assert by["full"]["trainable_params"] == total - unused and by["full"]["total_params"] == total
    assert by["decoder"]["trainable_params"] == sum(p.numel() for p in base.decoder.parameters())
    for name in ("adapter", "lora"):  # injected parameters count in the total
        assert (
            by[name]["total_params"] - total
            == by[name]["trainable_params"] - by["decoder"]["trainable_params"]
        )
    assert 0 < by["bitfit"]["trainable_params"] - by["decoder"]["trainable_params"] < total / 10


def test_strategies_command_table(capsys):
    assert main(["strategies", "--model", "tiny"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["strategy", "trainable", "total"]
    assert sorted(line.split()[0] for line in out[1:]) == available()
