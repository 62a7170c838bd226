"""Golden logits: our forward (and the stock one) against numbers committed with the repository.

A transformers update that changes what CLIPSeg computes must fail here rather than silently move
every result. How the file is made, regenerated and why the tolerance is what it is:
``golden_helpers.py``.
"""

from __future__ import annotations

import json

import pytest
import torch
from golden_helpers import GOLDEN, RTOL_SCALE, golden_model, golden_pixels, our_logits, summary


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


@pytest.fixture(scope="module")
def tokens(golden) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(golden["input_ids"]), torch.tensor(golden["attention_mask"])


def _assert_matches(logits: torch.Tensor, golden: dict) -> None:
    want = golden["logits"]
    got = summary(logits)
    assert list(logits.shape) == golden["shape"]
    atol = RTOL_SCALE * max(abs(want["min"]), abs(want["max"]))
    for key in want:
        torch.testing.assert_close(
            torch.tensor(got[key], dtype=torch.float64),
            torch.tensor(want[key], dtype=torch.float64),
            atol=atol,
            rtol=0,
            msg=lambda m, key=key: f"golden logits moved ({key}): {m}",
        )


def test_golden_file_is_small(golden):
    assert GOLDEN.stat().st_size < 100_000
    assert len(golden["logits"]["slice"]) == 2 * 3 * (64 // golden["stride"]) ** 2


def test_our_forward_matches_the_golden_logits(golden, tokens):
    _assert_matches(our_logits(golden_model(), *tokens), golden)


def test_the_stock_forward_matches_the_golden_logits(golden, tokens):
    model, (ids, mask), px = golden_model(), tokens, golden_pixels()
    b, k = px.shape[0], ids.shape[0]
    with torch.no_grad():
        out = model(
            pixel_values=px.repeat_interleave(k, 0),
            input_ids=ids.repeat(b, 1),
            attention_mask=mask.repeat(b, 1),
        ).logits
    _assert_matches(out.view(b, k, *out.shape[-2:]), golden)


def test_the_tolerance_catches_a_small_real_change(golden, tokens):
    """A layer-norm epsilon of 1e-6 instead of 1e-5 (the smallest change tried) must fail the check."""
    model = golden_model()
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.eps = 1e-6
    with pytest.raises(AssertionError, match="golden logits moved"):
        _assert_matches(our_logits(model, *tokens), golden)
