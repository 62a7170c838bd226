"""SAM 3 at its real-size architecture (random weights): one image encoding for 13 organ prompts
against 13 stock per-pair forwards (issue 23, item 5).

``facebook/sam3``'s architecture (``Sam3Config()`` defaults, 840.4M parameters) is built with random
weights; nothing is downloaded. The 13 prompts are the organ names through the project's tiny CLIP BPE
tokenizer (their ids fit SAM 3's 49,408-token vocabulary; the weights are random anyway).

- **stock per pair**: ``Sam3Model.forward(pixel_values, input_ids)`` once per (slice, organ) pair, each
  re-encoding the slice and the prompt: what a script built on the processor and the stock forward
  does for 13 organs;
- **ours**: the family's three stages: the ViT once per slice, the 13 prompts once, then the FPN
  neck once and the DETR encoder/decoder and mask decoder for the 13 pairs as one batch.

Both end in the same per-organ logits (the family's mask output), and the script checks they agree.
Each side is timed ``--repeats`` times, interleaved, and the minimum kept. 2 CPU cores cannot run
1008 px in reasonable time (a stock forward is about 2.7 TMAC there), so the default is 336 px
(24 x 24 tokens, one attention window, the size of SAM 3's pretraining position grid); ``--size``
takes any multiple of 14::

    python benchmarks/sam3_efficiency.py --out sam3_efficiency.json              # 336 px
    python benchmarks/sam3_efficiency.py --size 504 --out sam3_efficiency_504.json

JSON out: the settings, the time of each stage, both totals and their ratio, the feature-cache size
per slice at this size and at 1008 px, and the machine. benchmarks/README.md has the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from clipseg_bench.model.families.sam3 import (
    SAM3_MEAN,
    SAM3_SIZE,
    SAM3_STD,
    TEXT_LENGTH,
    Sam3,
    build,
    decode_outputs,
    fpn_levels,
    reference_config,
    set_image_size,
)
from clipseg_bench.model.forward import preprocess, tokenize
from clipseg_bench.model.tokenizer import build_tiny_tokenizer
from clipseg_bench.organs import prompts

FAMILY = Sam3()


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def ours(model, pixels, tokens) -> tuple[dict[str, float], torch.Tensor]:
    """The family's forward for 1 slice x K prompts, each stage timed."""
    times = {}
    times["vit"], features = timed(lambda: FAMILY.encode_images(model, pixels))
    times["text"], prompt = timed(
        lambda: FAMILY.encode_prompts(model, tokens["input_ids"], tokens["attention_mask"])
    )
    times["neck"], _ = timed(
        lambda: fpn_levels(model, features[0])
    )  # also inside decode: timed for the share
    times["decode"], logits = timed(lambda: FAMILY.decode(model, features, prompt))
    times["total"] = times["vit"] + times["text"] + times["decode"]
    return times, logits[0]


def stock(model, pixels, tokens) -> tuple[float, torch.Tensor]:
    """``Sam3Model.forward`` once per (slice, prompt) pair, mapped to the same per-organ logits."""
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    t0 = time.perf_counter()
    maps = [
        FAMILY.stock_logits(model, pixels, ids[k : k + 1], mask[k : k + 1])[0, 0] for k in range(len(ids))
    ]
    return time.perf_counter() - t0, torch.stack(maps)


def cache_mb(side: int, config) -> dict[str, float]:
    """MB per slice in fp16: the ViT output we cache, and the three FPN levels the decoder reads."""
    backbone = config.vision_config.backbone_config
    grid = side // backbone.patch_size
    vit = grid * grid * backbone.hidden_size * 2 / 1e6
    fpn = sum((f * grid) ** 2 for f in (4, 2, 1)) * config.vision_config.fpn_hidden_size * 2 / 1e6
    return {"vit_output_fp16_mb": vit, "fpn_levels_fp16_mb": fpn}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--size", type=int, default=336, help="input side in px, a multiple of 14")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    config = reference_config()
    model = build(config, seed=0)
    set_image_size(model, args.size)
    tokens = tokenize(build_tiny_tokenizer(max_length=TEXT_LENGTH), prompts("{organ}"))
    slice_ = torch.randint(
        0, 256, (1, 512, 512), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    pixels = preprocess(slice_, size=args.size, mean=SAM3_MEAN, std=SAM3_STD)
    runs = []
    with torch.inference_mode():
        ours(model, pixels, tokens)  # warm-up (allocator, lazy init)
        for _ in range(args.repeats):
            stages, our_logits = ours(model, pixels, tokens)
            stock_s, stock_logits = stock(model, pixels, tokens)
            runs.append({"ours": stages, "stock_per_pair_s": stock_s})
        difference = (our_logits - stock_logits).abs().max().item()
        pair_outputs = decode_outputs(
            model, FAMILY.encode_images(model, pixels), FAMILY.encode_prompts(model, **tokens)
        )
    best = {k: min(r["ours"][k] for r in runs) for k in runs[0]["ours"]}
    stock_best = min(r["stock_per_pair_s"] for r in runs)
    doc = {
        "settings": {
            "size": args.size,
            "prompts": len(tokens["input_ids"]),
            "repeats": args.repeats,
            "threads": args.threads,
            "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "mask_output": FAMILY.mask_output,
            "mask_side": pair_outputs["semantic_seg"].shape[-1],
        },
        "ours_s": best,
        "stock_per_pair_s": stock_best,
        "speedup": stock_best / best["total"],
        "max_abs_logit_difference": difference,
        "cache_per_slice": {
            "this_size": cache_mb(args.size, config),
            f"{SAM3_SIZE}px": cache_mb(SAM3_SIZE, config),
        },
        "runs": runs,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "load_average": os.getloadavg(),
            "torch": torch.__version__,
        },
    }
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({k: doc[k] for k in ("settings", "ours_s", "stock_per_pair_s", "speedup")}, indent=2))


if __name__ == "__main__":
    main()
