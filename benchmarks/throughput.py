"""Efficiency benchmark (issue 6): our engine against what a typical CLIPSeg fine-tuning script does.

Parameter efficiency is not training efficiency unless the code skips the work frozen parts do not
need. This script measures, side by side in one run, with warm-up, on the real CLIPSeg-rd64
architecture (random weights at the real sizes, ``reference_config()``, no download) and on the tiny
one:

- per strategy, the training step time and masks/s of (a) the per-pair baseline a typical script
  runs and (b) our engine, the training loop's own step (``train.loop._train_epoch``) fed by a real
  ``DataLoader``;
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
Times are the minimum over repetitions (interference from other processes only ever adds time), with
the two sides of each comparison interleaved.

Token ids for the real architecture come from the project's tiny tokenizer: the CLIP BPE vocabulary
would need a download, and with random weights only the sequence length matters. The random decoder
gets PyTorch's default init (``build_tiny`` does that): HF's N(0, 1) init saturates the decoder's
softmax, and the resulting denormal floats make its attention backward 5-10x slower on CPU, which a
pretrained checkpoint never shows.

CPU only (the targets of issue 6 are CPU numbers). Usage::

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
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

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
        pairs: P (image, prompt) pairs per step of the per-pair baselines.
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
    ("real", "quick"): Plan("real", batch=4, enc_batch=1, pairs=1, reps=2, heavy_reps=1, strategies=("decoder", "full"),
                            segment_slices=8, stock_segment_slices=1, trunc_batch=1, trunc_reps=5, gc_batch=1,
                            probe="decoder"),
    ("real", "full"): Plan("real", batch=4, enc_batch=4, pairs=4, reps=3, heavy_reps=2, strategies=TRAIN_STRATEGIES,
                           segment_slices=8, stock_segment_slices=2, trunc_batch=4, trunc_reps=5, gc_batch=2,
                           probe="decoder+gc"),
    ("tiny", "quick"): Plan("tiny", batch=4, enc_batch=4, pairs=4, reps=5, heavy_reps=5, strategies=TRAIN_STRATEGIES,
                            segment_slices=8, stock_segment_slices=8, trunc_batch=8, trunc_reps=10, gc_batch=4,
                            probe=""),
    ("tiny", "full"): Plan("tiny", batch=4, enc_batch=4, pairs=4, reps=10, heavy_reps=10, strategies=TRAIN_STRATEGIES,
                           segment_slices=8, stock_segment_slices=8, trunc_batch=8, trunc_reps=20, gc_batch=4,
                           probe="decoder+gc", compile=True),
    ("tiny", "smoke"): Plan("tiny", batch=2, enc_batch=2, pairs=2, reps=1, heavy_reps=1, strategies=("decoder", "full"),
                            segment_slices=2, stock_segment_slices=1, trunc_batch=2, trunc_reps=1, gc_batch=2,
                            probe="decoder+gc"),
}  # fmt: skip


# --- timing ----------------------------------------------------------------------------------


def _time_once(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_side_by_side(
    fns: dict[str, Callable[[], object]], *, reps: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Wall times of several functions, interleaved so that load changes hit all of them alike.

    Args:
        fns: name -> function to time (it must do the whole unit of work, synchronously on CPU).
        reps: timed calls of each after ``warmup`` untimed ones.

    Returns:
        name -> list of ``reps`` wall times in seconds.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(_time_once(fn))
    return times


def vm_hwm_mb() -> float:
    """This process's peak RSS (VmHWM) in MiB since start or the last :func:`reset_peak_rss`."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", text).group(1)) / 1024


def vm_rss_mb() -> float:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so a later peak belongs to what ran since."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def ru_maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


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

    from clipseg_bench.model.forward import tokenize
    from clipseg_bench.model.load import build_tiny, reference_config
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


def make_prepared(root: Path, *, size: int = 256) -> Path:
    """A small PREPARED folder from two phantom CTs (one train, one val case) in ``root``.

    256 px is the largest phantom side; real CT slices (512 px) cost the loader a little more to resize.
    """
    from clipseg_bench.data.phantom import write_phantoms
    from clipseg_bench.data.prepare import prepare

    write_phantoms(root / "phantoms", cases=2, seed=0, style="A", size=size)
    return prepare(images=root / "phantoms" / "images", labels=root / "phantoms" / "labels", out=root / "prepared",
                   val_fraction=0.5, seed=0, png=False)  # fmt: skip


