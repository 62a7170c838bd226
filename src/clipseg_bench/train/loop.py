"""`clipseg-bench train`: fine-tune one strategy on prepared slices with Hugging Face Accelerate.

The loop is a short template (nanoGPT / nnU-Net style): :func:`build_training` -> :func:`fit`
(for each epoch: train steps, validate, checkpoint) -> :func:`finish` (final scores, weights,
run.json). It never looks at the strategy's name.
"""

from __future__ import annotations

import contextlib
import signal
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from clipseg_bench.config import TrainConfig
from clipseg_bench.data.augment import augment_intensity
from clipseg_bench.data.dataset import organ_targets
from clipseg_bench.data.sampling import select_pairs
from clipseg_bench.errors import GradientAuditError, InputError
from clipseg_bench.evaluation.metrics import present_pairs_dice
from clipseg_bench.evaluation.validation import validation_dice
from clipseg_bench.model.checkpoint import save_trained
from clipseg_bench.model.forward import preprocess, unstack_features
from clipseg_bench.provenance import write_json_atomic
from clipseg_bench.train import record
from clipseg_bench.train.checkpoint import load_resume_state, save_resume_state
from clipseg_bench.train.losses import segmentation_loss
from clipseg_bench.train.setup import TrainingSetup, build_training, make_accelerator, release_frozen_vision

HISTORY_COLUMNS = ["epoch", "step", "loss", "train_dice", "val_dice", "epoch_time_s", "lr"]


def _step_inputs(setup: TrainingSetup, batch: dict, aug_gen: torch.Generator) -> dict:
    """The module's inputs for a batch: cached activations, or preprocessed (augmented) images."""
    acc, loaded = setup.accelerator, setup.loaded
    if "features" in batch:
        features = unstack_features(setup.model, batch["features"])
        return {"activations": [a.to(acc.device, torch.float32) for a in features]}
    images = batch["image"].to(acc.device)
    if setup.cfg.augment:
        images = augment_intensity(images, aug_gen)
    return {"pixel_values": preprocess(images, size=loaded.image_size, mean=loaded.mean, std=loaded.std)}


def train_epoch(setup: TrainingSetup, epoch: int, global_step: int, pbar) -> tuple[int, dict]:
    """One pass over the training slices; returns the new global step and the epoch's stats.

    Every random draw (dropout, absent-pair sampling, augmentation) is a function of (seed, epoch),
    so a resumed run repeats an interrupted epoch exactly.
    """
    cfg, acc, timer = setup.cfg, setup.accelerator, setup.timer
    setup.module.train()
    torch.manual_seed(
        cfg.seed * 1_000_003 + epoch
    )  # dropout etc.: a function of (seed, epoch) for exact resume
    pair_gen = torch.Generator().manual_seed(cfg.seed * 7_919 + epoch + 1)
    aug_gen = torch.Generator().manual_seed(cfg.seed * 104_729 + epoch + 1)
    loss_sum, n_steps, dices, masks = 0.0, 0, [], 0
    it = iter(setup.loader)
    while global_step < setup.total_steps:
        with timer.phase("data"):
            batch = next(it, None)
        if batch is None:
            break
        targets = organ_targets(batch["labels"].to(acc.device), setup.organ_ids)  # (B, K, S, S)
        pairs = select_pairs(targets, absent_fraction=cfg.absent_fraction, generator=pair_gen)
        with timer.phase("forward"):
            inputs = _step_inputs(setup, batch, aug_gen)
        # With cached activations and frozen prompts nothing upstream needs a gradient, so the
        # decoder can run over the pairs in chunks whose gradients add up exactly (both loss terms
        # are means over pairs): decoder memory stops growing with the batch.
        chunkable = cfg.pair_chunk and "activations" in inputs and setup.prompt_emb is not None
        size = cfg.pair_chunk if chunkable else len(pairs)
        step_loss = 0.0
        for start in range(0, len(pairs), size):
            part = pairs[start : start + size]
            sync = contextlib.nullcontext() if start + size >= len(pairs) else acc.no_sync(setup.module)
            with sync:
                with timer.phase("forward"):
                    logits = setup.module(**inputs, prompt_emb=setup.prompt_emb, pairs=part)
                    tgt = targets[part[:, 0], part[:, 1]]
                    loss = segmentation_loss(
                        logits, tgt, bce_weight=cfg.bce_weight, dice_weight=cfg.dice_weight
                    )
                    loss = loss * (len(part) / len(pairs))
                with timer.phase("backward"):
                    acc.backward(loss)
            step_loss += loss.item()
            dices.extend(
                present_pairs_dice(torch.sigmoid(logits.detach().float()) > cfg.threshold, tgt).tolist()
            )
        if not setup.audit.reach_checked:  # the first backward of this process: did it reach everything?
            setup.audit.check_reached(setup.model)
        with timer.phase("optimizer"):
            if cfg.grad_clip > 0:
                acc.clip_grad_norm_(setup.module.parameters(), cfg.grad_clip)
            setup.optimizer.step()
            setup.scheduler.step()
            setup.optimizer.zero_grad(set_to_none=True)
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


