"""How much each architecture is measured: one :class:`Plan` per (architecture, profile)."""

from __future__ import annotations

from dataclasses import dataclass

TRAIN_STRATEGIES = ("decoder", "full", "adapter", "lora", "bitfit")  # zeroshot has no training step
K = 13  # organ prompts per slice


@dataclass(frozen=True)
class Plan:
    """How much one architecture is measured; sizes keep ``--quick`` within 5 minutes on 2 cores.

    Attributes:
        arch: ``real`` (CLIPSeg-rd64 sizes, 352 px) or ``tiny`` (128 px).
        batch: B slices per decoder-only step of our engine (x K=13 prompts = masks per step).
        enc_batch: B for the strategies whose encoders train.
        pairs: P (image, prompt) pairs per step of the stock per-pair baseline (decoder-only).
        enc_pairs: P for the per-pair baselines that encode with gradients.
        reps: timed repetitions of the cheap measurements (after one warm-up each).
        heavy_reps: timed repetitions of the measurements that encode images with gradients, and of
            segmentation (after a warm-up of the baseline, which also allocates the shared AdamW state).
        strategies: strategies whose training step is measured.
        segment_slices: slices of the volume our ``Segmenter`` segments.
        stock_segment_slices: slices the stock per-pair forward segments (slow, so fewer).
        trunc_batch, trunc_reps: images and repetitions of the vision truncation measurement.
        gc_batch: B of the gradient-checkpointing measurement (``full``).
        probe: what the separate peak-memory process measures: ``""`` nothing, ``"decoder"``
            decoder-only on cache at B=``batch``, ``"decoder+gc"`` also ``full`` with and without
            gradient checkpointing at B=``gc_batch``.
        compile: also time a ``torch.compile``d engine step (``full``).
        overhead_reps: repetitions of the trainer-overhead measurement (decoder-only, tiny model at
            64 px; :mod:`.overhead`); 0 skips it.
        overhead_steps: steps per timed trainer epoch there (at most the kept train slices allow).
    """

    arch: str
    batch: int
    enc_batch: int
    pairs: int
    enc_pairs: int
    reps: int
    heavy_reps: int
    strategies: tuple[str, ...]
    segment_slices: int
    stock_segment_slices: int
    trunc_batch: int
    trunc_reps: int
    gc_batch: int
    probe: str
    compile: bool = False
    overhead_reps: int = 0
    overhead_steps: int = 5


PLANS = {
    ("real", "quick"): Plan(
        "real",
        batch=4,
        enc_batch=2,
        pairs=2,
        enc_pairs=1,
        reps=6,
        heavy_reps=1,
        strategies=("decoder", "full"),
        segment_slices=8,
        stock_segment_slices=1,
        trunc_batch=2,
        trunc_reps=8,
        gc_batch=1,
        probe="decoder",
    ),
    ("real", "full"): Plan(
        "real",
        batch=4,
        enc_batch=4,
        pairs=4,
        enc_pairs=4,
        reps=3,
        heavy_reps=2,
        strategies=TRAIN_STRATEGIES,
        segment_slices=8,
        stock_segment_slices=2,
        trunc_batch=4,
        trunc_reps=5,
        gc_batch=2,
        probe="decoder+gc",
    ),
    ("tiny", "quick"): Plan(
        "tiny",
        batch=4,
        enc_batch=4,
        pairs=4,
        enc_pairs=4,
        reps=3,
        heavy_reps=3,
        strategies=TRAIN_STRATEGIES,
        segment_slices=8,
        stock_segment_slices=8,
        trunc_batch=8,
        trunc_reps=10,
        gc_batch=4,
        probe="",
        overhead_reps=15,
    ),
    ("tiny", "full"): Plan(
        "tiny",
        batch=4,
        enc_batch=4,
        pairs=4,
        enc_pairs=4,
        reps=10,
        heavy_reps=10,
        strategies=TRAIN_STRATEGIES,
        segment_slices=8,
        stock_segment_slices=8,
        trunc_batch=8,
        trunc_reps=20,
        gc_batch=4,
        probe="decoder+gc",
        compile=True,
        overhead_reps=30,
    ),
    ("tiny", "smoke"): Plan(
        "tiny",
        batch=2,
        enc_batch=2,
        pairs=2,
        enc_pairs=2,
        reps=1,
        heavy_reps=1,
        strategies=("decoder", "full"),
        segment_slices=2,
        stock_segment_slices=1,
        trunc_batch=2,
        trunc_reps=1,
        gc_batch=2,
        probe="decoder",
    ),
}