# --- (b) our engine: the training loop's own step ----------------------------------------------


@functools.lru_cache(maxsize=1)
def _accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


class EngineRun:
    """The training loop of ``clipseg-bench train`` set up as ``train()`` does, stepped one step at a time.

    Every step is one call of ``train.loop._train_epoch`` over a dataset of exactly ``batch`` slices,
    so it includes what the loop does: data loading, target building, forward, loss, backward,
    clipping and the optimizer. ``absent_fraction=1`` makes every slice bring all 13 prompts.

    Args:
        arch: the model (with its strategy already applied) and prompts.
        data: the prepared dataset; the first ``batch`` training slices are used.
        batch: B slices per step.
        use_cache: feed cached frozen vision activations (only when the vision encoder is frozen).
        cache_name: file stem of the feature cache (one per batch size).
    """

    def __init__(self, arch: Arch, data, *, batch: int, use_cache: bool, cache_name: str | None = None):
        from torch.utils.data import DataLoader
        from transformers import get_constant_schedule

        from clipseg_bench.config import TrainConfig
        from clipseg_bench.data.dataset import SliceDataset
        from clipseg_bench.model.feature_cache import build_feature_cache
        from clipseg_bench.model.forward import encode_prompts, text_trainable, vision_trainable
        from clipseg_bench.organs import ORGANS
        from clipseg_bench.train.loop import EpochSampler, PromptedSegmenter, _Loop
        from clipseg_bench.train.runinfo import StepTimer

        model = arch.model
        self.cfg = TrainConfig(data=str(data.root), out=str(data.root / "unused"), batch_size=batch,
                               absent_fraction=1.0)  # fmt: skip
        self.cache_build_s = 0.0
        features = None
        if use_cache:
            if vision_trainable(model):
                raise ValueError("the feature cache needs a frozen vision encoder")
            rows = data.slices("train", kept_only=True).iloc[:batch]
            features, info = build_feature_cache(model, data=data, rows=rows, name=cache_name or f"bench_b{batch}",
                                                 size=arch.size, mean=arch.mean, std=arch.std, show_progress=False)  # fmt: skip
            self.cache_build_s = info.build_s
        prompt_emb = None
        if not text_trainable(model):  # as train(): frozen prompt embeddings are computed once
            with torch.no_grad():
                prompt_emb = encode_prompts(model, arch.tokens["input_ids"], arch.tokens["attention_mask"])
        dataset = SliceDataset(data, "train", size=arch.size, features=features)
        # The sampler draws only from the first `batch` slices (the cached ones): one epoch = one step.
        loader = DataLoader(dataset, batch_size=batch, sampler=EpochSampler(batch, seed=0),
                            num_workers=self.cfg.num_workers)  # fmt: skip
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=self.cfg.weight_decay)
        module = PromptedSegmenter(model, arch.tokens["input_ids"], arch.tokens["attention_mask"])
        accelerator = _accelerator()
        self.loop = _Loop(self.cfg, accelerator, module, optimizer, get_constant_schedule(optimizer), loader,
                          [o.id for o in ORGANS], prompt_emb, arch.size, arch.mean, arch.std, StepTimer(torch.device("cpu")),
                          total_steps=1)  # fmt: skip
        self.steps = 0
        self.masks = 0
        self.last_masks = 0

    def step(self) -> None:
        """One training step (one epoch of ``batch`` slices)."""
        from tqdm.auto import tqdm

        from clipseg_bench.train.loop import _train_epoch

        with tqdm(disable=True) as pbar:
            _, stats = _train_epoch(self.loop, self.steps, 0, pbar)
        self.steps += 1
        self.last_masks = stats["masks"]
        self.masks += stats["masks"]

    def reset_breakdown(self) -> None:
        from clipseg_bench.train.runinfo import StepTimer

        self.loop.timer = StepTimer(torch.device("cpu"))

    @property
    def breakdown(self) -> dict[str, float]:
        return dict(self.loop.timer.totals)


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
    images = torch.stack([it["image"] for it in items])
    labels = torch.stack([it["labels"] for it in items])
    ids = torch.tensor([ORGANS[k].id for k in organ_idx], dtype=labels.dtype)
    targets = (labels == ids[:, None, None]).float()
    return PairBatch(
        images, arch.tokens["input_ids"][organ_idx], arch.tokens["attention_mask"][organ_idx], targets
    )


