"""Smoke test of benchmarks/throughput.py: its whole pipeline on the tiny model, minimal repetitions.

It checks that the script runs end to end and writes the JSON that issue 6 asks for. It asserts
nothing about speed: timings on a shared test machine say nothing, the benchmark itself is for that.
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

RATIOS = {"decoder_cached_vs_stock", "full_shared_vs_pairwise", "segment_vs_pairwise", "vision_truncation"}


@pytest.fixture(scope="module")
def throughput(throughput_parts_path):
    """The script imported as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(
        "throughput_benchmark", throughput_parts_path / "throughput.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke_result(throughput, tmp_path_factory) -> tuple[dict, str]:
    """(parsed JSON, its text) of ``throughput.py --smoke --threads 1 --json PATH``, run in this process."""
    import torch

    out = tmp_path_factory.mktemp("throughput") / "result.json"
    threads = torch.get_num_threads()
    try:  # one thread: on a busy machine two wait on each other at every small operation
        assert throughput.main(["--smoke", "--threads", "1", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads(out.read_text()), out.read_text()


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_json_has_the_four_headline_ratios(smoke_result):
    result, _ = smoke_result
    assert set(result["ratios"]) == RATIOS
    assert all(_positive(v) for v in result["ratios"].values()), result["ratios"]
    assert set(result["pass"]) == RATIOS and all(isinstance(v, bool) for v in result["pass"].values())
    assert result["headline_arch"] == "tiny" and result["profile"] == "smoke"


def test_every_strategy_row_compares_baseline_and_engine(smoke_result):
    result, _ = smoke_result
    rows = result["rows"]
    for strategy in ("decoder", "full"):
        modes = {r["mode"]: r for r in rows if r["strategy"] == strategy and "probe" not in r["mode"]}
        engine = next(r for m, r in modes.items() if m.startswith("engine:"))
        baseline = next(r for m, r in modes.items() if "per pair" in m)
        assert engine["masks"] == 2 * 13  # smoke: B=2 slices x 13 prompts, each slice encoded once
        assert baseline["masks"] == 2
        for r in (engine, baseline):
            assert _positive(r["time_s"]) and _positive(r["masks_per_s"]), r
        # the ratio is the engine's rate over the baseline's, whatever the two happen to be
        assert engine["ratio"] == pytest.approx(engine["masks_per_s"] / baseline["masks_per_s"])


def test_memory_and_data_loading_are_measured(smoke_result):
    result, _ = smoke_result
    mem = result["memory"]
    # the probe process holds at least the model it built
    assert mem["decoder_cached_peak_rss_mb"] >= mem["model_rss_mb"] > mem["torch_import_rss_mb"] > 0
    assert mem["decoder_masks"] == 2 * 13 and isinstance(mem["pass"], bool)
    data = result["data_loading"]
    assert 0 < data["share"] < 1
    assert set(data["breakdown_s"]) >= {"data", "forward", "backward", "optimizer"}


def test_json_is_strict(smoke_result):
    _, text = smoke_result
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


def test_every_architecture_has_13_distinct_prompt_embeddings(smoke_result):
    result, _ = smoke_result
    check = result["prompt_embeddings"]["tiny"]
    assert check["prompts"] == 13 and check["distinct"] and check["separation"] > check["tolerance"] > 0


def test_prompts_that_embed_alike_stop_the_benchmark(throughput, tmp_path, monkeypatch, capsys):
    """Issue 24's bug planted back: CLIP's eos id (49407), which the tiny tokenizer never emits, makes
    every prompt pool BOS; the script stops before measuring, with one line and exit 1."""
    from clipseg_bench.model.families import clipseg

    tiny_config = clipseg.tiny_config

    def clip_eos_config(**kwargs):
        config = tiny_config(**kwargs)
        config.text_config.eos_token_id = 49407
        return config

    monkeypatch.setattr(clipseg, "tiny_config", clip_eos_config)
    out = tmp_path / "result.json"
    assert throughput.main(["--smoke", "--json", str(out)]) == 1
    assert "tiny architecture: the 13 organ prompts embed alike" in capsys.readouterr().err
    assert not out.exists()
