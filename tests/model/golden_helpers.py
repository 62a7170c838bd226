"""Golden logits of a tiny CLIPSeg: what guards our numbers against library drift.

The model and its input are made without any random number generator and without transformers'
weight init: every tensor is filled from a closed-form hash of its index and its name, so the
golden numbers depend only on the architecture's parameter names and shapes and on the forward's
arithmetic. A transformers (or torch) update that changes what CLIPSeg computes moves the logits
and fails ``test_golden.py``; one that only changes initialisation or RNG streams does not.

The file ``golden_logits.json`` (a few KB) holds the config, the token ids, summary statistics of
the (2, 3, 64, 64) logits and every 8th pixel of them. Regenerate it, after checking that a change
of the numbers is intended, with::

    .venv/bin/python tests/model/golden_helpers.py

and commit the new file with the reason in the message.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch

GOLDEN = Path(__file__).with_name("golden_logits.json")
CONFIG = {"image_size": 64, "vision_layers": 4, "use_complex_transposed_convolution": True}
PROMPTS = ["liver", "right kidney", "a computerized tomography of a inferior vena cava"]
STRIDE = 8  # the file keeps logits[..., ::STRIDE, ::STRIDE]
IMAGES = 2
# Tolerance, as a share of the logits' largest magnitude, in float32 rounding steps (tests/tolerance.py).
# The fp32 forward is 8.4 steps of that scale away from the same forward in float64, which bounds what
# fp32 summation order (BLAS kernels, thread count, CPU) can move (measured across ISAs: at most 10
# steps); 168 steps (2e-5) leaves 20x that. The smallest real change we tried, layer-norm eps
# 1e-5 -> 1e-6, moves the logits by 646 steps (7.7e-5; caught: test_golden.py checks it); exact GELU
# for quick GELU moves them by 1e-2, a 1% change of the attention scale by 8e-3.
GOLDEN_STEPS = 168
RTOL_SCALE = GOLDEN_STEPS * torch.finfo(torch.float32).eps


def _hash_uniform(n: int, salt: int) -> torch.Tensor:
    """n numbers in [-1, 1) from a closed-form hash (no RNG): frac(sin(i * a + salt) * 43758.5453)."""
    i = torch.arange(n, dtype=torch.float64)
    x = torch.sin(i * 12.9898 + (salt % 10_000) * 0.001 + 1.0) * 43758.5453
    return (x - torch.floor(x)) * 2 - 1


def fill_deterministic(model: torch.nn.Module) -> torch.nn.Module:
    """Overwrite every parameter with hash-derived values of a sensible scale.

    Norm weights 1 + 0.1u, other vectors 0.1u, matrices and kernels u * sqrt(3 / fan_in) (unit
    variance through a layer), where u is uniform in [-1, 1) from :func:`_hash_uniform` salted by
    the parameter's name. Scalars (the logit scale) keep their value.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 0:
                continue
            u = _hash_uniform(p.numel(), zlib.crc32(name.encode())).view(p.shape)
            if p.ndim == 1:
                value = 1 + 0.1 * u if "norm" in name and name.endswith("weight") else 0.1 * u
            else:
                value = u * (3.0 / (p.numel() // p.shape[0])) ** 0.5
            p.copy_(value.to(p.dtype))
    return model.eval()


def golden_model():
    """The tiny CLIPSeg of :data:`CONFIG` with :func:`fill_deterministic` weights."""
    from transformers import CLIPSegForImageSegmentation

    from clipseg_bench.model.families.clipseg import tiny_config

    return fill_deterministic(CLIPSegForImageSegmentation(tiny_config(**CONFIG)))


def golden_pixels() -> torch.Tensor:
    """(2, 3, 64, 64) float32 pixel values: smooth stripes plus hash texture, roughly unit scale."""
    side = CONFIG["image_size"]
    y, x = torch.meshgrid(
        torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64), indexing="ij"
    )
    planes = []
    for b in range(IMAGES):
        for c in range(3):
            stripes = torch.sin(0.21 * x + 0.13 * y * (b + 1) + c)
            texture = _hash_uniform(side * side, 100 * b + c).view(side, side)
            planes.append(stripes + 0.5 * texture)
    return torch.stack(planes).view(IMAGES, 3, side, side).float()


def our_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Our forward (``model.forward.forward``): (2, 3, 64, 64)."""
    from clipseg_bench.model.forward import forward

    with torch.no_grad():
        return forward(model, golden_pixels(), input_ids=input_ids, attention_mask=attention_mask)


def summary(logits: torch.Tensor) -> dict:
    """What the file keeps of the logits: statistics, per-mask means and the strided slice."""
    x = logits.double()
    return {
        "mean": x.mean().item(),
        "std": x.std().item(),
        "min": x.min().item(),
        "max": x.max().item(),
        "mask_means": x.mean((-2, -1)).flatten().tolist(),
        "slice": x[..., ::STRIDE, ::STRIDE].flatten().tolist(),
    }


def write_golden(path: Path = GOLDEN) -> dict:
    """Compute the golden logits with the installed libraries and write them to ``path``."""
    import transformers

    from clipseg_bench.model.forward import tokenize
    from clipseg_bench.model.tokenizer import build_tiny_tokenizer

    tokens = tokenize(build_tiny_tokenizer(), PROMPTS)
    logits = our_logits(golden_model(), tokens["input_ids"], tokens["attention_mask"])
    doc = {
        "about": "tests/model/golden_helpers.py: tiny CLIPSeg, hash-filled weights, fixed input",
        "made_with": {"transformers": transformers.__version__, "torch": torch.__version__},
        "config": CONFIG,
        "prompts": PROMPTS,
        "input_ids": tokens["input_ids"].tolist(),
        "attention_mask": tokens["attention_mask"].tolist(),
        "shape": list(logits.shape),
        "stride": STRIDE,
        "logits": {k: _round(v) for k, v in summary(logits).items()},
    }
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def _round(v):
    """9 significant digits: below float32's resolution loss, far below the test's tolerance."""
    return [float(f"{x:.9g}") for x in v] if isinstance(v, list) else float(f"{v:.9g}")


if __name__ == "__main__":
    doc = write_golden()
    print(f"wrote {GOLDEN} ({GOLDEN.stat().st_size} bytes), made with {doc['made_with']}")
