"""What the fp16 feature cache costs in quality (issue 11): decoder-only on fp16 cache, fp32 cache, live.

Decoder-only training reads the frozen vision encoder's outputs from a cache
(``TrainConfig.feature_cache_dtype``, fp16 by default), while every other strategy computes them
live in fp32. This script trains ``decoder`` on the demo's data (the tiny CLIPSeg pretrained on
phantom style A, fine-tuned on style B; ``bench.demo.prepare_demo`` makes both, or reuses them) with
the demo's settings, once per seed for each of:

- ``fp16``: the fp16 cache (the default);
- ``fp32``: an fp32 cache (the activations exactly as computed);
- ``live``: no cache, the encoder run at every step (what the other strategies see).

and prints the final val 2D Dice (the trainer's, over every val slice, each variant validating on
its own features) per seed, mean ± sample std, and the per-seed differences to ``live``. The fp16
default is kept only if its difference is within the seed-to-seed spread. Writes JSON with
``--json``. Run folders go under ``OUT/cache_dtype/`` and are reused when finished. Usage::

    python benchmarks/cache_dtype.py --out study_out --seeds 0,1,2,3,4 --json cache_dtype.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

VARIANTS = {  # name -> TrainConfig fields
    "fp16": {"feature_cache": True, "feature_cache_dtype": "fp16"},
    "fp32": {"feature_cache": True, "feature_cache_dtype": "fp32"},
    "live": {"feature_cache": False},
}


def _run(out: Path, *, data: Path, model: Path, seed: int, steps: int, fields: dict) -> dict:
    """Train one decoder run (or reuse a finished one); returns its run.json."""
    from clipseg_bench.config import load_config
    from clipseg_bench.strategies import get
    from clipseg_bench.study.demo import COMMON
    from clipseg_bench.train.loop import train

    info = out / "run.json"
    if not (info.is_file() and json.loads(info.read_text()).get("status") == "finished"):
        cfg = load_config(
            None,
            {
                **COMMON,
                **fields,
                "data": str(data),
                "model": str(model),
                "out": str(out),
                "strategy": "decoder",
                "lr": get("decoder").demo_lr,
                "seed": seed,
                "epochs": 1000,
                "max_steps": steps,
                "val_every": 0,
            },
        )
        train(cfg, resume=info.is_file())
    return json.loads(info.read_text())


def _pm(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--out",
        type=Path,
        default=Path("study_out"),
        help="study folder: the demo's stages at its earlier size are made here",
    )
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps (the demo's: 300)")
    p.add_argument("--json", type=Path, help="write the results here")
    a = p.parse_args(argv)

    from clipseg_bench.study.demo import SIZES, prepare_demo

    load_start = os.getloadavg()
    pretrained = prepare_demo(a.out, size=SIZES["study"])  # the size benchmarks/README.md was measured at
    seeds = [int(s) for s in a.seeds.split(",")]
    results = {v: {} for v in VARIANTS}
    for seed in seeds:
        for name, fields in VARIANTS.items():
            info = _run(
                a.out / "cache_dtype" / f"{name}-s{seed}",
                data=a.out / "prepared_B",
                model=pretrained,
                seed=seed,
                steps=a.steps,
                fields=fields,
            )
            results[name][seed] = {
                "val_dice": info["final"]["val_dice"],
                "train_dice": info["final"]["train_dice"],
                "train_time_s": info["timing"]["train_time_s"],
            }

    print(f"\ndecoder-only on the demo's style B, {a.steps} steps, val 2D Dice per seed")
    print("| seed | fp16 cache | fp32 cache | live | fp16 - live | fp32 - live |")
    print("|---:|---:|---:|---:|---:|---:|")
    dice = {v: [results[v][s]["val_dice"] for s in seeds] for v in VARIANTS}
    for i, s in enumerate(seeds):
        f16, f32, live = dice["fp16"][i], dice["fp32"][i], dice["live"][i]
        print(f"| {s} | {f16:.4f} | {f32:.4f} | {live:.4f} | {f16 - live:+.4f} | {f32 - live:+.4f} |")
    d16 = [x - y for x, y in zip(dice["fp16"], dice["live"])]
    d32 = [x - y for x, y in zip(dice["fp32"], dice["live"])]
    print(
        f"| mean ± std | {_pm(dice['fp16'])} | {_pm(dice['fp32'])} | {_pm(dice['live'])} "
        f"| {_pm(d16)} | {_pm(d32)} |"
    )
    noise = statistics.stdev(dice["live"]) if len(seeds) > 1 else float("nan")
    shift = abs(statistics.mean(d16))
    verdict = "within" if shift <= noise else "OUTSIDE"
    print(f"\nfp16 cache vs live: mean shift {shift:.4f}, seed std (live) {noise:.4f}: {verdict} seed noise")
    load_end = os.getloadavg()
    print(f"load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end")
    if a.json:
        doc = {
            "steps": a.steps,
            "seeds": seeds,
            "runs": results,
            "fp16_minus_live": d16,
            "fp32_minus_live": d32,
            "seed_std_live": noise,
            "within_seed_noise": shift <= noise,
            "load_average": {"start": load_start, "end": load_end},
        }
        a.json.write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
