"""benchmarks/gpu_check.py --device cpu --quick: the real train(), evaluate and segment per strategy,
and exit 1 when the organ prompts coincide.

Its CUDA-only parts (the profiled busy fraction and its thresholds) wait for a GPU; the window they
read is unit-tested here on a synthetic trace.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    """The script as a module. It trains in bf16, which Accelerate's process-wide state refuses once an
    earlier test's fp32 Accelerator set it (the script itself runs in a fresh process): reset around."""
    from accelerate.state import AcceleratorState

    spec = importlib.util.spec_from_file_location("gpu_check_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    AcceleratorState._reset_state(reset_partial_state=True)
    yield module
    AcceleratorState._reset_state(reset_partial_state=True)
    torch.set_num_threads(threads)


def _run(gpu_check, path: Path) -> tuple[int, dict]:
    rc = gpu_check.main(["--device", "cpu", "--quick", "--threads", "1", "--out", str(path)])
    return rc, json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))


def test_quick_check_runs_the_trainer_for_every_strategy(gpu_check, tmp_path, monkeypatch):
    from clipseg_bench.strategies import available
    from clipseg_bench.train import loop

    trained = []
    real_train = loop.train
    monkeypatch.setattr(
        loop, "train", lambda cfg, **kw: trained.append(cfg.strategy) or real_train(cfg, **kw)
    )
    rc, doc = _run(gpu_check, tmp_path / "check.json")
    assert rc == 0 and doc["ok"] and doc["device"] == "cpu" and doc["settings"]["arch"] == "tiny"
    assert trained == list(available())  # the real train(), once per strategy
    assert doc["prompt_embeddings"]["ok"] and doc["prompt_embeddings"]["prompts"] == 13
    assert all(r["ok"] for r in doc["logits"].values())  # our forward equals the stock one, fp32 and bf16
    for row in doc["strategies"]:
        assert row["ok"] and row["status"] == "finished" and row["compute"]["mixed_precision"] == "bf16", row
        assert row["evaluate_s"] > 0 and row["segment_ok"] and row["busy"] is None  # no profiler on CPU
        assert set(row["host_s_per_step"]) >= {"data", "forward", "backward", "optimizer", "sync"}
        if row["strategy"] != "zeroshot":
            assert row["masks_per_s"] > 0 and len(row["losses"]) == 1, row


def test_coinciding_prompts_fail_the_check(gpu_check, tmp_path, monkeypatch):
    """Issue 24's bug planted back: a text config whose eos id the tokenizer never emits (CLIP's 49407)
    pools BOS, every prompt embeds alike, and the check exits 1 saying so before it trains anything."""
    base_config = gpu_check.base_config

    def clip_eos(arch, image_size):
        config = base_config(arch, image_size)
        config.text_config.eos_token_id = 49407
        return config

    monkeypatch.setattr(gpu_check, "base_config", clip_eos)
    rc, doc = _run(gpu_check, tmp_path / "check.json")
    assert rc == 1 and not doc["ok"]
    assert not doc["prompt_embeddings"]["ok"] and doc["prompt_embeddings"]["separation"] == 0.0
    assert all(r["ok"] for r in doc["logits"].values())  # everything else is fine: only this check sees it
    assert doc["strategies"] == []  # nothing measured on a model whose masks ignore the prompt


def test_busy_fraction_is_the_union_of_device_work_over_wall_time(gpu_check):
    trace = {
        "traceEvents": [
            {"cat": "kernel", "ts": 0, "dur": 40},
            {"cat": "kernel", "ts": 30, "dur": 20},  # overlaps the first (another stream): counted once
            {"cat": "gpu_memcpy", "ts": 60, "dur": 10},
            {"cat": "cpu_op", "ts": 0, "dur": 100},  # host work is not device work
            {"cat": "kernel", "ts": 90, "dur": 5},
        ]
    }
    busy = gpu_check.busy_fraction(trace, wall_s=100e-6, steps=2)
    assert busy["fraction"] == pytest.approx(0.65) and busy["kernels_per_step"] == 1.5
