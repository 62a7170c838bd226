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

import torch
from tqdm.auto import tqdm

from clipseg_bench.config import TrainConfig, resolved
from clipseg_bench.data.augment import augment_intensity
from clipseg_bench.data.dataset import organ_targets
from clipseg_bench.data.sampling import select_pairs
from clipseg_bench.errors import InputError, ReportedError, RunFailed
from clipseg_bench.evaluation.validation import validation_dice
from clipseg_bench.model.forward import preprocess, unstack_features
from clipseg_bench.model.weights import save_weights
from clipseg_bench.provenance import output_lock
from clipseg_bench.run_folder import RunFolder, RunRecord, RunStatus
from clipseg_bench.train import record
from clipseg_bench.train.losses import segmentation_loss
from clipseg_bench.train.record import timing_record
from clipseg_bench.train.resume import LoopState, load_resume_state, save_resume_state
from clipseg_bench.train.setup import TrainingSetup, build_training, make_accelerator, release_frozen_vision
from clipseg_bench.train.tally import Reading, StepTally


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device`` without blocking the host: from pinned memory (the loader pins batches on
    CUDA; a small tensor is pinned here through torch's caching host allocator)."""
    if device.type != "cuda" or t.device == device:
        return t.to(device)
    if not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _batch_labels(setup: TrainingSetup, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels (B, S, S) uint8 on the device, present (B, K) bool on the host) of a batch."""
    device, resident = setup.accelerator.device, setup.resident
    if resident is not None:  # the loader served indices; the rows are on the device already
        index = batch["index"]
        ids = resident.present_ids[index]
        labels = resident.labels[_to_device(index, device)]
    else:
        ids, labels = batch["present_ids"], _to_device(batch["labels"], device)
    return labels, ids[:, setup.organ_ids]


def _step_inputs(setup: TrainingSetup, batch: dict, aug_gen: torch.Generator) -> dict:
    """The module's inputs for a batch: cached activations, or preprocessed (augmented) images."""
    device, loaded, resident = setup.accelerator.device, setup.loaded, setup.resident
    if resident is not None:
        stacked = resident.features[_to_device(batch["index"], device)]
        return {"activations": [a.to(torch.float32) for a in unstack_features(setup.model, stacked)]}
    if "features" in batch:
        features = unstack_features(setup.model, _to_device(batch["features"], device))
        return {"activations": [a.to(torch.float32) for a in features]}
    images = _to_device(batch["image"], device)
    if setup.cfg.augment:
        images = augment_intensity(images, aug_gen)
    return {"pixel_values": preprocess(images, size=loaded.image_size, mean=loaded.mean, std=loaded.std)}


def _train_step(setup: TrainingSetup, batch: dict, tally: StepTally, pair_gen, aug_gen) -> int:
    """One optimizer step on a batch; its loss and Dice counts go to ``tally`` (left on the device).

    Nothing here makes the host wait for the device: the pairs are chosen on the host from which
    organs each slice holds, and what the step reports is read at the loop's sync points.

    Returns:
        The number of (slice, organ) masks it trained on.
    """
    cfg, acc, timer = setup.cfg, setup.accelerator, setup.timer
    labels, present = _batch_labels(setup, batch)
    pairs = select_pairs(present, absent_fraction=cfg.absent_fraction, generator=pair_gen)
    n_pairs = len(pairs)
    pairs = _to_device(pairs, acc.device)
    targets = organ_targets(labels, setup.organ_index)  # (B, K, S, S)
    with timer.phase("forward"):
        inputs = _step_inputs(setup, batch, aug_gen)
    # With cached activations and frozen prompts nothing upstream needs a gradient, so the
    # decoder can run over the pairs in chunks whose gradients add up exactly (both loss terms
    # are means over pairs): decoder memory stops growing with the batch.
    chunkable = setup.pair_chunk and "activations" in inputs and setup.prompt_emb is not None
    size = setup.pair_chunk if chunkable else n_pairs
    for start in range(0, n_pairs, size):
        part = pairs[start : start + size]
        weight = min(size, n_pairs - start) / n_pairs
        sync = contextlib.nullcontext() if start + size >= n_pairs else acc.no_sync(setup.module)
        with sync:
            with timer.phase("forward"):
                logits = setup.module(**inputs, prompt_emb=setup.prompt_emb, pairs=part)
                tgt = targets[part[:, 0], part[:, 1]]
                loss = segmentation_loss(logits, tgt, bce_weight=cfg.bce_weight, dice_weight=cfg.dice_weight)
                loss = loss * weight
            with timer.phase("backward"):
                acc.backward(loss)
        tally.add_chunk(loss, torch.sigmoid(logits.detach().float()) > cfg.threshold, tgt)
    if not setup.audit.reach_checked:  # the first backward of this process: did it reach everything?
        setup.audit.check_reached(setup.model)
    lr = setup.scheduler.get_last_lr()[0]  # the step's rate (host-side), named if the step diverged
    with timer.phase("optimizer"):
        if cfg.grad_clip > 0:
            acc.clip_grad_norm_(setup.module.parameters(), cfg.grad_clip)
        setup.optimizer.step()
        setup.scheduler.step()
        setup.optimizer.zero_grad(set_to_none=True)
    tally.end_step(lr)
    return n_pairs


def read_tally(setup: TrainingSetup, tally: StepTally, step: int, pbar=None) -> Reading:
    """The loop's sync point: read what the device accumulated, the timer's events, and run the
    setup's :attr:`~clipseg_bench.train.setup.TrainingSetup.sync_hooks` on the reading."""
    with setup.timer.waiting():
        reading = tally.read(step)
    setup.timer.collect()
    if pbar is not None and reading.steps:
        pbar.set_postfix(epoch=reading.epoch, loss=f"{reading.last_loss:.4f}", refresh=False)
    for hook in setup.sync_hooks:
        hook(reading)
    return reading


def train_epoch(setup: TrainingSetup, epoch: int, global_step: int, pbar) -> tuple[int, dict]:
    """One pass over the training slices; returns the new global step and the epoch's stats.

    Every random draw (dropout, absent-pair sampling, augmentation) is a function of (seed, epoch),
    so a resumed run repeats an interrupted epoch exactly. The loss and Dice stay on the device and
    are read every ``log_every`` steps and at the end (:func:`read_tally`).
    """
    cfg, acc, timer = setup.cfg, setup.accelerator, setup.timer
    setup.module.train()
    torch.manual_seed(
        cfg.seed * 1_000_003 + epoch
    )  # dropout etc.: a function of (seed, epoch) for exact resume
    pair_gen = torch.Generator().manual_seed(cfg.seed * 7_919 + epoch + 1)
    aug_gen = torch.Generator().manual_seed(cfg.seed * 104_729 + epoch + 1)
    tally = StepTally(acc.device, epoch, first_step=global_step + 1)
    masks = 0
    it = iter(setup.loader)
    step_times = []
    while global_step < setup.total_steps:
        t_step = time.perf_counter()
        with timer.phase("data"):
            batch = next(it, None)
        if batch is None:
            break
        masks += _train_step(setup, batch, tally, pair_gen, aug_gen)
        # Host time per step: on CPU the step's own time; on CUDA the launch-bound host time, whose
        # median equals the device's steady-state step time once the launch queue is full.
        step_times.append(time.perf_counter() - t_step)
        global_step += 1
        pbar.update(1)
        if global_step % cfg.log_every == 0:
            read_tally(setup, tally, global_step, pbar)
    reading = read_tally(setup, tally, global_step, pbar)
    return global_step, {
        "loss": reading.loss,
        "train_dice": reading.train_dice,
        "masks": masks * acc.num_processes,
        "steps": reading.steps,
        "bad_step": reading.bad_step,
        "lrs": tally.lrs,
        "step_times": step_times,
    }


def check_finite(setup: TrainingSetup, stats: dict, first_step: int, run: RunFolder) -> None:
    """Stop a diverged run at the epoch's end (its one sync point): a loss that was not finite, or
    trainable weights that are not finite after the last step (a rate too large).

    Args:
        stats: :func:`train_epoch`'s stats (``bad_step``: the first step whose loss was not finite,
            recorded on the device by :class:`~clipseg_bench.train.tally.StepTally` and read with the
            tally, -1 for none; ``lrs``: each step's rate).
        first_step: the global step number of the epoch's first step (1-based).

    Raises:
        RunFailed: naming the first bad step, its learning rate and what was not finite.
    """
    bad = int(stats["bad_step"])
    what = "the loss is"
    if bad < 0:
        params = [p for p in setup.model.parameters() if p.requires_grad]
        if not params or bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            return
        bad, what = first_step + len(stats["lrs"]) - 1, "the weights are"
    lr = stats["lrs"][bad - first_step] if 0 <= bad - first_step < len(stats["lrs"]) else float("nan")
    raise RunFailed(
        run.path,
        f"training diverged: {what} not finite at step {bad} (learning rate {lr:.3g}); "
        "the run is marked failed: train it again with a lower --lr",
    )


def _val_dice(setup: TrainingSetup) -> float:
    """The Dice on the validation sample (``setup.val_rows``); every process scores its shard."""
    return validation_dice(
        setup.segmenter,
        setup.data,
        setup.val_rows,
        organ_ids=setup.organ_ids,
        features=setup.val_features,
        threshold=setup.cfg.threshold,
        channels=setup.cfg.input_channels,
        windows=setup.preprocessing.windows,
        accelerator=setup.accelerator,
    )


def _train_check_dice(setup: TrainingSetup) -> float:
    """The final Dice on the training slices (the same sample rule and cap as validation; sharded)."""
    return validation_dice(
        setup.segmenter,
        setup.data,
        setup.train_rows.iloc[setup.train_check],
        organ_ids=setup.organ_ids,
        features=setup.features,
        feature_index=setup.train_check,
        threshold=setup.cfg.threshold,
        channels=setup.cfg.input_channels,
        windows=setup.preprocessing.windows,
        accelerator=setup.accelerator,
    )


def _validates_after(setup: TrainingSetup, epoch: int) -> bool:
    """Whether to validate after ``epoch`` (0-based): every ``val_every`` epochs and after the last,
    never without val slices."""
    every = setup.cfg.val_every
    last = epoch + 1 == setup.n_epochs
    return setup.has_val and bool(every) and ((epoch + 1) % every == 0 or last)


def initial_state(setup: TrainingSetup) -> LoopState:
    """The loop's bookkeeping before the first epoch (what a resume checkpoint stores)."""
    return LoopState(
        breakdown_s=dict(setup.timer.totals),
        host_s=dict(setup.timer.host),
        num_processes=setup.accelerator.num_processes,
    )


def restore(setup: TrainingSetup, run: RunFolder) -> LoopState:
    """The state to continue from: the run's last epoch-end checkpoint if any, else a fresh one."""
    if not run.checkpoint_dir.is_dir():
        return initial_state(setup)
    state = load_resume_state(
        run.checkpoint_dir, model=setup.model, optimizer=setup.optimizer, scheduler=setup.scheduler
    )
    written_by = state.num_processes or setup.accelerator.num_processes
    if written_by != setup.accelerator.num_processes:
        raise InputError(
            run.path,
            f"the checkpoint was written by {written_by} process(es), this run has "
            f"{setup.accelerator.num_processes}; resume with the same number",
        )
    state.num_processes = written_by
    setup.timer.totals.update(state.breakdown_s)
    setup.timer.host.update(state.host_s)
    if setup.accelerator.is_main_process:
        print(f"resuming {run.path} after epoch {state.epoch} (step {state.global_step})")
    return state


def _end_epoch(setup: TrainingSetup, state: LoopState, row: dict, run: RunFolder, writer) -> None:
    """Write the epoch's history row, TensorBoard scalars and the resume checkpoint (main process)."""
    for k in ("loss", "train_dice", "val_dice"):
        writer.add_scalar(k, row[k], row["epoch"])
    run.write_history(state.history)
    save_resume_state(
        run.checkpoint_dir,
        model=setup.accelerator.unwrap_model(setup.module).model,
        optimizer=setup.optimizer,
        scheduler=setup.scheduler,
        state=state,
    )


def _run_epoch(setup: TrainingSetup, state: LoopState, epoch: int, *, pbar, writer, run: RunFolder) -> None:
    """Train one epoch, validate, and record it in ``state`` (and, on the main process, on disk)."""
    acc, timer = setup.accelerator, setup.timer
    main = acc.is_main_process
    setup.sampler.set_epoch(epoch)
    if hasattr(setup.loader, "set_epoch"):  # Accelerate's loader would reset our sampler to its own counter
        setup.loader.set_epoch(epoch)
    t0, cpu0 = time.perf_counter(), time.process_time()
    global_step, stats = train_epoch(setup, epoch, state.global_step, pbar)
    epoch_time = time.perf_counter() - t0
    state.train_cpu_s += time.process_time() - cpu0
    state.step_times_s.extend(stats["step_times"])
    check_finite(setup, stats, state.global_step + 1, run)  # before its checkpoint replaces the last good one
    val_dice = float("nan")
    if _validates_after(setup, epoch):  # every process: each scores its shard
        with timer.phase("eval"):
            val_dice = _val_dice(setup)
        timer.collect()
    row = {
        "epoch": epoch + 1,
        "step": global_step,
        "loss": stats["loss"],
        "train_dice": stats["train_dice"],
        "val_dice": val_dice,
        "epoch_time_s": epoch_time,
        "lr": setup.scheduler.get_last_lr()[0],
    }
    state.epoch = epoch + 1
    state.global_step = global_step
    state.train_time_s += epoch_time
    state.masks += stats["masks"]
    state.breakdown_s = dict(timer.totals)
    state.host_s = dict(timer.host)
    state.history.append(row)
    if main:
        _end_epoch(setup, state, row, run, writer)
    acc.wait_for_everyone()


def fit(setup: TrainingSetup, state: LoopState, *, run: RunFolder) -> LoopState:
    """Train epoch by epoch from ``state``, validating and checkpointing at every epoch end.

    Returns:
        The final state (:class:`~clipseg_bench.train.resume.LoopState`).
    """
    cfg, main = setup.cfg, setup.accelerator.is_main_process
    writer = None
    if main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run.tensorboard_dir))
    pbar = tqdm(
        total=setup.total_steps,
        initial=state.global_step,
        desc=f"train {cfg.strategy}",
        unit="step",
        disable=not main or not setup.trains,
        dynamic_ncols=True,
    )
    try:
        for epoch in range(state.epoch, setup.n_epochs if setup.trains else 0):
            _run_epoch(setup, state, epoch, pbar=pbar, writer=writer, run=run)
    finally:  # also on an error, so its message starts on a line of its own
        pbar.close()
        if writer is not None:
            writer.close()
    return state