def make_pair_step(arch: Arch, batch: PairBatch, *, stock: bool) -> Callable[[], None]:
    """A per-pair training step: preprocess, forward on P pairs, loss, backward, clip, AdamW.

    Args:
        stock: use ``CLIPSegForImageSegmentation.forward`` (only the decoder can learn through it);
            else our forward with one image and one prompt per pair (no shared encoding).
    """
    from clipseg_bench.model.forward import forward, preprocess
    from clipseg_bench.train.losses import segmentation_loss

    model = arch.model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-4)
    n = len(batch.images)
    diagonal = torch.arange(n).repeat(2, 1).T  # pair i = (image i, prompt i)

    def step() -> None:
        model.train()
        pv = preprocess(batch.images, size=arch.size, mean=arch.mean, std=arch.std)
        if stock:
            out = model(input_ids=batch.input_ids, pixel_values=pv, attention_mask=batch.attention_mask)
            logits = out.logits.reshape(n, *pv.shape[-2:])  # HF squeezes a single pair to (S, S)
        else:
            logits = forward(model, pv, input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             pairs=diagonal)  # fmt: skip
        loss = segmentation_loss(logits, batch.targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


# --- measurements ------------------------------------------------------------------------------


def row(arch: str, strategy: str, mode: str, masks: int | None, seconds: float, *, ratio: float | None = None,
        note: str = "") -> dict:  # fmt: skip
    """One table row: ``masks`` (slice, organ) masks took ``seconds`` (one step, or one volume)."""
    rate = masks / seconds if masks is not None and seconds > 0 else None
    return {"arch": arch, "strategy": strategy, "mode": mode, "masks": masks, "time_s": seconds,
            "masks_per_s": rate, "ratio": ratio, "note": note}  # fmt: skip


def with_strategy(arch: Arch, strategy: str) -> Arch:
    """A copy of ``arch`` whose model has ``strategy`` applied (adapters and LoRA inject modules)."""
    from clipseg_bench.strategies import apply_strategy

    model = copy.deepcopy(arch.model)
    apply_strategy(model, strategy)
    return replace(arch, model=model)


def measure_strategy(arch: Arch, data, plan: Plan, strategy: str, log) -> tuple[list[dict], dict]:
    """Step time and masks/s of one strategy, per-pair baseline against our engine, side by side.

    Returns:
        (table rows, extras) where extras holds the engine's time breakdown for decoder-only.
    """
    from clipseg_bench.model.forward import vision_trainable

    s_arch = with_strategy(arch, strategy)
    cached = not vision_trainable(s_arch.model)
    batch = plan.batch if cached else plan.enc_batch
    stock = strategy == "decoder"
    baseline = make_pair_step(s_arch, pair_batch(s_arch, data, plan.pairs), stock=stock)
    engine = EngineRun(s_arch, data, batch=batch, use_cache=cached)
    reps = plan.reps if cached else plan.heavy_reps
    log(f"  {arch.name} {strategy}: per-pair P={plan.pairs} vs engine B={batch}x{K}, {reps} reps")
    times = time_side_by_side(
        {"baseline": baseline, "engine": engine.step}, reps=1, warmup=0
    )  # warm-up, timed
    engine.reset_breakdown()
    more = time_side_by_side({"baseline": baseline, "engine": engine.step}, reps=reps, warmup=0)
    wall_engine = sum(more["engine"])
    t_base, t_eng = min(more["baseline"]), min(more["engine"])
    base_mode = "stock HF forward per pair" if stock else "our forward per pair (no shared encoding)"
    base_note = "" if stock else "stock forward cannot train encoders"
    eng_mode = "engine: cached fp16 features, prompts once" if cached else "engine: shared encoding"
    base_row = row(arch.name, strategy, base_mode, plan.pairs, t_base, ratio=1.0, note=base_note)
    eng_row = row(arch.name, strategy, eng_mode, engine.last_masks, t_eng)
    eng_row["ratio"] = eng_row["masks_per_s"] / base_row["masks_per_s"]
    rows = [base_row, eng_row]
    extras = {"warmup_s": {k: v[0] for k, v in times.items()}}
    if cached:
        breakdown = engine.breakdown
        extras["breakdown_s"] = breakdown
        extras["data_share"] = breakdown["data"] / wall_engine
        extras["cache_build_s_per_slice"] = engine.cache_build_s / batch
        rows.append(row(arch.name, strategy, "feature cache build, per slice", None, engine.cache_build_s / batch,
                        note="amortised over all epochs"))  # fmt: skip
    if strategy == "full":
        rows += measure_gradient_checkpointing(s_arch, data, plan, engine, t_eng, log)
        if plan.compile:
            rows += measure_compile(s_arch, data, plan, engine, t_eng, log)
    del engine, baseline, s_arch
    return rows, extras


def measure_gradient_checkpointing(
    arch: Arch, data, plan: Plan, engine: EngineRun, t_plain: float, log
) -> list[dict]:
    """Step time of ``full`` with encoder gradient checkpointing (memory: see the probe)."""
    from clipseg_bench.model.forward import set_gradient_checkpointing

    if arch.name == "real":  # timed, with its memory, in the probe process; too slow to repeat here
        return []
    log(f"  {arch.name} full + gradient checkpointing")
    set_gradient_checkpointing(arch.model, True)
    try:
        run = EngineRun(arch, data, batch=engine.cfg.batch_size, use_cache=False)
        t = time_side_by_side({"gc": run.step}, reps=plan.heavy_reps)["gc"]
    finally:
        set_gradient_checkpointing(arch.model, False)
    r = row(arch.name, "full", "engine + gradient checkpointing", run.last_masks, min(t))
    r["ratio"] = t_plain / min(t)
    r["note"] = "ratio: speed vs engine without"
    return [r]


def measure_compile(arch: Arch, data, plan: Plan, engine: EngineRun, t_plain: float, log) -> list[dict]:
    """Step time of ``full`` with the engine's module under ``torch.compile`` (the first step compiles)."""
    log(f"  {arch.name} full + torch.compile")
    run = EngineRun(arch, data, batch=engine.cfg.batch_size, use_cache=False)
    run.loop.module = torch.compile(run.loop.module)
    try:
        compile_s = _time_once(run.step)
        t = time_side_by_side({"compiled": run.step}, reps=plan.heavy_reps, warmup=1)["compiled"]
    except Exception as exc:  # inductor needs a C++ compiler; report instead of failing the benchmark
        return [
            row(arch.name, "full", "engine + torch.compile", 0, float("nan"), note=f"failed: {exc!r}"[:80])
        ]
    r = row(arch.name, "full", "engine + torch.compile", run.last_masks, min(t), ratio=t_plain / min(t),
            note=f"ratio: speed vs eager; first step {compile_s:.1f} s")  # fmt: skip
    return [r]


def measure_segment(arch: Arch, data, plan: Plan, log) -> list[dict]:
    """Segment a volume for all 13 organs at inference, from uint8 slices to probabilities.

    Stock: per slice, the stock forward on the slice repeated 13 times with the 13 prompts, then
    sigmoid and resize to the slice size. Ours: ``evaluation.predict.Segmenter`` (one encoding per slice;
    building it, which embeds the prompts, is inside the timed region).
    """
    import torch.nn.functional as F

    from clipseg_bench.evaluation.predict import Segmenter
    from clipseg_bench.model.forward import preprocess
    from clipseg_bench.organs import ORGANS, prompts

    model = arch.model.eval()
    case = data.cases("val")[0]
    volume = np.ascontiguousarray(data.array(case, "image")[: plan.segment_slices])
    stock_slices = torch.from_numpy(volume[: plan.stock_segment_slices].copy())
    ids, mask = arch.tokens["input_ids"], arch.tokens["attention_mask"]

    @torch.no_grad()
    def stock() -> None:
        for img in stock_slices:
            pv = preprocess(img[None], size=arch.size, mean=arch.mean, std=arch.std).expand(K, -1, -1, -1)
            logits = model(input_ids=ids, pixel_values=pv, attention_mask=mask).logits
            probs = torch.sigmoid(
                F.interpolate(logits[:, None], size=img.shape, mode="bilinear", align_corners=False)
            )
            probs.cpu()

    def ours() -> None:
        seg = Segmenter(model, arch.tokenizer, organs=list(ORGANS), prompts=prompts("name"), size=arch.size,
                        mean=arch.mean, std=arch.std, device="cpu")  # fmt: skip
        for _ in seg.iter_probabilities(volume, batch_size=16):
            pass

    log(
        f"  {arch.name} segment: stock {len(stock_slices)} slices vs Segmenter {len(volume)} slices x {K} organs"
    )
    t = time_side_by_side({"stock": stock, "ours": ours}, reps=plan.heavy_reps)
    base = row(arch.name, "zeroshot", "segment: stock forward per pair", len(stock_slices) * K, min(t["stock"]),
               ratio=1.0, note=f"{len(stock_slices)} slice(s)")  # fmt: skip
    mine = row(arch.name, "zeroshot", "segment: Segmenter", len(volume) * K, min(t["ours"]),
               note=f"{len(volume)} slices, {volume.shape[1]} px")  # fmt: skip
    mine["ratio"] = mine["masks_per_s"] / base["masks_per_s"]
    return [base, mine]


def measure_truncation(arch: Arch, plan: Plan, log) -> list[dict]:
    """Vision-encoder forward over all layers (as the stock forward) vs up to the deepest extract layer."""
    from clipseg_bench.model.forward import encode_images, vision_depth

    model = arch.model.eval()
    vm = model.clip.vision_model
    g = torch.Generator().manual_seed(0)
    pv = torch.randn(plan.trunc_batch, 3, arch.size, arch.size, generator=g)

    @torch.no_grad()
    def all_layers() -> None:
        vm(pv, output_hidden_states=True, interpolate_pos_encoding=True)

    @torch.no_grad()
    def truncated() -> None:
        encode_images(model, pv)

    depth, total = vision_depth(model), len(vm.encoder.layers)
    log(
        f"  {arch.name} vision truncation: {depth} of {total} layers, batch {plan.trunc_batch}, {plan.trunc_reps} reps"
    )
    t = time_side_by_side({"all": all_layers, "truncated": truncated}, reps=plan.trunc_reps)
    note = f"{plan.trunc_batch} images, no masks"
    full_row = row(
        arch.name, "-", f"vision encoder, all {total} layers", None, min(t["all"]), ratio=1.0, note=note
    )
    trunc_row = row(arch.name, "-", f"vision encoder, first {depth} layers", None, min(t["truncated"]),
                    ratio=min(t["all"]) / min(t["truncated"]), note=f"{note}; ideal {total / depth:.2f}x")  # fmt: skip
    return [full_row, trunc_row]


# --- the peak-memory probe (its own process) -----------------------------------------------------


def probe_memory(arch_name: str, data_root: Path, *, batch: int, gc_batch: int, steps: int = 2) -> dict:
    """Peak RSS of decoder-only training on cached features, then gradient checkpointing on ``full``.

    Runs in a fresh process, so nothing the other measurements allocated counts. The process holds
    what ``train()`` holds: the whole model (the frozen encoders included), the memory-mapped fp16
    cache and the decoder's activations for B x 13 masks.

    Returns:
        ``{"torch_import_rss_mb", "model_rss_mb", "decoder_cached_peak_rss_mb", "decoder_step_s",
        "gc": {...}}`` in MiB and seconds.
    """
    from clipseg_bench.data.dataset import PreparedData
    from clipseg_bench.model.forward import set_gradient_checkpointing
    from clipseg_bench.strategies import apply_strategy

    out = {"torch_import_rss_mb": vm_rss_mb()}
    arch = build_arch(arch_name)
    out["model_rss_mb"] = vm_rss_mb()
    data = PreparedData(data_root)
    apply_strategy(arch.model, "decoder")
    run = EngineRun(arch, data, batch=batch, use_cache=True)
    run.step()  # warm-up
    out["decoder_step_s"] = min(_time_once(run.step) for _ in range(steps))
    out["decoder_masks"] = run.last_masks
    out["decoder_cached_peak_rss_mb"] = ru_maxrss_mb()
    del run

    # Gradient checkpointing: checkpointed first, so memory the plain step leaves behind cannot count.
    apply_strategy(arch.model, "full")
    gc = {"batch": gc_batch, "peak_reset": True}
    run = EngineRun(arch, data, batch=gc_batch, use_cache=False)
    set_gradient_checkpointing(arch.model, True)
    run.step()  # warm-up: allocates AdamW's state, which both variants then hold
    for enabled in (True, False):
        set_gradient_checkpointing(arch.model, enabled)
        before = vm_rss_mb()
        gc["peak_reset"] &= reset_peak_rss()
        t = _time_once(run.step)
        key = "on" if enabled else "off"
        gc[key] = {"step_s": t, "peak_rss_mb": vm_hwm_mb(), "step_peak_over_start_mb": vm_hwm_mb() - before}
    out["gc"] = gc
    return out


def run_probe(arch_name: str, data_root: Path, plan: Plan, log) -> dict:
    """:func:`probe_memory` in a child process (this script with ``--probe``)."""
    log(
        f"  {arch_name} memory probe (separate process): decoder on cache B={plan.batch}, full GC B={plan.gc_batch}"
    )
    cmd = [sys.executable, str(Path(__file__).resolve()), "--probe", arch_name, "--probe-data", str(data_root),
           "--probe-batch", str(plan.batch), "--probe-gc-batch", str(plan.gc_batch)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- the whole benchmark -----------------------------------------------------------------------


def measure_arch(arch_name: str, data_root: Path, plan: Plan, log) -> dict:
    """Everything for one architecture. Returns ``{"rows", "extras", "probe"}``."""
    from clipseg_bench.data.dataset import PreparedData

    data = PreparedData(data_root)
    t0 = time.perf_counter()
    arch = build_arch(arch_name)
    log(f"{arch_name}: built in {time.perf_counter() - t0:.1f} s")
    rows = measure_truncation(arch, plan, log)  # also warms the vision encoder up for segment
    rows += measure_segment(arch, data, plan, log)
    extras = {}
    for strategy in plan.strategies:
        r, extras[strategy] = measure_strategy(arch, data, plan, strategy, log)
        rows += r
    probe = run_probe(arch_name, data_root, plan, log) if plan.probe else None
    if probe:
        gc = probe["gc"]
        for key, mode in (("off", "engine (probe)"), ("on", "engine + gradient checkpointing (probe)")):
            r = row(arch_name, "full", mode, gc["batch"] * K, gc[key]["step_s"],
                    note=f"peak RSS {gc[key]['peak_rss_mb']:.0f} MiB, step +{gc[key]['step_peak_over_start_mb']:.0f}")  # fmt: skip
            r["ratio"] = gc["off"]["step_s"] / gc[key]["step_s"]
            rows.append(r)
    return {"rows": rows, "extras": extras, "probe": probe}


def _ratio(rows: list[dict], arch: str, strategy: str, mode_prefix: str) -> float | None:
    for r in rows:
        if r["arch"] == arch and r["strategy"] == strategy and r["mode"].startswith(mode_prefix):
            return r["ratio"]
    return None


def headline(results: dict[str, dict]) -> dict:
    """The four ratios of issue 6, from the real architecture when it was measured."""
    arch = "real" if "real" in results else "tiny"
    rows = results[arch]["rows"]
    ratios = {
        "decoder_cached_vs_stock": _ratio(rows, arch, "decoder", "engine"),
        "full_shared_vs_pairwise": _ratio(rows, arch, "full", "engine: shared"),
        "segment_vs_pairwise": _ratio(rows, arch, "zeroshot", "segment: Segmenter"),
        "vision_truncation": _ratio(rows, arch, "-", "vision encoder, first"),
    }
    passed = {k: (v is not None and v >= TARGETS[k]) for k, v in ratios.items()}
    probe = results[arch]["probe"]
    memory = None
    if probe:
        peak = probe["decoder_cached_peak_rss_mb"]
        memory = {**probe, "target_mb": RSS_TARGET_MB, "pass": peak <= RSS_TARGET_MB}
    share = results[arch]["extras"].get("decoder", {}).get("data_share")
    data = {"arch": arch, "share": share, "target": DATA_SHARE_TARGET,
            "pass": share is not None and share <= DATA_SHARE_TARGET}  # fmt: skip
    return {
        "arch": arch,
        "ratios": ratios,
        "targets": TARGETS,
        "pass": passed,
        "memory": memory,
        "data_loading": data,
    }


def format_table(rows: list[dict]) -> str:
    import pandas as pd

    df = pd.DataFrame(
        rows, columns=["arch", "strategy", "mode", "masks", "time_s", "masks_per_s", "ratio", "note"]
    )
    df = df.rename(columns={"time_s": "step s", "masks_per_s": "masks/s", "ratio": "ratio"})
    return df.to_markdown(index=False, floatfmt=".3g")


def format_summary(head: dict) -> str:
    lines = [f"headline ({head['arch']} architecture):"]
    for key, value in head["ratios"].items():
        mark = "PASS" if head["pass"][key] else "FAIL"
        shown = "n/a" if value is None else f"{value:.2f}x"
        lines.append(f"  {key:<26} {shown:>8}  target >= {TARGETS[key]:g}x  {mark}")
    mem = head["memory"]
    if mem:
        mark = "PASS" if mem["pass"] else "FAIL"
        lines.append(f"  decoder-on-cache peak RSS  {mem['decoder_cached_peak_rss_mb']:.0f} MiB at B={mem.get('batch', '?')}"
                     f"  target <= {RSS_TARGET_MB:.0f} MiB  {mark}   (torch imported: {mem['torch_import_rss_mb']:.0f} MiB, "
                     f"+ model: {mem['model_rss_mb']:.0f} MiB)")  # fmt: skip
    data = head["data_loading"]
    if data["share"] is not None:
        mark = "PASS" if data["pass"] else "FAIL"
        lines.append(
            f"  data loading share         {data['share']:.1%}  target <= {DATA_SHARE_TARGET:.0%}  {mark}"
        )
    return "\n".join(lines)


def run_benchmark(*, archs: list[str], profile: str, log=print, workdir: Path | None = None) -> dict:
    """Run every measurement; returns the JSON-ready result (``ratios`` first).

    Args:
        archs: ``real`` and/or ``tiny``.
        profile: ``quick``, ``full`` or ``smoke`` (tests: minimal repetitions).
        workdir: where the phantom dataset goes (a temporary folder by default).
    """
    from clipseg_bench.train.runinfo import git_info, hardware_info

    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="clipseg-throughput-")))
        data_root = make_prepared(workdir, size=64 if profile == "smoke" else 256)
        results = {}
        for arch in archs:
            plan = PLANS[(arch, profile)]
            results[arch] = measure_arch(arch, data_root, plan, log)
            if results[arch]["probe"]:
                results[arch]["probe"]["batch"] = plan.batch
    head = headline(results)
    rows = [r for a in archs for r in results[a]["rows"]]
    return {
        "ratios": head["ratios"],
        "targets": TARGETS,
        "pass": head["pass"],
        "headline_arch": head["arch"],
        "memory": head["memory"],
        "data_loading": head["data_loading"],
        "rows": rows,
        "extras": {a: results[a]["extras"] for a in archs},
        "plans": {a: asdict(PLANS[(a, profile)]) for a in archs},
        "profile": profile,
        "total_s": time.perf_counter() - t0,
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
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="fewer repetitions and sizes; < 5 min on 2 CPU cores")
    p.add_argument("--smoke", action="store_true", help="tiny architecture, minimal repetitions (for tests)")
    p.add_argument("--arch", choices=["real", "tiny", "both"], default="both")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    p.add_argument(
        "--probe", choices=["real", "tiny"], help=argparse.SUPPRESS
    )  # the memory probe's child process
    p.add_argument("--probe-data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--probe-batch", type=int, default=4, help=argparse.SUPPRESS)
    p.add_argument("--probe-gc-batch", type=int, default=1, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.probe:
        result = probe_memory(a.probe, a.probe_data, batch=a.probe_batch, gc_batch=a.probe_gc_batch)
        print(json.dumps(result))
        return 0

    profile = "smoke" if a.smoke else "quick" if a.quick else "full"
    archs = ["tiny"] if a.smoke else ["real", "tiny"] if a.arch == "both" else [a.arch]

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    log(f"throughput benchmark ({profile}), {torch.get_num_threads()} threads, archs: {', '.join(archs)}")
    result = run_benchmark(archs=archs, profile=profile, log=log)
    print(format_table(result["rows"]))
    print()
    print(format_summary({"arch": result["headline_arch"], "ratios": result["ratios"], "pass": result["pass"],
                          "memory": result["memory"], "data_loading": result["data_loading"]}))  # fmt: skip
    print(f"total {result['total_s']:.0f} s")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(_clean(result), indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