def _val_dice(setup: TrainingSetup) -> float:
    """The Dice on the validation sample (``setup.val_rows``)."""
    return validation_dice(
        setup.segmenter,
        setup.data,
        setup.val_rows,
        organ_ids=setup.organ_ids,
        features=setup.val_features,
        threshold=setup.cfg.threshold,
        channels=setup.cfg.input_channels,
    )


def _train_check_dice(setup: TrainingSetup) -> float:
    """The final Dice on the training slices (the same sample rule and cap as validation)."""
    return validation_dice(
        setup.segmenter,
        setup.data,
        setup.train_rows.iloc[setup.train_check],
        organ_ids=setup.organ_ids,
        features=setup.features,
        feature_index=setup.train_check,
        threshold=setup.cfg.threshold,
        channels=setup.cfg.input_channels,
    )


def _validates_after(setup: TrainingSetup, epoch: int) -> bool:
    """Whether to validate after ``epoch`` (0-based): every ``val_every`` epochs and after the last,
    never without val slices."""
    every = setup.cfg.val_every
    last = epoch + 1 == setup.n_epochs
    return setup.has_val and bool(every) and ((epoch + 1) % every == 0 or last)


def initial_state(setup: TrainingSetup) -> dict:
    """The loop's bookkeeping before the first epoch (what a resume checkpoint stores)."""
    return {
        "epoch": 0,
        "global_step": 0,
        "history": [],
        "train_time_s": 0.0,
        "masks": 0,
        "breakdown_s": dict(setup.timer.totals),
        "num_processes": setup.accelerator.num_processes,  # the scheduler's state counts per-process ticks
    }


def _checkpoint_dir(out: Path) -> Path:
    return out / "checkpoints" / "last"


def restore(setup: TrainingSetup, out: Path) -> dict:
    """The state to continue from: the last epoch-end checkpoint of ``out`` if any, else a fresh one."""
    ckpt = _checkpoint_dir(out)
    if not ckpt.is_dir():
        return initial_state(setup)
    state = load_resume_state(ckpt, model=setup.model, optimizer=setup.optimizer, scheduler=setup.scheduler)
    written_by = state.get("num_processes", setup.accelerator.num_processes)
    if written_by != setup.accelerator.num_processes:
        raise InputError(
            out,
            f"the checkpoint was written by {written_by} process(es), this run has "
            f"{setup.accelerator.num_processes}; resume with the same number",
        )
    setup.timer.totals.update(state["breakdown_s"])
    if setup.accelerator.is_main_process:
        print(f"resuming {out} after epoch {state['epoch']} (step {state['global_step']})")
    return state


def _end_epoch(setup: TrainingSetup, state: dict, row: dict, out: Path, writer) -> None:
    """Write the epoch's history row, TensorBoard scalars and the resume checkpoint (main process)."""
    for k in ("loss", "train_dice", "val_dice"):
        writer.add_scalar(k, row[k], row["epoch"])
    pd.DataFrame(state["history"], columns=HISTORY_COLUMNS).to_csv(out / "history.csv", index=False)
    save_resume_state(
        _checkpoint_dir(out),
        model=setup.accelerator.unwrap_model(setup.module).clipseg,
        optimizer=setup.optimizer,
        scheduler=setup.scheduler,
        state=state,
    )


