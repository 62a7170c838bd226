"""The peak-memory probe: decoder-only training on cached features (and gradient checkpointing on
``full``) in a process of its own (``throughput.py --probe``), so nothing else counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from clipseg_bench.provenance import peak_rss_mb, reset_peak_rss, rss_mb

from .common import build_arch, row, time_once
from .engine import EngineRun
from .plans import Plan

SCRIPT = Path(__file__).resolve().parents[1] / "throughput.py"  # what the probe process runs


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
    out["decoder_step_s"] = min(time_once(run.step) for _ in range(steps))
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
        t = time_once(run.step)
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
        str(SCRIPT),
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
