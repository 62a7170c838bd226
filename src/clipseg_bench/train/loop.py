"""`clipseg-bench train`: fine-tune one strategy on prepared slices with Hugging Face Accelerate.

The loop is a short template (nanoGPT / nnU-Net style): build -> for each epoch: train steps,
validate, checkpoint. It never looks at the strategy's name: what trains follows from
``requires_grad``, and whether the image encoder can be skipped (cached features) follows from the
vision encoder being frozen.
"""

from __future__ import annotations

import contextlib
import functools
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from clipseg_bench.config import TrainConfig, resolve_lr, save_config
from clipseg_bench.data.dataset import PreparedData, SliceDataset, organ_targets
from clipseg_bench.errors import InputError
from clipseg_bench.model.checkpoint import save_trained
from clipseg_bench.model.forward import (
    decode,
    encode_images,
    encode_prompts,
    preprocess,
    set_gradient_checkpointing,
    text_trainable,
    tokenize,
    vision_trainable,
)
from clipseg_bench.model.load import load_model
from clipseg_bench.organs import parse_organs, prompts
from clipseg_bench.strategies import apply_strategy, count_parameters
from clipseg_bench.train.allocator import return_free_memory
from clipseg_bench.train.checkpoint import load_resume_state, save_resume_state
from clipseg_bench.train.losses import batch_dice, segmentation_loss
from clipseg_bench.train.runinfo import StepTimer, git_info, hardware_info, peak_memory_mb, write_json_atomic

HISTORY_COLUMNS = ["epoch", "step", "loss", "train_dice", "val_dice", "epoch_time_s", "lr"]


