"""Efficiency benchmark (issue 6): our engine against what a typical CLIPSeg fine-tuning script does.

Parameter efficiency is not training efficiency unless the code skips the work frozen parts do not
need. This script measures, side by side in one run, with warm-up, on the real CLIPSeg-rd64
architecture (random weights at the real sizes, ``reference_config()``, no download) and on the tiny
one:

- per strategy, the training step time and masks/s of (a) the per-pair baseline a typical script
  runs and (b) our engine: the training loop's own step (``train.loop.train_epoch``) on the setup
  ``train()``'s own builder (``train.setup.build_training``) makes, data loader included;
- segmenting a volume for all 13 organs, both ways;
- the vision-encoder forward with and without truncation after the deepest layer the decoder reads;
- peak RSS of decoder-only training on cached features (a separate process), and what gradient
  checkpointing costs and saves;
- the share of step time spent loading data.

The baselines, honestly:

- ``decoder``: the stock ``CLIPSegForImageSegmentation.forward(input_ids, pixel_values,
  attention_mask)`` on P (image, prompt) pairs, each image repeated per prompt, then loss, backward,
  gradient clipping and AdamW on the decoder, exactly like a typical script.
- ``full``, ``adapter``, ``lora``, ``bitfit``: the stock forward cannot train them at all (it runs both
  encoders under ``no_grad``), so the fair per-pair baseline is our gradient-carrying forward without
  shared encoding: every pair encodes its own image and its own prompt again.
- ``segment``: the stock forward per slice with the slice repeated for the 13 organ prompts. It gets
  our preprocessing (done once per slice), which is cheaper than running the HF image processor per
  pair, so the baseline is if anything flattered.

Ours: B slices x K=13 prompts per step, each slice encoded once, the vision encoder stopped after the
deepest layer the decoder reads; for decoder-only the vision activations come from the fp16 feature
cache on disk (memory-mapped) and the prompt embeddings are computed once. Rates are compared in
masks/s, so the slow baselines are timed on fewer pairs than ours (the counts are in the table).
Each time is the minimum over repetitions (interference from other processes only ever adds time),
with the two sides of a comparison interleaved. Data comes from two phantom CTs prepared by
``clipseg-bench prepare`` into a temporary folder.

Peak memory is measured in a child process (this script with ``--probe``), as the peak RSS of that
process (VmHWM): it holds what ``train()`` holds, the whole model included.

Token ids for the real architecture come from the project's tiny tokenizer: the CLIP BPE vocabulary
would need a download, and with random weights only the sequence length matters. The random decoder
gets PyTorch's default init (``build_tiny`` does that): HF's N(0, 1) init saturates the decoder's
softmax, and the resulting denormal floats make its attention backward 5-10x slower on CPU, which a
pretrained checkpoint never shows.

CPU only (the targets of issue 6 are CPU numbers). ``--quick`` measures the real architecture for
``decoder`` and ``full`` only (gradient checkpointing on the tiny one) and the tiny one for every
strategy; without it, every strategy on both, gradient checkpointing's memory on both, and
``torch.compile`` on the tiny one. On a busy machine two OpenMP threads wait for each other at every
small operation, so timings get noisy; ``--threads 1`` is steadier there. Usage::

    python benchmarks/throughput.py --quick --json throughput.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from clipseg_bench.provenance import peak_rss_mb, reset_peak_rss, rss_mb

TARGETS = {  # issue 6: minimum ratios, measured on the real architecture
    "decoder_cached_vs_stock": 15.0,
    "full_shared_vs_pairwise": 6.0,
    "segment_vs_pairwise": 8.0,
    "vision_truncation": 1.15,
}
RSS_TARGET_MB = 1.5 * 1024  # decoder-only on cache, batch 4, real architecture
DATA_SHARE_TARGET = 0.05  # data loading / step time, decoder-only on cache, default workers
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


# --- timing ----------------------------------------------------------------------------------


def _time_once(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_side_by_side(
    fns: dict[str, Callable[[], object]], *, reps: int, warmup: dict[str, Callable[[], object]] | None = None
) -> dict[str, list[float]]:
    """Wall times of several functions, interleaved so that load changes hit all of them alike.

    Args:
        fns: name -> function to time (it must do the whole unit of work, synchronously on CPU).
        reps: timed calls of each.
        warmup: functions called once, untimed, before; default: each of ``fns`` once.

    Returns:
        name -> list of ``reps`` wall times in seconds.
    """
    for fn in (fns if warmup is None else warmup).values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(_time_once(fn))
    return times


# --- the model and the data ------------------------------------------------------------------


@dataclass
class Arch:
    """A randomly initialised CLIPSeg with its tokenizer and the 13 organ prompts, tokenized."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    size: int
    mean: tuple
    std: tuple
    tokens: dict[str, torch.Tensor]


