"""benchmarks/gpu_check.py on CPU (--device cpu --quick, tiny architecture): every check runs and is reported.

Its CUDA branch (real architecture, peak CUDA memory) waits for a GPU; everything else is the same code.
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
    spec = importlib.util.spec_from_file_location("gpu_check_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    yield module
    torch.set_num_threads(threads)


def _run(gpu_check, path: Path) -> tuple[int, dict]:
    rc = gpu_check.main(["--device", "cpu", "--quick", "--threads", "1", "--json", str(path)])
    return rc, json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))


def test_every_strategy_and_precision_is_checked_on_cpu(gpu_check, tmp_path):
    from clipseg_bench.strategies import available

    rc, doc = _run(gpu_check, tmp_path / "check.json")
    assert rc == 0 and doc["ok"] and doc["arch"] == "tiny" and doc["device"] == "cpu"
    assert {(c["strategy"], c["precision"]) for c in doc["checks"]} == {
        (s, p) for s in available() for p in ("fp32", "bf16")
    }
    for c in doc["checks"]:
        assert c["ok"] and c["finite"] and c["masks_per_s"] > 0 and c["peak_cuda_mb"] is None, c
        assert all(a["reached"] == a["trainable"] for a in c["gradient_audit"].values()), c
    assert all(doc["logits"][p]["ok"] for p in ("fp32", "bf16"))
    assert doc["prompt_embeddings"]["distinct"] and doc["prompt_embeddings"]["prompts"] == 13


def test_a_failing_check_exits_non_zero(gpu_check, tmp_path, monkeypatch):
    """Logits that drift from the stock forward's fail the check: exit 1, and the JSON says which."""
    from clipseg_bench import strategies
    from clipseg_bench.model import forward as fw

    decode = fw.decode
    monkeypatch.setattr(fw, "decode", lambda *a, **k: decode(*a, **k) + 0.01)
    monkeypatch.setattr(strategies, "available", lambda: ["decoder"])  # one strategy is enough here
    rc, doc = _run(gpu_check, tmp_path / "check.json")
    assert rc == 1 and not doc["ok"] and not doc["logits"]["fp32"]["ok"]


def test_prompts_that_embed_alike_fail_the_check(gpu_check, tmp_path, monkeypatch):
    """Issue 24's bug planted back: a text config whose eos id the tokenizer never emits (CLIP's 49407)
    pools BOS, every prompt embeds alike, and the check exits 1 saying so, though training runs fine."""
    from clipseg_bench import strategies
    from clipseg_bench.model.families.clipseg import build_tiny, tiny_config

    def clip_eos_model(arch, image_size):
        config = tiny_config(image_size=image_size)
        config.text_config.eos_token_id = 49407
        return build_tiny(config)

    monkeypatch.setattr(gpu_check, "base_model", clip_eos_model)
    monkeypatch.setattr(strategies, "available", lambda: ["decoder"])  # one strategy is enough here
    rc, doc = _run(gpu_check, tmp_path / "check.json")
    assert rc == 1 and not doc["ok"]
    assert doc["prompt_embeddings"]["distinct"] is False and doc["prompt_embeddings"]["separation"] == 0.0
    assert all(c["ok"] for c in doc["checks"]) and all(r["ok"] for r in doc["logits"].values())