class PromptedSegmenter(nn.Module):
    """CLIPSeg behind one ``forward`` so Accelerate/DDP see every trainable parameter used.

    Images go through the vision encoder once per step for all their prompts; prompts go through
    the text encoder only when it trains (otherwise their embeddings are passed in, computed once).
    """

    def __init__(self, clipseg: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        super().__init__()
        self.clipseg = clipseg
        self.register_buffer("input_ids", input_ids, persistent=False)
        self.register_buffer("attention_mask", attention_mask, persistent=False)

    def forward(self, pixel_values=None, *, activations=None, prompt_emb=None, pairs=None) -> torch.Tensor:
        if prompt_emb is None:
            prompt_emb = encode_prompts(self.clipseg, self.input_ids, self.attention_mask)
        if activations is None:
            activations = encode_images(self.clipseg, pixel_values)
        return decode(self.clipseg, activations, prompt_emb, pairs=pairs)


class EpochSampler(Sampler[int]):
    """A shuffle that depends only on (seed, epoch), so a resumed run sees the same order."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


@dataclass
class _Loop:
    """Everything the epoch functions share."""

    cfg: TrainConfig
    accelerator: object
    module: nn.Module
    optimizer: torch.optim.Optimizer | None
    scheduler: object
    loader: DataLoader
    organ_ids: list[int]
    prompt_emb: torch.Tensor | None
    size: int
    mean: tuple
    std: tuple
    timer: StepTimer
    total_steps: int
    pair_chunk: int = 0  # >0: decode pairs in chunks (only used when no encoder needs gradients)


def augment_intensity(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random contrast (x0.9-1.1), brightness (+-10) and noise (sd 3) per slice, on uint8 (B, S, S).

    Intensity only: a left/right flip would turn the right kidney into the left one. Draws come
    from ``generator`` alone, so a resumed run augments exactly as an uninterrupted one.
    """
    b = images.shape[0]
    scale = 0.9 + 0.2 * torch.rand(b, 1, 1, generator=generator)
    shift = 20 * torch.rand(b, 1, 1, generator=generator) - 10
    noise = 3 * torch.randn(images.shape, generator=generator)
    out = images.float().cpu() * scale + shift + noise
    return out.round().clamp(0, 255).to(torch.uint8).to(images.device)


def make_optimizer(params, *, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; fused (one kernel for all tensors, not a Python loop:
    0.1 s instead of 0.6 s per step for the 136M trainable parameters of full fine-tuning on CPU)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


def release_frozen_vision(model) -> None:
    """Drop the frozen vision encoder's weights once its outputs are cached (344 MB for rd64).

    Nothing reads them again in this process: training and validation decode cached activations.
    Moving them to the meta device makes any accidental use fail loudly instead of silently.
    """
    model.clip.vision_model.to("meta")
    return_free_memory()  # weights freed inside glibc's heap would otherwise stay resident


def _prepare_out(out: Path, resume: bool) -> None:
    if resume:
        if not (out / "run.json").is_file():
            raise InputError(out, "nothing to resume (no run.json); start without --resume")
        return
    if out.exists() and any(out.iterdir()):
        raise InputError(out, "run folder is not empty; pass --resume to continue it or choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(out, f"cannot create run folder ({exc.strerror})") from None


def _autocast_dtype(cfg: TrainConfig) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision, torch.float32)


def _train_epoch(loop: _Loop, epoch: int, global_step: int, pbar) -> tuple[int, dict]:
    """One pass over the training slices; returns the new global step and the epoch's stats."""
    cfg, acc = loop.cfg, loop.accelerator
    loop.module.train()
    torch.manual_seed(
        cfg.seed * 1_000_003 + epoch
    )  # dropout etc.: a function of (seed, epoch) for exact resume
    pair_gen = torch.Generator().manual_seed(cfg.seed * 7_919 + epoch + 1)
    aug_gen = torch.Generator().manual_seed(cfg.seed * 104_729 + epoch + 1)
    loss_sum, n_steps, dices, masks = 0.0, 0, [], 0
    it = iter(loop.loader)
    while global_step < loop.total_steps:
        with loop.timer.phase("data"):
            batch = next(it, None)
        if batch is None:
            break
        targets = organ_targets(batch["labels"].to(acc.device), loop.organ_ids)  # (B, K, S, S)
        present = targets.flatten(2).amax(-1) > 0
        rand = torch.rand(present.shape, generator=pair_gen).to(present.device)
        select = present | (rand < cfg.absent_fraction)
        if not select.any():  # every rank must run a backward; keep one pair
            select[0, 0] = True
        pairs = select.nonzero()
        with loop.timer.phase("forward"):
            if "features" in batch:
                inputs = {
                    "activations": [a.to(acc.device, torch.float32) for a in batch["features"].unbind(1)]
                }
            else:
                images = batch["image"].to(acc.device)
                if cfg.augment:
                    images = augment_intensity(images, aug_gen)
                inputs = {"pixel_values": preprocess(images, size=loop.size, mean=loop.mean, std=loop.std)}
        # With cached activations and frozen prompts nothing upstream needs a gradient, so the
        # decoder can run over the pairs in chunks whose gradients add up exactly (both loss terms
        # are means over pairs): decoder memory stops growing with the batch.
        chunkable = loop.pair_chunk and "activations" in inputs and loop.prompt_emb is not None
        size = loop.pair_chunk if chunkable else len(pairs)
        step_loss = 0.0
        for start in range(0, len(pairs), size):
            part = pairs[start : start + size]
            sync = contextlib.nullcontext() if start + size >= len(pairs) else acc.no_sync(loop.module)
            with sync:
                with loop.timer.phase("forward"):
                    logits = loop.module(**inputs, prompt_emb=loop.prompt_emb, pairs=part)
                    tgt = targets[part[:, 0], part[:, 1]]
                    loss = segmentation_loss(
                        logits, tgt, bce_weight=cfg.bce_weight, dice_weight=cfg.dice_weight
                    )
                    loss = loss * (len(part) / len(pairs))
                with loop.timer.phase("backward"):
                    acc.backward(loss)
            step_loss += loss.item()
            d = batch_dice(logits.detach(), tgt, threshold=cfg.threshold)
            dices.extend(d[~torch.isnan(d)].tolist())
        with loop.timer.phase("optimizer"):
            if cfg.grad_clip > 0:
                acc.clip_grad_norm_(loop.module.parameters(), cfg.grad_clip)
            loop.optimizer.step()
            loop.scheduler.step()
            loop.optimizer.zero_grad(set_to_none=True)
        global_step += 1
        n_steps += 1
        loss_sum += step_loss
        masks += len(pairs)
        pbar.update(1)
        pbar.set_postfix(epoch=epoch, loss=f"{step_loss:.4f}", refresh=False)
    return global_step, {
        "loss": loss_sum / max(n_steps, 1),
        "train_dice": float(np.mean(dices)) if dices else float("nan"),
        "masks": masks * acc.num_processes,
        "steps": n_steps,
    }


def validation_dice(
    segmenter,
    data: PreparedData,
    split: str,
    *,
    organ_ids,
    max_slices=None,
    features=None,
    threshold=0.5,
    batch_size=16,
) -> float:
    """Mean 2D Dice over the (slice, organ) pairs of ``split`` where the organ is present."""
    ds_rows = data.slices(split, kept_only=True)
    if max_slices:
        ds_rows = ds_rows.iloc[:max_slices]
    imgs = np.stack([data.array(c, "image")[z] for c, z in zip(ds_rows["case"], ds_rows["z"])])
    labs = np.stack([data.array(c, "label")[z] for c, z in zip(ds_rows["case"], ds_rows["z"])])
    dices = []
    if features is not None:  # cached rows follow the same manifest order; use the ones we score
        features = features[: len(ds_rows)]
    for start, probs in segmenter.iter_probabilities(imgs, batch_size=batch_size, features=features):
        t = organ_targets(torch.from_numpy(labs[start : start + len(probs)]), organ_ids)
        pred = (probs > threshold).float()
        present = t.flatten(2).sum(-1) > 0
        inter = (pred * t).flatten(2).sum(-1)
        denom = pred.flatten(2).sum(-1) + t.flatten(2).sum(-1)
        dices.extend((2 * inter / denom.clamp_min(1))[present].tolist())
    return float(np.mean(dices)) if dices else float("nan")


def train(cfg: TrainConfig, *, resume: bool = False) -> Path:
    """Train one strategy; writes the run folder described in docs/architecture.md. Returns it."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from clipseg_bench.evaluation.predict import Segmenter
    from clipseg_bench.model.feature_cache import build_feature_cache, cache_key

    out = Path(cfg.out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # cpu=True is what lets Accelerate see a torchrun/gloo launch on a machine without a GPU.
    acc = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    main = acc.is_main_process
    if main:
        _prepare_out(out, resume)
    acc.wait_for_everyone()
    set_seed(cfg.seed)

    data = PreparedData(cfg.data)
    loaded = load_model(cfg.model, image_size=cfg.image_size)
    model = loaded.model
    apply_strategy(model, cfg.strategy, cfg.strategy_options)
    counts = count_parameters(model)
    if cfg.gradient_checkpointing:
        set_gradient_checkpointing(model, True)
    model.to(acc.device)
    organ_list = parse_organs(",".join(cfg.organs) if cfg.organs else None)
    organ_ids = [o.id for o in organ_list]
    prompt_texts = prompts(cfg.prompt_template, organ_list)
    size, mean, std = loaded.image_size, loaded.mean, loaded.std
    tokens = {k: v.to(acc.device) for k, v in tokenize(loaded.tokenizer, prompt_texts).items()}

    run_json = {
        "status": "running",
        "strategy": cfg.strategy,
        "seed": cfg.seed,
        "model": cfg.model,
        "git": git_info(),
        "hardware": hardware_info(acc.num_processes),
        "params": {"trainable": counts.trainable, "total": counts.total},
        "lr": resolve_lr(cfg),
        "window": data.window,  # segment needs it to preprocess a new CT like the training data
    }
    if main:
        save_config(cfg, out / "config.yaml")
        write_json_atomic(out / "run.json", run_json)

    # Frozen parts are computed once, not every step.
    timer = StepTimer(acc.device)
    prompt_emb = None
    if not text_trainable(model):
        with torch.no_grad():
            prompt_emb = encode_prompts(model, tokens["input_ids"], tokens["attention_mask"])
    train_rows = data.slices("train", kept_only=True)
    features, val_features, cache = None, None, {"cache_build_s": 0.0, "cache_size_mb": 0.0}
    if not vision_trainable(model) and cfg.feature_cache:
        # One key for both row sets: it hashes the whole vision encoder (344 MB for rd64).
        key = cache_key(model, data=data, size=size, mean=mean, std=std)
        build = functools.partial(
            build_feature_cache,
            model,
            data=data,
            size=size,
            mean=mean,
            std=std,
            device=acc.device,
            show_progress=main,
            key=key,
        )
        built = []
        with acc.main_process_first():
            if not cfg.augment:  # augmented images change every epoch: their encodings cannot be cached
                features, info = build(rows=train_rows, name="train_kept")
                built.append(info)
            if data.cases("val"):
                val_rows = data.slices("val", kept_only=True).iloc[: cfg.val_max_slices]
                val_features, vinfo = build(rows=val_rows, name="val_kept")
                built.append(vinfo)
        cache = {
            "cache_build_s": sum(i.build_s for i in built),
            "cache_size_mb": sum(i.size_mb for i in built),
            "cache_reused": all(i.reused for i in built),
        }

    dataset = SliceDataset(data, "train", size=size, features=features)
    sampler = EpochSampler(len(dataset), cfg.seed)
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
    )
    steps_per_epoch = math.ceil(len(dataset) / (cfg.batch_size * acc.num_processes))
    total_steps = min(cfg.max_steps or 10**12, steps_per_epoch * cfg.epochs)
    n_epochs = math.ceil(total_steps / steps_per_epoch)

    params = [p for p in model.parameters() if p.requires_grad]
    module = PromptedSegmenter(model, tokens["input_ids"], tokens["attention_mask"])
    if cfg.compile:  # in place, so Accelerate/DDP still wrap an ordinary module (measured in benchmarks/)
        module.compile()
    optimizer = scheduler = None
    if params:
        from transformers import get_cosine_schedule_with_warmup

        optimizer = make_optimizer(params, lr=resolve_lr(cfg), weight_decay=cfg.weight_decay)
        scheduler = get_cosine_schedule_with_warmup(
            optimizer, min(cfg.warmup_steps, total_steps), total_steps
        )
        module, optimizer, loader, scheduler = acc.prepare(module, optimizer, loader, scheduler)
    state = {
        "epoch": 0,
        "global_step": 0,
        "history": [],
        "train_time_s": 0.0,
        "masks": 0,
        "breakdown_s": dict(timer.totals),
    }
    ckpt = out / "checkpoints" / "last"
    if resume and ckpt.is_dir():
        state = load_resume_state(ckpt, model=model, optimizer=optimizer, scheduler=scheduler)
        timer.totals.update(state["breakdown_s"])
        if main:
            print(f"resuming {out} after epoch {state['epoch']} (step {state['global_step']})")

    # After acc.prepare (which moves the model) and only single-process: DDP broadcasts every
    # buffer, frozen ones included.
    if features is not None and acc.num_processes == 1:
        release_frozen_vision(model)
    segmenter = Segmenter(
        model,
        loaded.tokenizer,
        organs=organ_list,
        prompts=prompt_texts,
        size=size,
        mean=mean,
        std=std,
        device=acc.device,
    )
    writer = None
    if main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tb"))
    loop = _Loop(
        cfg,
        acc,
        module,
        optimizer,
        scheduler,
        loader,
        organ_ids,
        prompt_emb,
        size,
        mean,
        std,
        timer,
        total_steps,
        pair_chunk=cfg.pair_chunk,
    )

    def _interrupted(signum, frame):  # SIGTERM (e.g. SLURM preemption) -> marked interrupted, resumable
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, _interrupted) if main else None
    try:
        pbar = tqdm(
            total=total_steps,
            initial=state["global_step"],
            desc=f"train {cfg.strategy}",
            unit="step",
            disable=not main or not params,
            dynamic_ncols=True,
        )
        for epoch in range(state["epoch"], n_epochs if params else 0):
            sampler.set_epoch(epoch)
            if hasattr(loader, "set_epoch"):  # Accelerate's loader would reset our sampler to its own counter
                loader.set_epoch(epoch)
            t0 = time.perf_counter()
            global_step, stats = _train_epoch(loop, epoch, state["global_step"], pbar)
            epoch_time = time.perf_counter() - t0
            val_dice = float("nan")
            if main and cfg.val_every and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == n_epochs):
                with timer.phase("eval"):
                    val_dice = _val(segmenter, data, organ_ids, cfg, val_features)
            row = {
                "epoch": epoch + 1,
                "step": global_step,
                "loss": stats["loss"],
                "train_dice": stats["train_dice"],
                "val_dice": val_dice,
                "epoch_time_s": epoch_time,
                "lr": scheduler.get_last_lr()[0],
            }
            state.update(
                epoch=epoch + 1,
                global_step=global_step,
                train_time_s=state["train_time_s"] + epoch_time,
                masks=state["masks"] + stats["masks"],
                breakdown_s=dict(timer.totals),
            )
            state["history"].append(row)
            if main:
                for k in ("loss", "train_dice", "val_dice"):
                    writer.add_scalar(k, row[k], epoch + 1)
                pd.DataFrame(state["history"], columns=HISTORY_COLUMNS).to_csv(
                    out / "history.csv", index=False
                )
                save_resume_state(
                    ckpt,
                    model=acc.unwrap_model(module).clipseg,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    state=state,
                )
            acc.wait_for_everyone()
        pbar.close()
    except KeyboardInterrupt:
        if main:
            write_json_atomic(out / "run.json", {**run_json, "status": "interrupted"})
        raise
    except Exception as exc:
        if main:
            write_json_atomic(out / "run.json", {**run_json, "status": "failed", "error": repr(exc)})
        raise
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)

    checksums = _rank_checksums(acc, model)
    if main:
        with timer.phase("eval"):
            final = {
                "train_dice": validation_dice(
                    segmenter,
                    data,
                    "train",
                    organ_ids=organ_ids,
                    threshold=cfg.threshold,
                    max_slices=cfg.val_max_slices,
                    features=features,
                ),
                "val_dice": _val(segmenter, data, organ_ids, cfg, val_features)
                if data.cases("val")
                else float("nan"),
            }
        if not state["history"]:
            pd.DataFrame([], columns=HISTORY_COLUMNS).to_csv(out / "history.csv", index=False)
        save_trained(model, out / "weights.safetensors", config=cfg.model_dump(mode="json"))
        peak, kind = peak_memory_mb(acc.device)
        epochs_done = max(len(state["history"]), 1)
        timing = {
            "train_time_s": state["train_time_s"],
            "s_per_epoch": state["train_time_s"] / epochs_done if state["history"] else 0.0,
            "epochs": len(state["history"]),
            "steps": state["global_step"],
            "masks_per_s": state["masks"] / state["train_time_s"] if state["train_time_s"] else 0.0,
            **cache,
            "breakdown_s": dict(timer.totals),
            "peak_mem_mb": peak,
            "peak_mem_kind": kind,
        }
        write_json_atomic(
            out / "run.json",
            {**run_json, "status": "finished", "timing": timing, "final": final, "rank_checksums": checksums},
        )
        writer.close()
        print(
            f"trained {cfg.strategy}: train dice {final['train_dice']:.4f}, val dice {final['val_dice']:.4f}, "
            f"{timing['train_time_s']:.1f} s -> {out}"
        )
    acc.wait_for_everyone()
    return out


def _rank_checksums(acc, model) -> list[float]:
    """A checksum of the trained parameters from every process: data-parallel ranks must agree."""
    with torch.no_grad():
        total = sum(
            (p.double() * (i + 1)).sum()
            for i, p in enumerate(p for p in model.parameters() if p.requires_grad)
        )
        local = torch.as_tensor([float(total)], dtype=torch.float64, device=acc.device)
    return [float(x) for x in acc.gather(local).cpu()]


def _val(segmenter, data, organ_ids, cfg, features) -> float:
    return validation_dice(
        segmenter,
        data,
        "val",
        organ_ids=organ_ids,
        max_slices=cfg.val_max_slices,
        features=features,
        threshold=cfg.threshold,
    )
