"""The run folder's write-up: where it may be written, and what ``run.json`` says at start and end."""

from __future__ import annotations

from pathlib import Path

from clipseg_bench.config import resolve_lr, save_config
from clipseg_bench.errors import InputError
from clipseg_bench.provenance import git_info, hardware_info, peak_memory_mb, write_json_atomic


def open_run_folder(out: Path, resume: bool) -> None:
    """Check that ``out`` may be written (empty or new; an existing run with ``resume``) and create it."""
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


def start_record(setup) -> dict:
    """run.json's contents while the run is running: what ran, where, with how many parameters."""
    cfg = setup.cfg
    return {
        "status": "running",
        "strategy": cfg.strategy,
        "seed": cfg.seed,
        "model": cfg.model,
        "git": git_info(),
        "hardware": hardware_info(setup.accelerator.num_processes),
        "params": {"trainable": setup.counts.trainable, "total": setup.counts.total},
        "lr": resolve_lr(cfg),
        "window": setup.data.window,  # segment needs it to preprocess a new CT like the training data
        "cases": {split: len(setup.data.cases(split)) for split in ("train", "val")},
        "validation": setup.validation_record(),
        # where the vision activations come from: the feature cache in its dtype, or computed live
        "vision_features": {
            "train": f"cache {setup.cfg.feature_cache_dtype}" if setup.features is not None else "live",
            "val": f"cache {setup.cfg.feature_cache_dtype}" if setup.val_features is not None else "live",
        },
        **channels_record(setup),
        "train_case_ids": setup.train_cases,  # the cases trained on (a subset with `train_cases`)
    }


def channels_record(setup) -> dict:
    """run.json's input channels: the mode, the HU windows of ``windows`` (segment reads them),
    and for ``neighbors`` how far apart neighbouring training slices were (min/median/max, mm)."""
    from clipseg_bench.data.channels import WINDOWS

    mode = setup.cfg.input_channels
    doc: dict = {"input_channels": mode}
    if mode == "windows":
        doc["channel_windows"] = list(WINDOWS)
    if mode == "neighbors":
        dz = setup.data.manifest["spacing_z"].astype(float)
        doc["neighbor_spacing_mm"] = [float(dz.min()), float(dz.median()), float(dz.max())]
    return doc


def write_start(setup, out: Path, record: dict) -> None:
    """config.yaml and the running run.json (main process only)."""
    save_config(setup.cfg, out / "config.yaml")
    write_json_atomic(out / "run.json", record)


def mark(out: Path, record: dict, status: str, **extra) -> None:
    """Rewrite run.json with another status (``interrupted``, ``failed``) and extra fields."""
    write_json_atomic(out / "run.json", {**record, "status": status, **extra})


def timing_record(setup, state: dict) -> dict:
    """run.json's ``timing``: wall time, throughput, the feature cache, the breakdown, peak memory."""
    peak, kind = peak_memory_mb(setup.accelerator.device)
    epochs_done = max(len(state["history"]), 1)
    return {
        "train_time_s": state["train_time_s"],
        "s_per_epoch": state["train_time_s"] / epochs_done if state["history"] else 0.0,
        "epochs": len(state["history"]),
        "steps": state["global_step"],
        "masks_per_s": state["masks"] / state["train_time_s"] if state["train_time_s"] else 0.0,
        **setup.cache_summary(),
        "breakdown_s": dict(setup.timer.totals),
        "peak_mem_mb": peak,
        "peak_mem_kind": kind,
    }