def build_arch(name: str) -> Arch:
    """``real``: the architecture of CIDAS/clipseg-rd64-refined (150.7M parameters) at its 352 px
    input; ``tiny``: the project's tiny model at 128 px. Both random, same weights in every process."""
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from clipseg_bench.model.families.clipseg import build_tiny, reference_config
    from clipseg_bench.model.forward import tokenize
    from clipseg_bench.model.tokenizer import build_tiny_tokenizer
    from clipseg_bench.organs import prompts

    tokenizer = build_tiny_tokenizer()
    if name == "real":
        model, size = build_tiny(reference_config()), 352  # 352: the rd64-refined image processor's side
    elif name == "tiny":
        model, size = build_tiny(), 128
    else:
        raise ValueError(f"unknown architecture {name!r}")
    tokens = tokenize(tokenizer, prompts("name"))
    return Arch(name, model, tokenizer, size, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, tokens)


def with_strategy(arch: Arch, strategy: str) -> Arch:
    """A copy of ``arch`` whose model has ``strategy`` applied (adapters and LoRA inject modules)."""
    from clipseg_bench.strategies import apply_strategy

    model = copy.deepcopy(arch.model)
    apply_strategy(model, strategy)
    return replace(arch, model=model)


def make_prepared(root: Path, *, size: int = 256) -> Path:
    """A small PREPARED folder from two phantom CTs (one train, one val case) in ``root``.

    256 px is the largest phantom side; real CT slices (512 px) cost the loader a little more to resize.
    """
    from clipseg_bench.data.phantom import write_phantoms
    from clipseg_bench.data.prepare import prepare

    write_phantoms(root / "phantoms", cases=2, seed=0, style="A", size=size)
    return prepare(
        images=root / "phantoms" / "images",
        labels=root / "phantoms" / "labels",
        out=root / "prepared",
        val_fraction=0.5,
        seed=0,
        png=False,
    )


# --- (b) our engine: the training loop's own step ----------------------------------------------


@functools.lru_cache(maxsize=1)
def _accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


class EngineRun:
    """The training loop of ``clipseg-bench train``, built by ``train()``'s own builder, one step per call.

    The setup comes from ``train.setup.build_training`` and a step is one call of
    ``train.loop.train_epoch`` over a dataset of exactly ``batch`` slices, so it is everything the
    loop does: Accelerate's data loader, targets, forward, loss, backward, clipping, AdamW.
    ``absent_fraction=1`` makes every slice bring all 13 prompts (B x 13 masks per step).

    Args:
        arch: the model (its strategy applied) and prompts.
        data: the prepared dataset; its first ``batch`` training slices are used.
        strategy: the strategy applied to ``arch`` (recorded in the config only).
        batch: B slices per step.
        use_cache: feed cached frozen vision activations (the vision encoder must be frozen).
        compile: ``torch.compile`` the module, as ``train --set compile=true`` does.
    """

    def __init__(
        self, arch: Arch, data, *, strategy: str, batch: int, use_cache: bool, compile: bool = False
    ):
        from clipseg_bench.config import TrainConfig
        from clipseg_bench.model.families import family_of
        from clipseg_bench.model.forward import vision_trainable
        from clipseg_bench.model.load import LoadedModel
        from clipseg_bench.train.setup import build_training

        if use_cache and vision_trainable(arch.model):
            raise ValueError("the feature cache needs a frozen vision encoder")
        # Defaults everywhere (num_workers, grad_clip, loss weights, AdamW) except: all pairs, this
        # batch, a constant learning rate (no warm-up; the schedule never ends), validation off.
        self.cfg = TrainConfig(
            data=str(data.root),
            out=str(data.root / "unused"),
            strategy=strategy,
            batch_size=batch,
            absent_fraction=1.0,
            lr=1e-5,
            warmup_steps=0,
            epochs=10**6,
            feature_cache=use_cache,
            compile=compile,
            val_every=0,
            val_max_slices=1,  # the builder also caches val slices; one is enough here
        )
        loaded = LoadedModel(
            arch.model,
            arch.tokenizer,
            arch.size,
            arch.mean,
            arch.std,
            spec=arch.name,
            family=family_of(arch.model),
        )
        rows = data.slices("train", kept_only=True).iloc[:batch]
        self.setup = build_training(self.cfg, _accelerator(), loaded=loaded, train_rows=rows)
        train_cache = self.setup.cache_infos.get("train_kept")
        self.cache_build_s = train_cache.build_s if train_cache else 0.0
        self.steps = 0
        self.last_masks = 0

    @property
    def optimizer(self):
        """The engine's AdamW; a per-pair baseline of the same parameters shares it (and its state)."""
        return self.setup.optimizer

    def step(self) -> None:
        """One training step (one epoch of ``batch`` slices)."""
        from tqdm.auto import tqdm

        from clipseg_bench.train.loop import train_epoch

        with tqdm(disable=True) as pbar:
            _, stats = train_epoch(self.setup, self.steps, 0, pbar)
        self.steps += 1
        self.last_masks = stats["masks"]

    def reset_breakdown(self) -> None:
        from clipseg_bench.train.timing import StepTimer

        self.setup.timer = StepTimer(torch.device("cpu"))

    @property
    def breakdown(self) -> dict[str, float]:
        """Seconds per phase (data, forward, backward, optimizer) since :meth:`reset_breakdown`."""
        return dict(self.setup.timer.totals)


