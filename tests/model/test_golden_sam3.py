"""Golden logits of the tiny SAM 3: our forward and the stock ``Sam3Model`` forward against numbers
committed with the repository, so a transformers update that changes what SAM 3 computes fails here
instead of silently moving every result.

Made like CLIPSeg's (``golden_helpers.py``): the tiny SAM 3 at 56 px with every weight filled from a
closed-form hash of its name (no RNG, no transformers init), a fixed input, every mask output mode.
``golden_logits_sam3.json`` keeps summary statistics and every 8th pixel. Regenerate it, after
checking that a change of the numbers is intended, with::

    .venv/bin/python tests/model/test_golden_sam3.py

and commit the new file with the reason in the message. The tolerance is ``golden_helpers``'s:
2e-5 of the logits' largest magnitude.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from golden_helpers import PROMPTS, RTOL_SCALE, STRIDE, _round, fill_deterministic, golden_pixels, summary

GOLDEN = Path(__file__).with_name("golden_logits_sam3.json")
SIDE = 56  # the smallest SAM 3 input: 4 x 4 ViT tokens, 16 x 16 masks


def golden_model():
    from clipseg_bench.model.families.sam3 import build, tiny_config

    return fill_deterministic(build(tiny_config(image_size=SIDE)))


def golden_inputs() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from clipseg_bench.model.families.sam3 import TEXT_LENGTH
    from clipseg_bench.model.forward import tokenize
    from clipseg_bench.model.tokenizer import build_tiny_tokenizer

    return golden_pixels()[..., :SIDE, :SIDE], tokenize(build_tiny_tokenizer(TEXT_LENGTH), PROMPTS)


def logits(model, mode: str, *, stock: bool = False) -> torch.Tensor:
    """(2, 3, 56, 56) logits of ``mode``, by our forward or the stock one per pair."""
    from clipseg_bench.model import forward as fw
    from clipseg_bench.model.families import family_of

    pixels, tokens = golden_inputs()
    fam = family_of(model)
    saved, fam.mask_output = fam.mask_output, mode
    try:
        with torch.no_grad():
            if stock:
                return fam.stock_logits(model, pixels, tokens["input_ids"], tokens["attention_mask"])
            return fw.forward(model, pixels, **tokens)
    finally:
        fam.mask_output = saved


def write_golden(path: Path = GOLDEN) -> dict:
    import transformers

    from clipseg_bench.model.families.sam3 import MASK_OUTPUTS

    model = golden_model()
    doc = {
        "about": "tests/model/test_golden_sam3.py: tiny SAM 3, hash-filled weights, fixed input",
        "made_with": {"transformers": transformers.__version__, "torch": torch.__version__},
        "image_size": SIDE,
        "prompts": PROMPTS,
        "stride": STRIDE,
        "logits": {m: {k: _round(v) for k, v in summary(logits(model, m)).items()} for m in MASK_OUTPUTS},
    }
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return doc


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


@pytest.fixture(scope="module")
def model():
    return golden_model()


def _assert_matches(got: torch.Tensor, want: dict) -> None:
    assert got.shape == (2, 3, SIDE, SIDE)
    atol = RTOL_SCALE * max(abs(want["min"]), abs(want["max"]))
    for key, value in summary(got).items():
        torch.testing.assert_close(
            torch.tensor(value, dtype=torch.float64),
            torch.tensor(want[key], dtype=torch.float64),
            atol=atol,
            rtol=0,
            msg=lambda m, key=key: f"golden logits moved ({key}): {m}",
        )


def test_golden_file_is_small_and_covers_every_mode(golden):
    from clipseg_bench.model.families.sam3 import MASK_OUTPUTS

    assert GOLDEN.stat().st_size < 100_000
    assert set(golden["logits"]) == set(MASK_OUTPUTS)


@pytest.mark.parametrize("stock", [False, True], ids=["ours", "stock"])
def test_forward_matches_the_golden_logits(golden, model, stock):
    for mode, want in golden["logits"].items():
        _assert_matches(logits(model, mode, stock=stock), want)


def test_the_tolerance_catches_a_small_real_change(golden):
    """Layer-norm epsilons 10x larger (1e-6 -> 1e-5 in the ViT, 1e-5 -> 1e-4 elsewhere) must fail."""
    from clipseg_bench.model.families.sam3 import MASK_OUTPUT

    model = golden_model()
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.eps *= 10
    with pytest.raises(AssertionError, match="golden logits moved"):
        _assert_matches(logits(model, MASK_OUTPUT), golden["logits"][MASK_OUTPUT])


if __name__ == "__main__":
    doc = write_golden()
    print(f"wrote {GOLDEN} ({GOLDEN.stat().st_size} bytes), made with {doc['made_with']}")