def _run_epoch(setup: TrainingSetup, state: dict, epoch: int, *, pbar, writer, out: Path) -> None:
    """Train one epoch, validate, and record it in ``state`` (and, on the main process, on disk)."""
    acc, timer = setup.accelerator, setup.timer
    main = acc.is_main_process
    setup.sampler.set_epoch(epoch)
    if hasattr(setup.loader, "set_epoch"):  # Accelerate's loader would reset our sampler to its own counter
        setup.loader.set_epoch(epoch)
    t0 = time.perf_counter()
    global_step, stats = train_epoch(setup, epoch, state["global_step"], pbar)
    epoch_time = time.perf_counter() - t0
    val_dice = float("nan")
    if main and _validates_after(setup, epoch):
        with timer.phase("eval"):
            val_dice = _val_dice(setup)
    row = {
        "epoch": epoch + 1,
        "step": global_step,
        "loss": stats["loss"],
        "train_dice": stats["train_dice"],
        "val_dice": val_dice,
        "epoch_time_s": epoch_time,
        "lr": setup.scheduler.get_last_lr()[0],
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
        _end_epoch(setup, state, row, out, writer)
    acc.wait_for_everyone()


def fit(setup: TrainingSetup, state: dict, *, out: Path) -> dict:
    """Train epoch by epoch from ``state``, validating and checkpointing at every epoch end.

    Returns:
        The final state: epoch, global_step, history rows, train time, masks, breakdown.
    """
    cfg, main = setup.cfg, setup.accelerator.is_main_process
    writer = None
    if main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tb"))
    pbar = tqdm(
        total=setup.total_steps,
        initial=state["global_step"],
        desc=f"train {cfg.strategy}",
        unit="step",
        disable=not main or not setup.trains,
        dynamic_ncols=True,
    )
    try:
        for epoch in range(state["epoch"], setup.n_epochs if setup.trains else 0):
            _run_epoch(setup, state, epoch, pbar=pbar, writer=writer, out=out)
    finally:  # also on an error, so its message starts on a line of its own
        pbar.close()
        if writer is not None:
            writer.close()
    return state


def finish(setup: TrainingSetup, state: dict, *, out: Path, run_record: dict) -> None:
    """Final train/val Dice, the trained weights and the finished run.json (main process writes)."""
    acc, cfg = setup.accelerator, setup.cfg
    checksums = _rank_checksums(acc, setup.model)
    if acc.is_main_process:
        with setup.timer.phase("eval"):
            final = {
                "train_dice": _train_check_dice(setup),
                # None (JSON null), not NaN, when the data has no val case: there is nothing to score
                "val_dice": _val_dice(setup) if setup.has_val else None,
            }
        if not state["history"]:
            pd.DataFrame([], columns=HISTORY_COLUMNS).to_csv(out / "history.csv", index=False)
        save_trained(setup.model, out / "weights.safetensors", config=cfg.model_dump(mode="json"))
        timing = record.timing_record(setup, state)
        write_json_atomic(
            out / "run.json",
            {
                **run_record,
                "status": "finished",
                "timing": timing,
                "final": final,
                "gradient_audit": setup.audit.record(),
                "rank_checksums": checksums,
            },
        )
        val = "no val split" if final["val_dice"] is None else f"val dice {final['val_dice']:.4f}"
        print(
            f"trained {cfg.strategy}: train dice {final['train_dice']:.4f}, {val}, "
            f"{timing['train_time_s']:.1f} s -> {out}"
        )
    acc.wait_for_everyone()


def _rank_checksums(acc, model) -> list[float]:
    """A checksum of the trained parameters from every process: data-parallel ranks must agree."""
    with torch.no_grad():
        total = sum(
            (p.double() * (i + 1)).sum()
            for i, p in enumerate(p for p in model.parameters() if p.requires_grad)
        )
        local = torch.as_tensor([float(total)], dtype=torch.float64, device=acc.device)
    return [float(x) for x in acc.gather(local).cpu()]


def train(cfg: TrainConfig, *, resume: bool = False) -> Path:
    """Train one strategy; writes the run folder described in docs/architecture.md. Returns it."""
    from accelerate.utils import set_seed

    out = Path(cfg.out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    acc = make_accelerator(cfg)
    main = acc.is_main_process
    if main:
        record.check_run_folder(out, resume, cfg)
    acc.wait_for_everyone()
    set_seed(cfg.seed)
    # Everything that can refuse (data, model, strategy, checkpoint) runs before the first write.
    setup = build_training(cfg, acc)
    state = restore(setup, out) if resume else initial_state(setup)
    run_record = record.start_record(setup) if main else {}  # only the main process writes it
    if main:
        record.write_start(setup, out, run_record)
    release_frozen_vision(setup)

    def _interrupted(signum, frame):  # SIGTERM (e.g. SLURM preemption) -> marked interrupted, resumable
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, _interrupted) if main else None
    try:
        state = fit(setup, state, out=out)
        setup.audit.check_frozen(setup.model)
    except KeyboardInterrupt:
        if main:
            record.mark(out, run_record, "interrupted", gradient_audit=setup.audit.record())
        raise
    except Exception as exc:
        if main:
            why = str(exc) if isinstance(exc, GradientAuditError) else repr(exc)
            record.mark(out, run_record, "failed", error=why, gradient_audit=setup.audit.record())
        raise
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    finish(setup, state, out=out, run_record=run_record)
    return out
