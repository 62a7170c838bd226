"""Per strategy, the training step of the per-pair baseline a typical script runs against our engine's.

Decoder-only: the stock ``CLIPSegForImageSegmentation.forward`` per (image, prompt) pair against the
loop's step on cached fp16 features; ``full``, ``adapter``, ``lora``, ``bitfit``: our
gradient-carrying forward per pair (each pair encodes its image and prompt again) against the loop's
step with shared encoding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .common import Arch, row, time_side_by_side, with_strategy
from .engine import EngineRun
from .plans import K, Plan
from .step_options import measure_compile, measure_gradient_checkpointing


@dataclass
class PairBatch:
    """P (slice, organ) pairs as a typical script feeds them: each pair carries its own image copy."""

    images: torch.Tensor  # (P, S, S) uint8
    input_ids: torch.Tensor  # (P, L)
    attention_mask: torch.Tensor  # (P, L)
    targets: torch.Tensor  # (P, S, S) float {0, 1}


def pair_batch(arch: Arch, data, pairs: int) -> PairBatch:
    """P pairs from the first training slices: pair i is slice i with organ 5i mod 13 (all distinct)."""
    from clipseg_bench.data.dataset import SliceDataset
    from clipseg_bench.organs import ORGANS

    ds = SliceDataset(data, "train", size=arch.size)
    items = [ds[i] for i in range(pairs)]
    organ_idx = [(5 * i) % K for i in range(pairs)]
    labels = torch.stack([it["labels"] for it in items])
    ids = torch.tensor([ORGANS[k].id for k in organ_idx], dtype=labels.dtype)
    return PairBatch(
        images=torch.stack([it["image"] for it in items]),
        input_ids=arch.tokens["input_ids"][organ_idx],
        attention_mask=arch.tokens["attention_mask"][organ_idx],
        targets=(labels == ids[:, None, None]).float(),
    )


def make_pair_step(arch: Arch, batch: PairBatch, *, stock: bool, optimizer) -> Callable[[], None]:
    """A typical script's training step on P pairs: preprocess, forward, loss, backward, clip, AdamW.

    Args:
        stock: the stock ``CLIPSegForImageSegmentation.forward`` (only the decoder can learn through
            it); else our forward with one image and one prompt per pair (no shared encoding).
        optimizer: over the trainable parameters (shared with the engine run it is compared to).
    """
    from clipseg_bench.model.forward import forward, preprocess
    from clipseg_bench.train.losses import segmentation_loss

    model = arch.model
    params = [p for g in optimizer.param_groups for p in g["params"]]
    n = len(batch.images)
    diagonal = torch.arange(n).repeat(2, 1).T  # pair i = (image i, prompt i)

    def step() -> None:
        model.train()
        pv = preprocess(batch.images, size=arch.size, mean=arch.mean, std=arch.std)
        if stock:
            out = model(input_ids=batch.input_ids, pixel_values=pv, attention_mask=batch.attention_mask)
            logits = out.logits.reshape(n, *pv.shape[-2:])  # HF squeezes a single pair to (S, S)
        else:
            logits = forward(
                model, pv, input_ids=batch.input_ids, attention_mask=batch.attention_mask, pairs=diagonal
            )
        loss = segmentation_loss(logits, batch.targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure_strategy(arch: Arch, data, plan: Plan, strategy: str, log) -> tuple[list[dict], dict]:
    """Step time and masks/s of one strategy: the per-pair baseline and our engine, side by side.

    Returns:
        (table rows, extras); for decoder-only the extras hold the engine's time breakdown and the
        share of it spent loading data.
    """
    from clipseg_bench.model.forward import vision_trainable

    s_arch = with_strategy(arch, strategy)
    cached = not vision_trainable(s_arch.model)
    batch = plan.batch if cached else plan.enc_batch
    reps = plan.reps if cached else plan.heavy_reps
    pairs = plan.pairs if cached else plan.enc_pairs
    stock = strategy == "decoder"
    engine = EngineRun(s_arch, data, strategy=strategy, batch=batch, use_cache=cached)
    baseline = make_pair_step(
        s_arch, pair_batch(s_arch, data, pairs), stock=stock, optimizer=engine.optimizer
    )
    log(f"  {arch.name} {strategy}: per-pair P={pairs} vs engine B={batch} x {K}, {reps} rep(s)")
    fns = {"baseline": baseline, "engine": engine.step}
    # Steps that train encoders are slow: one baseline step warms up (it also allocates the shared
    # AdamW state, the only large one-off cost), so the engine's first timed step is not its first ever.
    for warm in fns.values() if cached else [baseline]:
        warm()
    engine.reset_breakdown()
    t = time_side_by_side(fns, reps=reps, warmup={})
    t_base, t_eng = min(t["baseline"]), min(t["engine"])
    base_row = row(
        arch.name,
        strategy,
        "stock HF forward per pair" if stock else "our forward per pair",
        pairs,
        t_base,
        ratio=1.0,
        note="" if stock else "no shared encoding; the stock forward cannot train encoders",
    )
    eng_row = row(
        arch.name,
        strategy,
        "engine: cached fp16 features" if cached else "engine: shared encoding",
        engine.last_masks,
        t_eng,
        note=f"B={batch} slices x {K} prompts",
    )
    eng_row["ratio"] = eng_row["masks_per_s"] / base_row["masks_per_s"]
    rows, extras = [base_row, eng_row], {"times_s": t}
    if cached:
        breakdown = engine.breakdown
        extras.update(breakdown_s=breakdown, data_share=breakdown["data"] / sum(t["engine"]))
        rows.append(
            row(
                arch.name,
                strategy,
                "feature cache build, per slice",
                None,
                engine.cache_build_s / batch,
                note="once per slice, not per epoch",
            )
        )
    if strategy == "full" and arch.name == "tiny":  # the real architecture's: in the probe process
        rows += measure_gradient_checkpointing(s_arch, data, plan, engine, t_eng, log)
        if plan.compile:
            rows += measure_compile(s_arch, data, plan, t_eng, log)
    return rows, extras
