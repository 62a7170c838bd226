"""The run folder's write-up: where it may be written, what ``run.json`` says at start and end, and
which config a resumed run continues with. Files are named and written by
:mod:`clipseg_bench.run_folder`; this module decides what training records in them."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from clipseg_bench.config import (
    TrainConfig,
    config_differences,
    load_config,
    read_yaml_config,
)
from clipseg_bench.errors import FieldError, InputError, ReportedError
from clipseg_bench.provenance import (
    check_output_folder,
    check_unlocked,
    git_info,
    hardware_info,
    has_entries,
    peak_memory_mb,
    process_record,
)
from clipseg_bench.run_folder import TRAIN_LOCK, RunFolder, RunRecord, RunStatus
from clipseg_bench.train.setup import group_record

LOCK = TRAIN_LOCK  # the command whose lock a run folder takes (provenance.output_lock)


def check_run_folder(out: Path, resume: bool, cfg: TrainConfig | None = None) -> None:
    """Check, writing nothing, that ``out`` may be written.

    No other `train` may be writing it (its lock, :func:`~clipseg_bench.provenance.output_lock`).
    Without ``resume`` it must be new or empty (and not one of the run's inputs); with ``resume`` it
    must hold an unfinished run whose saved config ``cfg`` agrees with (see :func:`resume_config`).

    Raises:
        InputError: naming ``out`` (or the file in it) and what stands in the way.
    """
    out = Path(out)
    run = RunFolder(out)
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a folder; --out takes a run folder")
    if out.is_dir():
        check_unlocked(out, LOCK)
    if resume:
        if not run.has_record():
            raise InputError(out, "nothing to resume (no run.json); start without --resume")
        if run.record().status == RunStatus.FINISHED:
            raise InputError(
                out, "the run has finished: nothing to resume (evaluate it, or train into another --out)"
            )
        if cfg is not None:
            _refuse_changes(
                saved_config(out), cfg, set(TrainConfig.model_fields), given=set(), default="config"
            )
        return
    if out.is_dir() and has_entries(out):
        raise InputError(out, "run folder is not empty; pass --resume to continue it or choose another --out")
    inputs = [Path(cfg.data)] if cfg is not None and cfg.data else []
    check_output_folder(out, command="train", ours=lambda _: False, inputs=inputs)


def saved_config(out: Path) -> TrainConfig:
    """The config a run folder was trained with (its config.yaml), validated."""
    return RunFolder(out).config()


def resume_config(
    out: Path,
    *,
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> TrainConfig:
    """The config to continue the run in ``out`` with: the run's own config.yaml.

    Values given again (flags, ``--config``) must agree with it: a resumed run continues exactly
    what was started. Only :data:`~clipseg_bench.config.RUNTIME_FIELDS` may change.

    Raises:
        FieldError: naming the field given again whose value contradicts the saved config.
        InputError: naming the file whose value does.
    """
    if not RunFolder(out).has_config():
        raise InputError(out, "nothing to resume (no config.yaml); start without --resume")
    saved = saved_config(out)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    cfg = load_config(path, {**given, "out": str(out)}, base=saved.model_dump())
    from_file = read_yaml_config(path) if path is not None else {}
    _refuse_changes(saved, cfg, set(from_file) | set(given), given=set(given), default=str(path or "config"))
    return cfg


def _refuse_changes(
    saved: TrainConfig, cfg: TrainConfig, fields: set[str], *, given: set[str], default: str
) -> None:
    """Refuse the first of ``fields`` where ``cfg`` would train differently from ``saved``, naming
    where that value came from: the field when it was ``given`` (the CLI names its flag), else ``default``."""
    diffs = config_differences(saved, cfg, fields)
    if diffs:
        field, old, new = diffs[0]
        problem = (
            f"{field} {new!r} contradicts the run's config.yaml ({field}: {old!r}): --resume "
            f"continues the run as it was started (leave it out, or train a new run into another --out)"
        )
        raise FieldError(field, problem) if field in given else InputError(default, problem)


def start_record(setup) -> RunRecord:
    """run.json's contents while the run is running: what ran, where, with how many parameters."""
    cfg = setup.cfg
    return RunRecord(
        status=RunStatus.RUNNING,
        strategy=cfg.strategy,
        seed=cfg.seed,
        model=cfg.model,
        model_family=setup.loaded.family.name,
        git=git_info(),
        hardware=hardware_info(setup.accelerator.num_processes),
        params={"trainable": setup.counts.trainable, "total": setup.counts.total},
        lr=cfg.lr,
        param_groups=group_record(setup.optimizer),  # the rate each group trains at, from the optimizer
        preprocessing=setup.preprocessing,  # segment and evaluate rebuild the inputs from it
        fold=cfg.fold,  # None: the folder's train/val split
        folds=setup.data.n_folds if cfg.fold is not None else None,  # how many folds the data has
        compute=setup.compute_record(),  # autocast, TF32, attention kernel, pair chunk in use
        cases=case_counts(setup.data, cfg.fold, cfg.tune_cases),
        validation=setup.validation_record(),
        # where the vision activations come from: the feature cache in its dtype, or computed live
        vision_features={
            "train": f"cache {cfg.feature_cache_dtype}" if setup.features is not None else "live",
            "val": f"cache {cfg.feature_cache_dtype}" if setup.val_features is not None else "live",
        },
        train_case_ids=setup.train_cases,  # the cases trained on (a subset with `train_cases`)
        data=data_record(setup.data, Path(cfg.out)),  # how evaluate finds it again, wherever it moved
        val_case_ids=setup.val_cases,  # the cases validation and `evaluate` score (the fold's)
        process=process_record(),  # lets `report` tell a killed run from a running one
    )


def data_record(data, out: Path) -> dict:
    """run.json's ``data``: the PREPARED folder resolved, the same relative to the run folder, and
    its fingerprint (:meth:`~clipseg_bench.run_folder.RunFolder.prepared` reads them)."""
    path = data.root.resolve()
    return {
        "path": str(path),
        "relative": os.path.relpath(path, out.resolve()),
        "fingerprint": data.fingerprint,
    }


def case_counts(data, fold: int | None, tune_cases: list[str] | None = None) -> dict[str, int]:
    """run.json's ``cases``: how many cases the train and val split (of ``fold``) hold, and how many
    the folder holds out as test (only when it has any; their arrays are never opened); a sweep run
    also counts its ``tune`` cases (taken out of ``train``)."""
    counts = {split: len(data.cases(split, fold)) for split in ("train", "val")}
    if tune_cases:
        counts = {**counts, "train": counts["train"] - len(tune_cases), "tune": len(tune_cases)}
    held_out = len(data.held_out)
    return {**counts, "test": held_out} if held_out else counts


def write_start(setup, run: RunFolder, record: RunRecord) -> None:
    """Create the run folder; config.yaml and the running run.json (main process only)."""
    run.create()
    run.write_config(setup.cfg)
    run.write_record(record)


def mark(run: RunFolder, record: RunRecord, status: RunStatus, **changes) -> None:
    """Rewrite run.json with another status (``interrupted``, ``failed``) and changed fields.

    Best effort: it runs while another error is on its way out (a full disk, say), and that error
    is the one to report; run.json then keeps ``running``, which `report` shows as killed.
    """
    try:
        run.write_record(record.with_status(status, **changes))
    except ReportedError:
        pass


def steady_step_time(setup, step_times: list[float]) -> float | None:
    """The steady-state time of one optimizer step: the median over the steps after the learning-rate
    warm-up (and after the first step, which pays one-off allocations); None without such steps."""
    from clipseg_bench.train.setup import warmup_steps

    skip = max(1, warmup_steps(setup.cfg, setup.total_steps))
    steady = step_times[skip:]
    return float(np.median(steady)) if steady else None


def timing_record(setup, state) -> dict:
    """run.json's ``timing``: wall time, throughput, the feature cache, the breakdown, peak memory.

    Args:
        state: the loop's final :class:`~clipseg_bench.train.resume.LoopState`.
    """
    peak, kind = peak_memory_mb(setup.accelerator.device)
    epochs_done = max(len(state.history), 1)
    return {
        "train_time_s": state.train_time_s,
        "train_cpu_s": state.train_cpu_s,  # beside the wall time: robust to a busy machine
        "step_time_s": steady_step_time(setup, state.step_times_s),
        "s_per_epoch": state.train_time_s / epochs_done if state.history else 0.0,
        "epochs": len(state.history),
        "steps": state.global_step,
        "masks_per_s": state.masks / state.train_time_s if state.train_time_s else 0.0,
        **setup.cache_summary(),
        "breakdown_s": dict(setup.timer.totals),
        "clock": setup.timer.clock,  # how breakdown_s was measured (CUDA events: the device timeline)
        "host_s": dict(setup.timer.host),  # the host's own time per phase, and blocked on the device
        "peak_mem_mb": peak,
        "peak_mem_kind": kind,
    }