# --- (a) the per-pair baselines ------------------------------------------------------------------


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


# --- measurements ------------------------------------------------------------------------------


def row(
    arch: str,
    strategy: str,
    mode: str,
    masks: int | None,
    seconds: float,
    *,
    ratio: float | None = None,
    note: str = "",
) -> dict:
    """One table row: ``masks`` (slice, organ) masks took ``seconds`` (one step, or one volume)."""
    rate = masks / seconds if masks and seconds > 0 else None
    return {
        "arch": arch,
        "strategy": strategy,
        "mode": mode,
        "masks": masks,
        "time_s": seconds,
        "masks_per_s": rate,
        "ratio": ratio,
        "note": note,
    }


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


def measure_gradient_checkpointing(
    arch: Arch, data, plan: Plan, engine: EngineRun, t_plain: float, log
) -> list:
    """Step time of ``full`` with encoder gradient checkpointing, against the plain engine step."""
    from clipseg_bench.model.forward import set_gradient_checkpointing

    log(f"  {arch.name} full + gradient checkpointing")
    set_gradient_checkpointing(arch.model, True)
    try:
        t = time_side_by_side({"gc": engine.step}, reps=plan.heavy_reps)["gc"]
    finally:
        set_gradient_checkpointing(arch.model, False)
    return [
        row(
            arch.name,
            "full",
            "engine + gradient checkpointing",
            engine.last_masks,
            min(t),
            ratio=t_plain / min(t),
            note="ratio: speed vs the engine without it",
        )
    ]


def measure_compile(arch: Arch, data, plan: Plan, t_plain: float, log) -> list[dict]:
    """Step time of ``full`` with the engine's module under ``torch.compile`` (the first step compiles).

    This is what ``train --set compile=true`` does.
    """
    log(f"  {arch.name} full + torch.compile")
    run = EngineRun(arch, data, strategy="full", batch=plan.enc_batch, use_cache=False, compile=True)
    try:
        compile_s = _time_once(run.step)
        t = time_side_by_side({"compiled": run.step}, reps=plan.heavy_reps)["compiled"]
    except Exception as exc:  # inductor needs a working C++ toolchain: report, do not abort the benchmark
        return [
            row(arch.name, "full", "engine + torch.compile", None, float("nan"), note=f"failed: {exc!r}"[:90])
        ]
    return [
        row(
            arch.name,
            "full",
            "engine + torch.compile",
            run.last_masks,
            min(t),
            ratio=t_plain / min(t),
            note=f"ratio: speed vs eager; compiling took {compile_s:.0f} s",
        )
    ]