def finish(setup: TrainingSetup, state: LoopState, *, run: RunFolder, record: RunRecord) -> None:
    """Final train/val Dice, the trained weights and the finished run.json (main process writes)."""
    acc, cfg = setup.accelerator, setup.cfg
    checksums = _rank_checksums(acc, setup.model)
    with setup.timer.phase("eval"):  # every process scores its shard
        final = {
            "train_dice": _train_check_dice(setup),
            # None (JSON null), not NaN, when the data has no val case: there is nothing to score
            "val_dice": _val_dice(setup) if setup.has_val else None,
        }
    setup.timer.collect()
    if acc.is_main_process:
        if not state.history:
            run.write_history([])
        save_weights(setup.model, run.weights_path, config=cfg.model_dump(mode="json"))
        timing = timing_record(setup, state)
        run.write_record(
            record.with_status(
                RunStatus.FINISHED,
                timing=timing,
                final=final,
                gradient_audit=setup.audit.record(),
                rank_checksums=checksums,
            )
        )
        val = "no val split" if final["val_dice"] is None else f"val dice {final['val_dice']:.4f}"
        print(
            f"trained {cfg.strategy}: train dice {final['train_dice']:.4f}, {val}, "
            f"{timing['train_time_s']:.1f} s -> {run.path}"
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


def train(cfg: TrainConfig, *, resume: bool = False, sync_hooks=()) -> Path:
    """Train one strategy; writes the run folder described in docs/architecture.md. Returns it.

    The run folder is locked while the run writes it (:func:`~clipseg_bench.provenance.output_lock`):
    a second `train` into it is refused, naming this process.

    Args:
        sync_hooks: callables given each :class:`~clipseg_bench.train.tally.Reading` at the loop's sync
            points (every ``log_every`` steps and each epoch end), added to the setup's own
            (e.g. a profiler window in ``benchmarks/gpu_check.py``).

    Raises:
        InputError: a bad config, data, model or run folder (nothing written).
        RunFailed: the run failed (diverged, out of memory or disk space, gradient audit); run.json
            says ``failed`` with the reason.
    """
    from accelerate.utils import set_seed

    cfg = resolved(cfg)  # config.yaml records the rate the run uses, not null
    cfg = cfg.model_copy(update={"data": str(Path(cfg.data).resolve())})  # and where the data is
    run = RunFolder(cfg.out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    acc = make_accelerator(cfg)
    main = acc.is_main_process
    if main:
        record.check_run_folder(run.path, resume, cfg)
    with output_lock(run.path, record.LOCK) if main else contextlib.nullcontext():
        if main:  # again inside the lock: a `train` that ended meanwhile may have filled the folder
            record.check_run_folder(run.path, resume, cfg)
        acc.wait_for_everyone()
        set_seed(cfg.seed)
        _train(cfg, acc, run, resume, sync_hooks)
    return run.path


def _train(cfg: TrainConfig, acc, run: RunFolder, resume: bool, sync_hooks=()) -> None:
    """The run itself, in its locked folder: build, restore, record the start, fit, finish."""
    main = acc.is_main_process
    # Everything that can refuse (data, model, strategy, checkpoint) runs before the first write.
    setup = build_training(cfg, acc)
    setup.sync_hooks.extend(sync_hooks)
    state = restore(setup, run) if resume else initial_state(setup)
    start = record.start_record(setup) if main else RunRecord()  # only the main process writes it
    if main:
        record.write_start(setup, run, start)
    release_frozen_vision(setup)

    def _interrupted(signum, frame):  # SIGTERM (e.g. SLURM preemption) -> marked interrupted, resumable
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, _interrupted) if main else None
    try:
        state = fit(setup, state, run=run)
        setup.audit.check_frozen(setup.model)
    except KeyboardInterrupt:
        if main:
            record.mark(run, start, RunStatus.INTERRUPTED, gradient_audit=setup.audit.record())
        raise
    except Exception as exc:
        failure = run_failure(exc)
        if main:
            why = failure.message if failure is not None else repr(exc)
            record.mark(run, start, RunStatus.FAILED, error=why, gradient_audit=setup.audit.record())
        if failure is None or failure is exc:
            raise
        raise failure from None
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    finish(setup, state, run=run, record=start)


def run_failure(exc: BaseException) -> ReportedError | None:
    """The one-line error a failed run reports: its own (a full disk, a divergence, the gradient
    audit), or running out of memory; None for anything else (a bug keeps its traceback)."""
    if isinstance(exc, ReportedError):
        return exc
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
    if isinstance(exc, MemoryError | torch.OutOfMemoryError) or "can't allocate memory" in text:
        return RunFailed(None, f"out of memory ({text[:160]}); lower --batch-size or --image-size")
    return None
