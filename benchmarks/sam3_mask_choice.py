"""Which SAM 3 output becomes the per-organ mask (issue 23, item 2): measured, not assumed.

SAM 3 gives, per (image, prompt), a semantic map (``semantic_seg``), an image-level presence logit
(``presence_logits``, "is the concept in the image at all") and Q instance masks with a score each
(``pred_logits``). Four ways to make one logit map per (slice, organ) of them
(``clipseg_bench.model.families.sam3.organ_logits``):

- ``semantic``: the semantic head's logits;
- ``semantic_presence``: the semantic probability times sigmoid(presence);
- ``instance_max``: at each pixel the most probable instance, p = sigmoid(mask) x sigmoid(score) x
  sigmoid(presence);
- ``instance_union``: the soft union 1 - prod_q (1 - p_q) of those instances.

For each, a tiny SAM 3 (``sam3-tiny``, 112 px, the same random init per seed) is trained from scratch
on phantom CTs with the loss on that same output (BCE + soft Dice, the project's
``segmentation_loss``), every parameter the output depends on training, and scored on every slice of
the validation cases: the mean 2D Dice over (slice, organ) pairs where the organ is present (what
training's ``val_dice`` reports), the share of absent pairs with any predicted pixel, and the Dice
per (case, organ) of the stacked slices (what the 3D scores see). A case is the unit: the paired
differences against ``semantic`` are per seed over the same validation cases.

The loop is deliberately minimal and self-contained (AdamW, warm-up + cosine, absent-pair sampling
as in training) so the project's trainer can change without changing this measurement::

    python benchmarks/sam3_mask_choice.py --out sam3_mask_choice.json            # 3 seeds x 800 steps
    python benchmarks/sam3_mask_choice.py --steps 60 --seeds 0 --out quick.json  # a smoke run
    # one process per mode (1 thread each), then one summary:
    python benchmarks/sam3_mask_choice.py --modes semantic --threads 1 --out semantic.json
    python benchmarks/sam3_mask_choice.py --merge semantic.json instance_*.json --out sam3_mask_choice.json

JSON out: per mode and seed the validation curve and training time; per mode the means over seeds
and the paired (same seed) differences against ``semantic``. benchmarks/README.md has the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from clipseg_bench.data.dataset import PreparedData, SliceDataset, organ_targets
from clipseg_bench.data.phantom import write_phantoms
from clipseg_bench.data.prepare import prepare
from clipseg_bench.data.sampling import select_pairs
from clipseg_bench.evaluation.metrics import present_pairs_dice
from clipseg_bench.model.families.sam3 import (
    MASK_OUTPUTS,
    READS,
    SAM3_MEAN,
    SAM3_STD,
    TEXT_LENGTH,
    Sam3,
    build,
    decode_outputs,
    organ_logits,
    tiny_config,
)
from clipseg_bench.model.forward import preprocess, tokenize
from clipseg_bench.model.tokenizer import build_tiny_tokenizer
from clipseg_bench.organs import ORGANS, prompts
from clipseg_bench.train.losses import segmentation_loss

SIZE = 112
FAMILY = Sam3()


def make_data(work: Path, cases: int) -> PreparedData:
    """Phantom CTs of style A (the demo's generator), prepared with a quarter of the cases for validation."""
    write_phantoms(work / "phantoms", cases=cases, seed=100, style="A", size=96)
    prepare(
        images=work / "phantoms" / "images",
        labels=work / "phantoms" / "labels",
        out=work / "prepared",
        val_fraction=0.25,
        seed=0,
        png=False,
    )
    return PreparedData(work / "prepared")


def logits_of(model, pixels, tokens, mode: str, pairs=None) -> torch.Tensor:
    """The family's forward with ``mode`` as the mask output: (P, S, S), or (B, K, S, S) without pairs."""
    features = FAMILY.encode_images(model, pixels)
    prompt = FAMILY.encode_prompts(model, tokens["input_ids"], tokens["attention_mask"])
    outputs = decode_outputs(model, features, prompt, pairs=pairs, want=READS[mode])
    logits = organ_logits(outputs, mode, SIZE)
    return logits if pairs is not None else logits.view(len(pixels), -1, SIZE, SIZE)


@torch.no_grad()
def validate(model, val: SliceDataset, tokens, mode: str, organ_ids) -> dict:
    """On every slice of the validation cases (organs present or not):

    - ``val_dice``: mean 2D Dice over (slice, organ) pairs where the organ is present (training's
      ``val_dice``);
    - ``absent_false_alarm``: share of absent (slice, organ) pairs with any predicted pixel;
    - ``case_dice``: per (case, organ) with the organ in the case, the Dice of the stacked slices
      (a 3D Dice at the model's resolution, what false alarms on organ-free slices cost), averaged.
    """
    model.eval()
    dices, false_alarms = [], []
    cases = val.rows["case"].to_numpy()
    overlap = {}  # (case, organ index) -> [intersection, predicted, true] pixels
    for batch in DataLoader(val, batch_size=16):
        pixels = preprocess(batch["image"], size=SIZE, mean=SAM3_MEAN, std=SAM3_STD)
        pred = logits_of(model, pixels, tokens, mode) > 0  # (b, K, S, S)
        target = organ_targets(batch["labels"], organ_ids) > 0
        dices.extend(present_pairs_dice(pred.flatten(0, 1), target.flatten(0, 1)).tolist())
        absent = ~target.flatten(2).any(2)
        false_alarms.extend(pred.flatten(2).any(2)[absent].tolist())
        sums = torch.stack(
            [(pred & target).flatten(2).sum(2), pred.flatten(2).sum(2), target.flatten(2).sum(2)], -1
        )
        for row, index in enumerate(batch["index"].tolist()):
            for k in range(len(organ_ids)):
                acc = overlap.setdefault((cases[index], k), [0, 0, 0])
                for j in range(3):
                    acc[j] += int(sums[row, k, j])
    model.train()
    case_dice = [2 * i / (p + t) for i, p, t in overlap.values() if t > 0]
    return {
        "val_dice": float(np.mean(dices)),
        "absent_false_alarm": float(np.mean(false_alarms)),
        "case_dice": float(np.mean(case_dice)),
    }


def train_one(data: PreparedData, mode: str, seed: int, args) -> dict:
    """Train a fresh tiny SAM 3 (init from ``seed``) with the loss on ``mode``'s output; its curve."""
    from transformers import get_cosine_schedule_with_warmup

    model = build(tiny_config(image_size=SIZE), seed=seed).train()
    tokens = tokenize(build_tiny_tokenizer(max_length=TEXT_LENGTH), prompts("{organ}", list(ORGANS)))
    organ_ids = [o.id for o in ORGANS]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=20, num_training_steps=args.steps)
    train = SliceDataset(data, "train", size=SIZE)
    val = SliceDataset(data, "val", size=SIZE, kept_only=False)
    loader_gen = torch.Generator().manual_seed(seed)
    pair_gen = torch.Generator().manual_seed(seed + 1)
    torch.manual_seed(seed)  # dropout
    curve, step, t0 = [], 0, time.perf_counter()
    while step < args.steps:
        for batch in DataLoader(
            train, batch_size=args.batch_size, shuffle=True, generator=loader_gen, drop_last=True
        ):
            targets = organ_targets(batch["labels"], organ_ids)
            pairs = select_pairs(targets, absent_fraction=0.1, generator=pair_gen)
            pixels = preprocess(batch["image"], size=SIZE, mean=SAM3_MEAN, std=SAM3_STD)
            logits = logits_of(model, pixels, tokens, mode, pairs=pairs)
            loss = segmentation_loss(logits, targets[pairs[:, 0], pairs[:, 1]])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            step += 1
            if step % args.eval_every == 0 or step == args.steps:
                point = {"step": step, "loss": loss.item(), **validate(model, val, tokens, mode, organ_ids)}
                curve.append(point)
                print(f"{mode:15s} seed {seed} {json.dumps(point)}", flush=True)
            if step == args.steps:
                break
    seconds = time.perf_counter() - t0
    return {"mode": mode, "seed": seed, "curve": curve, "final": curve[-1], "train_s": seconds}