def measure_segment(arch: Arch, data, plan: Plan, log) -> list[dict]:
    """Segment a volume for all 13 organs at inference, from uint8 slices to probabilities.

    Stock: per slice, the stock forward on the slice repeated 13 times with the 13 prompts, then
    sigmoid and resize to the slice's size. Ours: ``evaluation.predict.Segmenter``, one encoding per
    slice; building it (it embeds the prompts) is inside the timed region.
    """
    import torch.nn.functional as F

    from clipseg_bench.evaluation.predict import Segmenter
    from clipseg_bench.model.forward import preprocess
    from clipseg_bench.organs import ORGANS, prompts

    model = arch.model.eval()
    case = data.cases("val")[0]
    volume = np.array(data.array(case, "image")[: plan.segment_slices])
    ids, mask = arch.tokens["input_ids"], arch.tokens["attention_mask"]

    @torch.no_grad()
    def stock(n_slices: int = plan.stock_segment_slices, n_prompts: int = K) -> None:
        for img in torch.from_numpy(volume[:n_slices]):
            pv = preprocess(img[None], size=arch.size, mean=arch.mean, std=arch.std).expand(
                n_prompts, -1, -1, -1
            )
            logits = model(input_ids=ids[:n_prompts], pixel_values=pv, attention_mask=mask[:n_prompts]).logits
            logits = logits.reshape(n_prompts, 1, *pv.shape[-2:])
            torch.sigmoid(F.interpolate(logits, size=img.shape, mode="bilinear", align_corners=False))

    def ours(n_slices: int = plan.segment_slices) -> None:
        seg = Segmenter(
            model,
            arch.tokenizer,
            organs=list(ORGANS),
            prompts=prompts("name"),
            size=arch.size,
            mean=arch.mean,
            std=arch.std,
            device="cpu",
        )
        for _ in seg.iter_probabilities(volume[:n_slices], batch_size=16):
            pass

    n_stock, n_ours = min(plan.stock_segment_slices, len(volume)), len(volume)
    log(f"  {arch.name} segment: stock {n_stock} slice(s) vs Segmenter {n_ours} slices, x {K} organs")
    warm = {
        "stock": lambda: stock(1, 2),
        "ours": lambda: ours(1),
    }  # the same code paths, a fraction of the work
    t = time_side_by_side({"stock": stock, "ours": ours}, reps=plan.heavy_reps, warmup=warm)
    base = row(
        arch.name,
        "zeroshot",
        "segment: stock forward per pair",
        n_stock * K,
        min(t["stock"]),
        ratio=1.0,
        note=f"{n_stock} slice(s) x {K} organs",
    )
    mine = row(
        arch.name,
        "zeroshot",
        "segment: Segmenter",
        n_ours * K,
        min(t["ours"]),
        note=f"{n_ours} slices x {K} organs, {volume.shape[1]} px",
    )
    mine["ratio"] = mine["masks_per_s"] / base["masks_per_s"]
    return [base, mine]


