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
Two measures of the cost: floating-point operations (``torch.utils.flop_counter``, counted with
eager attention because the counter does not see the CPU's fused attention kernel: the same
arithmetic), which no other process on the machine can move; and wall time, each side timed
``--repeats`` times, interleaved, with the ratio of each repeat and the ratio of the minima. 2 CPU cores cannot run
1008 px in reasonable time (a stock forward is about 2.7 TMAC there), so the default is 336 px
(24 x 24 tokens, one attention window, the size of SAM 3's pretraining position grid); ``--size``
takes any multiple of 14::

    python benchmarks/sam3_efficiency.py --out sam3_efficiency.json              # 336 px
    python benchmarks/sam3_efficiency.py --size 504 --out sam3_efficiency_504.json
    python benchmarks/sam3_efficiency.py --size 1008 --flops-only --out sam3_flops_1008.json   # ~10 min

JSON out: the settings, GFLOP and time of each stage, both totals and their ratios, the feature-cache size
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


def _gflop(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def count_flops(model, pixels, tokens) -> dict[str, float]:
    """GFLOP of each stage of ours (1 slice x K prompts) and of one stock per-pair forward.

    Attention runs eager while counting (the counter has no formula for the CPU's fused attention
    kernel; the arithmetic is the same). The decoder is counted one pair at a time, so eager
    attention over 72 x 72 tokens fits in memory at 1008 px, and the neck it then runs per call is
    counted once.
    """
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    model.set_attn_implementation("eager")
    try:
        features, prompt = FAMILY.encode_images(model, pixels), FAMILY.encode_prompts(model, ids, mask)
        flops = {
            "vit": _gflop(lambda: FAMILY.encode_images(model, pixels)),
            "text": _gflop(lambda: FAMILY.encode_prompts(model, ids, mask)),
            "neck": _gflop(lambda: fpn_levels(model, features[0])),
            "stock_one_pair": _gflop(lambda: FAMILY.stock_logits(model, pixels, ids[:1], mask[:1])),
        }
        pairs = [torch.tensor([[0, k]]) for k in range(len(ids))]
        per_pair = [_gflop(lambda p=p: FAMILY.decode(model, features, prompt, pairs=p)) for p in pairs]
        flops["decode"] = sum(per_pair) - (len(ids) - 1) * flops["neck"]
    finally:
        model.set_attn_implementation("sdpa")
    flops["ours_total"] = flops["vit"] + flops["text"] + flops["decode"]
    flops["stock_total"] = flops["stock_one_pair"] * len(ids)
    return flops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--size", type=int, default=336, help="input side in px, a multiple of 14")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--flops-only", action="store_true", help="count operations, time nothing (e.g. at 1008 px)"
    )
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
        flops = count_flops(model, pixels, tokens)
        if args.flops_only:
            doc = {"settings": {"size": args.size, "mask_output": FAMILY.mask_output}, "gflop": flops}
            doc["flop_ratio"] = flops["stock_total"] / flops["ours_total"]
            doc["cache_per_slice"] = cache_mb(args.size, config)
            args.out.write_text(json.dumps(doc, indent=2) + "\n")
            print(json.dumps(doc, indent=2))
            return
        ours(model, pixels, tokens)  # warm-up (allocator, lazy init)
        for _ in range(args.repeats):
            stages, our_logits = ours(model, pixels, tokens)
            stock_s, stock_logits = stock(model, pixels, tokens)
            runs.append({"ours": stages, "stock_per_pair_s": stock_s, "ratio": stock_s / stages["total"]})
        difference = (our_logits - stock_logits).abs().max().item()
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
            "output_side": our_logits.shape[-1],
        },
        "gflop": flops,
        "flop_ratio": flops["stock_total"] / flops["ours_total"],
        "ours_s": best,
        "stock_per_pair_s": stock_best,
        "time_ratio_of_minima": stock_best / best["total"],
        "time_ratio_per_repeat": [r["ratio"] for r in runs],
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
    keys = ("settings", "gflop", "flop_ratio", "ours_s", "stock_per_pair_s", "time_ratio_per_repeat")
    print(json.dumps({k: doc[k] for k in keys}, indent=2))


if __name__ == "__main__":
    main()
