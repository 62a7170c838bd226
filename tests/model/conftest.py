"""Fixtures for the model tests: a tiny CLIPSeg and a small seeded batch (64 px, 3 slices, 3 prompts)."""

from __future__ import annotations

import pytest
import torch

from clipseg_bench.model.forward import preprocess, tokenize
from clipseg_bench.model.load import build_tiny, tiny_config
from clipseg_bench.model.tokenizer import build_tiny_tokenizer

SIZE = 64
PROMPTS = ["liver", "right kidney", "a computerized tomography of a inferior vena cava"]


@pytest.fixture
def model():
    """Tiny CLIPSeg with 5 vision layers: layer 4 is after the deepest one the decoder reads (3)."""
    torch.manual_seed(0)
    return build_tiny(tiny_config(image_size=SIZE, vision_layers=5))


@pytest.fixture(scope="session")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture
def inputs(tokenizer) -> dict[str, torch.Tensor]:
    """pixel_values (3, 3, 64, 64) from random 48 px uint8 slices; input_ids/attention_mask (3, L)."""
    g = torch.Generator().manual_seed(0)
    slices = torch.randint(0, 256, (3, 48, 48), dtype=torch.uint8, generator=g)
    pixels = preprocess(slices, size=SIZE, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    return {"pixel_values": pixels, **tokenize(tokenizer, PROMPTS)}