def measure_truncation(arch: Arch, plan: Plan, log) -> list[dict]:
    """Vision-encoder forward over all layers (as the stock forward runs it) vs up to the deepest layer
    the decoder reads (as ours runs it), at inference."""
    from clipseg_bench.model.families import family_of
    from clipseg_bench.model.forward import encode_images

    model = arch.model.eval()
    vm = model.clip.vision_model
    pv = torch.randn(plan.trunc_batch, 3, arch.size, arch.size, generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def all_layers() -> None:
        vm(pv, output_hidden_states=True, interpolate_pos_encoding=True)

    @torch.no_grad()
    def truncated() -> None:
        encode_images(model, pv)

    depth, total = family_of(model).vision_depth(model), len(vm.encoder.layers)
    log(
        f"  {arch.name} vision truncation: {depth} of {total} layers, {plan.trunc_batch} image(s), "
        f"{plan.trunc_reps} reps"
    )
    t = time_side_by_side({"all": all_layers, "truncated": truncated}, reps=plan.trunc_reps)
    note = f"{plan.trunc_batch} image(s), no masks"
    return [
        row(arch.name, "-", f"vision encoder, all {total} layers", None, min(t["all"]), ratio=1.0, note=note),
        row(
            arch.name,
            "-",
            f"vision encoder, first {depth} layers",
            None,
            min(t["truncated"]),
            ratio=min(t["all"]) / min(t["truncated"]),
            note=f"{note}; at most {total / depth:.2f}x",
        ),
    ]


# --- the peak-memory probe (its own process) -----------------------------------------------------


def probe_memory(
    arch_name: str, data_root: Path, *, batch: int, gc_batch: int | None, steps: int = 1
) -> dict:
    """Peak RSS of decoder-only training on cached features; optionally gradient checkpointing on ``full``.

    Meant to run in a fresh process, so that nothing the other measurements allocated counts. It
    holds what ``train()`` holds: the whole model (frozen encoders included), the memory-mapped fp16
    cache, the optimizer, and the decoder's activations for B x 13 masks.

    Returns:
        MiB and seconds: ``torch_import_rss_mb``, ``model_rss_mb`` (after building the model),
        ``decoder_cached_peak_rss_mb`` (the process's peak), ``decoder_step_s``, ``decoder_masks``,
        ``batch``, and with ``gc_batch`` ``gc: {"batch", "on"|"off": {"step_s", "peak_rss_mb",
        "step_peak_over_start_mb"}}``.
    """
    from clipseg_bench.data.dataset import PreparedData
    from clipseg_bench.model.forward import set_gradient_checkpointing
    from clipseg_bench.strategies import apply_strategy
    from clipseg_bench.train.setup import release_frozen_vision

    out: dict = {"torch_import_rss_mb": rss_mb(), "batch": batch}
    arch = build_arch(arch_name)
    out["model_rss_mb"] = rss_mb()
    data = PreparedData(data_root)
    apply_strategy(arch.model, "decoder")
    run = EngineRun(arch, data, strategy="decoder", batch=batch, use_cache=True)
    release_frozen_vision(run.setup)  # as train() does once the features are cached
    run.step()  # warm-up
    out["decoder_step_s"] = min(_time_once(run.step) for _ in range(steps))
    out["decoder_masks"] = run.last_masks
    out["decoder_cached_peak_rss_mb"] = peak_rss_mb()
    del run
    if not gc_batch:
        return out

    # Checkpointed first, so memory that the (bigger) plain step leaves allocated cannot count for it.
    arch = build_arch(arch_name)  # the decoder probe released the vision weights
    apply_strategy(arch.model, "full")
    run = EngineRun(arch, data, strategy="full", batch=gc_batch, use_cache=False)
    set_gradient_checkpointing(arch.model, True)
    run.step()  # warm-up; allocates the AdamW state both variants then hold
    gc: dict = {"batch": gc_batch, "masks": run.last_masks}
    for enabled in (True, False):
        set_gradient_checkpointing(arch.model, enabled)
        start = rss_mb()
        if not reset_peak_rss():
            raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs): needs Linux >= 4.0")
        t = _time_once(run.step)
        gc["on" if enabled else "off"] = {
            "step_s": t,
            "peak_rss_mb": peak_rss_mb(),
            "step_peak_over_start_mb": peak_rss_mb() - start,
        }
    out["gc"] = gc
    return out


def run_probe(arch_name: str, data_root: Path, plan: Plan, log) -> dict:
    """:func:`probe_memory` in a child process (this script with ``--probe``)."""
    gc_batch = plan.gc_batch if plan.probe == "decoder+gc" else 0
    log(
        f"  {arch_name} memory probe (separate process): decoder on cache B={plan.batch}"
        + (f", full with/without gradient checkpointing B={gc_batch}" if gc_batch else "")
    )
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--probe",
        arch_name,
        "--probe-data",
        str(data_root),
        "--probe-batch",
        str(plan.batch),
        "--probe-gc-batch",
        str(gc_batch),
        "--threads",
        str(torch.get_num_threads()),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def probe_rows(arch_name: str, probe: dict) -> list[dict]:
    rows = [
        row(
            arch_name,
            "decoder",
            "engine: cached fp16 features (probe)",
            probe["decoder_masks"],
            probe["decoder_step_s"],
            note=f"peak RSS {probe['decoder_cached_peak_rss_mb']:.0f} MiB",
        )
    ]
    gc = probe.get("gc")
    if gc:
        for key, mode in (("off", "engine (probe)"), ("on", "engine + gradient checkpointing (probe)")):
            r = gc[key]
            note = f"peak RSS {r['peak_rss_mb']:.0f} MiB, step adds {r['step_peak_over_start_mb']:.0f} MiB"
            rows.append(
                row(
                    arch_name,
                    "full",
                    mode,
                    gc["masks"],
                    r["step_s"],
                    ratio=gc["off"]["step_s"] / r["step_s"],
                    note=note,
                )
            )
    return rows