def summarize(runs: list[dict]) -> dict:
    """Per mode: mean (and per-seed) final scores; paired differences against ``semantic``."""
    by_mode: dict[str, dict[int, dict]] = {}
    for r in runs:
        by_mode.setdefault(r["mode"], {})[r["seed"]] = r["final"]
    out = {}
    for mode, finals in by_mode.items():
        metrics = ("val_dice", "absent_false_alarm", "case_dice")
        row = {k: float(np.mean([f[k] for f in finals.values()])) for k in metrics}
        row["per_seed_val_dice"] = {s: f["val_dice"] for s, f in sorted(finals.items())}
        base = by_mode.get("semantic", {})
        shared = sorted(set(finals) & set(base))
        if mode != "semantic" and shared:
            for k in ("val_dice", "case_dice"):
                row[f"{k}_minus_semantic"] = [finals[s][k] - base[s][k] for s in shared]
        out[mode] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    ap.add_argument("--modes", default=",".join(MASK_OUTPUTS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--cases", type=int, default=8, help="phantom cases (a quarter are validation)")
    ap.add_argument("--batch-size", type=int, default=8, help="slices per step (each with its organ pairs)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--merge", type=Path, nargs="+", help="summarize these JSON outputs into --out instead")
    args = ap.parse_args()
    if args.merge:
        docs = [json.loads(path.read_text()) for path in args.merge]
        runs = [r for d in docs for r in d["runs"]]
        merged = {"settings": [d["settings"] for d in docs], "summary": summarize(runs), "runs": runs}
        args.out.write_text(json.dumps(merged, indent=2) + "\n")
        print(json.dumps(merged["summary"], indent=2))
        return
    torch.set_num_threads(args.threads)
    modes = args.modes.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp), args.cases)
        split = {"train": len(data.slices("train")), "val_all": len(data.slices("val", kept_only=False))}
        runs = [train_one(data, mode, seed, args) for seed in seeds for mode in modes]
    doc = {
        "settings": {
            **{k: v for k, v in vars(args).items() if k != "out"},
            "image_size": SIZE,
            "slices": split,
        },
        "summary": summarize(runs),
        "runs": runs,
        "total_s": time.perf_counter() - t0,
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
    }
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc["summary"], indent=2))


if __name__ == "__main__":
    main()
