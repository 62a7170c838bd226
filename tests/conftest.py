"""Shared fixtures: phantom CT volumes, a prepared dataset, and the real CT in ../shared/data/ct.

Nothing here downloads anything: HF_HUB_OFFLINE is forced on for the whole test session.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.pop("CLIPSEG_BENCH_CACHE", None)  # a user's cache folder: tests expect the default places

# Imported after the offline switches: huggingface_hub reads them at import time.
from clipseg_bench.model.families.clipseg import build_tiny, tiny_config  # noqa: E402
from clipseg_bench.model.forward import preprocess, tokenize  # noqa: E402
from clipseg_bench.model.tokenizer import build_tiny_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_CT = REPO.parent / "shared" / "data" / "ct"


@pytest.fixture(scope="session")
def shared_ct() -> Path:
    """The real abdominal CT (TotalSegmentator sample, FLARE22 ids); read its README."""
    assert (SHARED_CT / "images" / "TS_0001_0000.nii.gz").is_file(), f"missing {SHARED_CT}"
    return SHARED_CT


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """Four small phantom cases (style A) in FLARE22 layout: images/, labels/."""
    from clipseg_bench.data.phantom import write_phantoms

    out = tmp_path_factory.mktemp("phantoms")
    write_phantoms(out, cases=4, seed=0, style="A", size=64)
    return out


@pytest.fixture(scope="session")
def prepared_dir(phantom_dir, tmp_path_factory) -> Path:
    """The phantoms prepared (3 train cases, 1 val case)."""
    from clipseg_bench.data.prepare import prepare

    out = tmp_path_factory.mktemp("prepared") / "p"
    prepare(images=phantom_dir / "images", labels=phantom_dir / "labels", out=out, val_fraction=0.25, seed=0)
    return out


# --- a tiny CLIPSeg and a small seeded batch (64 px, 3 slices, 3 prompts), for model and strategy tests ---

TINY_SIZE = 64
PROMPTS = ["liver", "right kidney", "a computerized tomography of a inferior vena cava"]


@pytest.fixture
def model():
    """Tiny CLIPSeg with 5 vision layers: layer 4 is after the deepest one the decoder reads (3)."""
    torch.manual_seed(0)
    return build_tiny(tiny_config(image_size=TINY_SIZE, vision_layers=5))


@pytest.fixture(scope="session")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture
def inputs(tokenizer) -> dict[str, torch.Tensor]:
    """pixel_values (3, 3, 64, 64) from random 48 px uint8 slices; input_ids/attention_mask (3, L)."""
    g = torch.Generator().manual_seed(0)
    slices = torch.randint(0, 256, (3, 48, 48), dtype=torch.uint8, generator=g)
    pixels = preprocess(slices, size=TINY_SIZE, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    return {"pixel_values": pixels, **tokenize(tokenizer, PROMPTS)}


# --- a tiny SAM 3 and a small seeded batch (56 px, 3 slices, 3 prompts), for model and strategy tests ---

SAM3_TEST_SIZE = 56  # 4 x 4 ViT tokens (one attention window), 16 x 16 masks: the smallest SAM 3 input


@pytest.fixture(scope="session")
def sam3_base():
    """The tiny SAM 3 at 56 px, built once; tests take copies (``sam3_model``)."""
    from clipseg_bench.model.families.sam3 import build, tiny_config

    return build(tiny_config(image_size=SAM3_TEST_SIZE))


@pytest.fixture
def sam3_model(sam3_base):
    """A fresh copy of the tiny SAM 3 (eval mode) that a test may change."""
    import copy

    return copy.deepcopy(sam3_base)


@pytest.fixture(scope="session")
def sam3_tokenizer():
    from clipseg_bench.model.families.sam3 import TEXT_LENGTH

    return build_tiny_tokenizer(max_length=TEXT_LENGTH)


@pytest.fixture
def sam3_inputs(sam3_tokenizer) -> dict[str, torch.Tensor]:
    """pixel_values (3, 3, 56, 56) from random 48 px uint8 slices; input_ids/attention_mask (3, L)."""
    g = torch.Generator().manual_seed(0)
    slices = torch.randint(0, 256, (3, 48, 48), dtype=torch.uint8, generator=g)
    pixels = preprocess(slices, size=SAM3_TEST_SIZE, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    return {"pixel_values": pixels, **tokenize(sam3_tokenizer, PROMPTS)}