# --- the whole benchmark -----------------------------------------------------------------------


def measure_arch(arch_name: str, data_root: Path, plan: Plan, log) -> dict:
    """Everything for one architecture. Returns ``{"rows", "extras", "probe"}``."""
    from clipseg_bench.data.dataset import PreparedData

    data = PreparedData(data_root)
    t0 = time.perf_counter()
    arch = build_arch(arch_name)
    log(f"{arch_name}: model built in {time.perf_counter() - t0:.1f} s")
    rows = measure_truncation(arch, plan, log)
    rows += measure_segment(arch, data, plan, log)
    extras = {}
    for strategy in plan.strategies:
        r, extras[strategy] = measure_strategy(arch, data, plan, strategy, log)
        rows += r
    del arch  # the probe process should not compete with this one for memory
    probe = run_probe(arch_name, data_root, plan, log) if plan.probe else None
    if probe:
        rows += probe_rows(arch_name, probe)
    return {"rows": rows, "extras": extras, "probe": probe}


def _ratio(rows: list[dict], arch: str, strategy: str, mode: str) -> float | None:
    return next(
        (r["ratio"] for r in rows if (r["arch"], r["strategy"], r["mode"]) == (arch, strategy, mode)), None
    )


def _default_workers() -> int:
    from clipseg_bench.config import TrainConfig

    return TrainConfig.model_fields["num_workers"].default


def headline(results: dict[str, dict]) -> dict:
    """The targets of issue 6, on the real architecture when it was measured (else the tiny one)."""
    arch = "real" if "real" in results else "tiny"
    rows = results[arch]["rows"]
    depth_row = next(r for r in rows if r["arch"] == arch and r["mode"].startswith("vision encoder, first"))
    ratios = {
        "decoder_cached_vs_stock": _ratio(rows, arch, "decoder", "engine: cached fp16 features"),
        "full_shared_vs_pairwise": _ratio(rows, arch, "full", "engine: shared encoding"),
        "segment_vs_pairwise": _ratio(rows, arch, "zeroshot", "segment: Segmenter"),
        "vision_truncation": depth_row["ratio"],
    }
    passed = {k: v is not None and v >= TARGETS[k] for k, v in ratios.items()}
    probe = results[arch]["probe"]
    memory = None
    if probe:
        memory = {
            **probe,
            "target_mb": RSS_TARGET_MB,
            "pass": probe["decoder_cached_peak_rss_mb"] <= RSS_TARGET_MB,
        }
    loading = results[arch]["extras"].get("decoder", {})
    share = loading.get("data_share")
    data = {
        "arch": arch,
        "share": share,
        "target": DATA_SHARE_TARGET,
        "pass": share is not None and share <= DATA_SHARE_TARGET,
        "breakdown_s": loading.get("breakdown_s"),
        "num_workers": _default_workers(),
    }
    return {"arch": arch, "ratios": ratios, "pass": passed, "memory": memory, "data_loading": data}


def format_table(rows: list[dict]) -> str:
    """A Markdown table, one row per measurement."""
    from tabulate import tabulate

    cols = ["arch", "strategy", "mode", "masks", "time_s", "masks_per_s", "ratio", "note"]
    headers = ["arch", "strategy", "mode", "masks", "time (s)", "masks/s", "ratio", "note"]
    table = [[r[c] for c in cols] for r in rows]
    return tabulate(table, headers=headers, tablefmt="pipe", floatfmt=".3g", missingval="")


