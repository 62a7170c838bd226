"""Trained-weight files: only trainable parameters, config in the metadata, strict loading."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from clipseg_bench.errors import InputError
from clipseg_bench.model import forward as fw
from clipseg_bench.model.families.clipseg import build_tiny, tiny_config
from clipseg_bench.model.weights import load_weights, read_weights_config, save_weights
from clipseg_bench.strategies import apply_strategy, available


def logits(model, inputs):
    with torch.no_grad():
        return fw.forward(
            model,
            inputs["pixel_values"],
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
        )


def fresh():
    return build_tiny(tiny_config(image_size=64, vision_layers=5))


@pytest.mark.parametrize("name", available())
def test_round_trip_reproduces_the_logits(name, inputs, tmp_path):
    trained = fresh()
    apply_strategy(trained, name)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # stand-in for training: move every trainable parameter
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    config = {"strategy": name, "lr": 1e-3}
    save_weights(trained, tmp_path / "w.safetensors", config=config)

    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        assert set(f.keys()) == {n for n, p in trained.named_parameters() if p.requires_grad}

    restored = fresh()
    apply_strategy(restored, name)
    assert load_weights(restored, tmp_path / "w.safetensors") == config
    assert read_weights_config(tmp_path / "w.safetensors") == config
    assert torch.equal(logits(restored, inputs), logits(trained, inputs))
    if name != "zeroshot":
        assert not torch.equal(logits(fresh(), inputs), logits(trained, inputs))


def test_loading_into_another_strategy_is_refused(tmp_path):
    lora = fresh()
    apply_strategy(lora, "lora")
    save_weights(lora, tmp_path / "w.safetensors")
    decoder = fresh()
    apply_strategy(decoder, "decoder")
    with pytest.raises(InputError, match="does not fit"):
        load_weights(decoder, tmp_path / "w.safetensors")
    small = fresh()
    apply_strategy(small, "lora", {"rank": 2})
    with pytest.raises(InputError, match="shape"):
        load_weights(small, tmp_path / "w.safetensors")


def test_not_a_weights_file(tmp_path):
    bad = tmp_path / "w.safetensors"
    bad.write_bytes(b"\x80\x04not a safetensors file, maybe a pickle")
    model = fresh()
    with pytest.raises(InputError, match="not a safetensors file"):
        load_weights(model, bad)
    with pytest.raises(InputError, match="not found"):
        load_weights(model, tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(bad), metadata={"config": json.dumps({})})
    with pytest.raises(InputError, match="not a clipseg-bench weights file"):
        load_weights(model, bad)