def format_summary(result: dict) -> str:
    """The four headline ratios, memory and data loading with PASS/FAIL against the targets."""
    mark = {True: "PASS", False: "FAIL"}
    lines = [f"targets of issue 6 ({result['headline_arch']} architecture):"]
    for key, value in result["ratios"].items():
        shown = "n/a" if value is None else f"{value:.2f}x"
        lines.append(f"  {key:<28}{shown:>9}   target >= {TARGETS[key]:g}x   {mark[result['pass'][key]]}")
    mem = result["memory"]
    if mem:
        lines.append(
            f"  {'decoder-on-cache peak RSS':<28}{mem['decoder_cached_peak_rss_mb']:>5.0f} MiB   target <= "
            f"{RSS_TARGET_MB:.0f} MiB at B={mem['batch']} x {K} masks   {mark[mem['pass']]}"
        )
        lines.append(
            f"      of which: after importing torch {mem['torch_import_rss_mb']:.0f} MiB, "
            f"after building the model {mem['model_rss_mb']:.0f} MiB"
        )
    data = result["data_loading"]
    if data["share"] is not None:
        lines.append(
            f"  {'data loading share':<28}{data['share']:>8.1%}   target <= {DATA_SHARE_TARGET:.0%} "
            f"(decoder on cache, default workers)   {mark[data['pass']]}"
        )
    return "\n".join(lines)


def run_benchmark(*, archs: list[str], profile: str, log=print, workdir: Path | None = None) -> dict:
    """Run every measurement; returns the JSON-ready result (``ratios`` first).

    Args:
        archs: ``real`` and/or ``tiny``.
        profile: ``quick``, ``full`` or ``smoke`` (tests: minimal repetitions).
        log: progress messages.
        workdir: where the phantom dataset goes (a temporary folder by default).
    """
    from clipseg_bench.provenance import git_info, hardware_info

    t0 = time.perf_counter()
    load_start = os.getloadavg()
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="clipseg-throughput-")))
        data_root = make_prepared(workdir, size=64 if profile == "smoke" else 256)
        results = {arch: measure_arch(arch, data_root, PLANS[(arch, profile)], log) for arch in archs}
    head = headline(results)
    return {
        "ratios": head["ratios"],
        "targets": {
            **TARGETS,
            "decoder_cached_peak_rss_mb": RSS_TARGET_MB,
            "data_loading_share": DATA_SHARE_TARGET,
        },
        "pass": head["pass"],
        "headline_arch": head["arch"],
        "memory": head["memory"],
        "data_loading": head["data_loading"],
        "rows": [r for a in archs for r in results[a]["rows"]],
        "extras": {a: results[a]["extras"] for a in archs},
        "plans": {a: asdict(PLANS[(a, profile)]) for a in archs},
        "profile": profile,
        "total_s": time.perf_counter() - t0,
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "hardware": hardware_info(),
        "git": git_info(),
    }


def _clean(obj):
    """JSON-safe: NaN and infinities become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="fewer repetitions and sizes (< 5 min on 2 idle CPU cores)"
    )
    p.add_argument(
        "--smoke", action="store_true", help="tiny architecture only, minimal repetitions (for tests)"
    )
    p.add_argument("--arch", choices=["real", "tiny", "both"], default="both")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    # The memory probe re-runs this script in a child process with these:
    p.add_argument("--probe", choices=["real", "tiny"], help=argparse.SUPPRESS)
    p.add_argument("--probe-data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--probe-batch", type=int, default=4, help=argparse.SUPPRESS)
    p.add_argument("--probe-gc-batch", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: every model here is built locally
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.probe:
        print(json.dumps(probe_memory(a.probe, a.probe_data, batch=a.probe_batch, gc_batch=a.probe_gc_batch)))
        return 0

    profile = "smoke" if a.smoke else "quick" if a.quick else "full"
    archs = ["tiny"] if a.smoke else ["real", "tiny"] if a.arch == "both" else [a.arch]

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    threads = torch.get_num_threads()
    log(f"throughput benchmark ({profile}): {threads} torch threads, architectures {', '.join(archs)}")
    busy = os.getloadavg()[0]
    if busy > 0.5:
        log(
            f"note: load average {busy:.1f} at the start: other processes use the CPUs. Small operations suffer most "
            "(each waits for a descheduled OpenMP thread), so timings are noisy; --threads 1 is steadier then."
        )
    result = run_benchmark(archs=archs, profile=profile, log=log)
    print(format_table(result["rows"]))
    print()
    print(format_summary(result))
    load = result["load_average"]
    print(
        f"\ntotal {result['total_s']:.0f} s; {torch.get_num_threads()} torch threads on {result['hardware']['cpu_count']} "
        f"CPUs ({result['hardware']['cpu']}); load average {load['start'][0]:.1f} at start, {load['end'][0]:.1f} at end"
    )
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(_clean(result), indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
