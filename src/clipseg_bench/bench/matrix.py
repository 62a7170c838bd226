"""`clipseg-bench benchmark`: the strategy x seed matrix, one run folder per cell.

Each cell trains and evaluates in its own subprocess, so a crash stays in its cell, peak memory is
measured per run, and `--launcher "accelerate launch --num_processes 4"` can give every run several
GPUs. Finished cells are skipped on the next call; unfinished ones are resumed from their last
checkpoint. `--shard i/n` takes every n-th cell starting at i (0-based), so n machines (a SLURM
array) split the matrix deterministically and `report` merges their folders.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from clipseg_bench.config import load_config, save_config
from clipseg_bench.errors import InputError
from clipseg_bench.provenance import git_info, hardware_info, write_json_atomic
from clipseg_bench.strategies import available


def parse_shard(spec: str | None) -> tuple[int, int]:
    """ "i/n" -> (i, n) with 0 <= i < n; None -> (0, 1)."""
    if not spec:
        return 0, 1
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise InputError("--shard", f"expected i/n such as 0/4, got {spec!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise InputError("--shard", f"need 0 <= i < n, got {spec!r}")
    return i, n


def cells(strategies: list[str], seeds: list[int], shard: str | None = None) -> list[tuple[str, int]]:
    """The matrix in a fixed order (strategy-major), restricted to one shard."""
    i, n = parse_shard(shard)
    unknown = [s for s in strategies if s not in available()]
    if unknown:
        raise InputError("--strategies", f"unknown strategies {unknown}; available: {', '.join(available())}")
    every = [(s, seed) for s in strategies for seed in seeds]
    return every[i::n]


def run_status(run: Path) -> str:
    """'missing' | 'finished' | 'evaluated' | a run.json status ('running', 'failed', 'interrupted')."""
    info = run / "run.json"
    if not info.is_file():
        return "missing"
    status = json.loads(info.read_text()).get("status", "unknown")
    if status == "finished" and (run / "metrics.json").is_file():
        return "evaluated"
    return status


def _call(cmd: list[str], log: Path) -> int:
    """Run one stage, streaming its output to the console and to the run's log."""
    with open(log, "a") as fh:
        fh.write(f"$ {shlex.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in proc.stdout:
            sys.stdout.write(line)
            fh.write(line)
        return proc.wait()


def run_matrix(
    *,
    data,
    model: str,
    strategies: list[str],
    seeds: list[int],
    epochs: int,
    out: Path,
    shard: str | None = None,
    config: str | None = None,
    max_steps: int | None = None,
    batch_size: int | None = None,
    evaluate: bool = True,
    launcher: str | None = None,
    extra: dict | None = None,
    strategy_lr: dict[str, float] | None = None,
) -> list[dict]:
    """Train (and evaluate) every cell of this shard; returns one status dict per cell.

    Args:
        config: YAML of TrainConfig fields shared by every run; the matrix's own fields win.
        strategy_lr: learning rate per strategy (unlisted strategies use configs/strategies.yaml).
        launcher: command that runs Python for training, e.g. "accelerate launch --num_processes 4".
        extra: more TrainConfig fields shared by every run.
    """
    out = Path(out)
    todo = cells(strategies, seeds, shard)
    out.mkdir(parents=True, exist_ok=True)
    (out / "runs").mkdir(exist_ok=True)
    write_json_atomic(
        out / f"bench-shard{parse_shard(shard)[0]}.json",
        {
            "strategies": strategies,
            "seeds": seeds,
            "shard": shard or "0/1",
            "model": model,
            "data": str(data),
            "epochs": epochs,
            "git": git_info(),
            "hardware": hardware_info(),
        },
    )
    base = [sys.executable, "-m", "clipseg_bench.cli"]
    train_cmd = shlex.split(launcher) + ["-m", "clipseg_bench.cli"] if launcher else base
    results = []
    for strategy, seed in todo:
        run = out / "runs" / f"{strategy}-s{seed}"
        status = run_status(run)
        if status == "evaluated" or (status == "finished" and not evaluate):
            print(f"[benchmark] {run.name}: done, skipped")
            results.append({"run": str(run), "status": "skipped"})
            continue
        if status != "finished":
            resume = status != "missing"
            if not resume and run.exists():
                shutil.rmtree(run)  # a folder without run.json never started training
            (out / "configs").mkdir(exist_ok=True)
            (out / "logs").mkdir(exist_ok=True)
            cfg_path = out / "configs" / f"{run.name}.yaml"
            overrides = {
                **(extra or {}),
                "data": str(data),
                "model": model,
                "strategy": strategy,
                "seed": seed,
                "epochs": epochs,
                "out": str(run),
                "max_steps": max_steps,
                "batch_size": batch_size,
                "lr": (strategy_lr or {}).get(strategy),
            }
            cfg = load_config(config, overrides)
            save_config(cfg, cfg_path)
            print(f"[benchmark] {run.name}: {'resuming' if resume else 'training'}")
            # Train and evaluate in one process: a second Python + torch start-up per run is waste.
            flags = (["--resume"] if resume else []) + (["--evaluate"] if evaluate else [])
            rc = _call(
                train_cmd + ["train", "--config", str(cfg_path), *flags], out / "logs" / f"{run.name}.log"
            )
            if rc != 0:
                _mark_failed(run, f"train exited with {rc}")
                results.append({"run": str(run), "status": "failed"})
                continue
        if evaluate and run_status(run) != "evaluated":
            rc = _call(base + ["evaluate", "--run", str(run)], out / "logs" / f"{run.name}.log")
            if rc != 0:
                results.append({"run": str(run), "status": "failed"})
                continue
        results.append({"run": str(run), "status": "done"})
    failed = [r["run"] for r in results if r["status"] == "failed"]
    print(
        f"[benchmark] {len(results) - len(failed)}/{len(results)} runs done in {out}"
        + (f"; failed: {', '.join(failed)} (re-run the same command to retry)" if failed else "")
    )
    return results


def _mark_failed(run: Path, why: str) -> None:
    info = run / "run.json"
    doc = json.loads(info.read_text()) if info.is_file() else {}
    if doc.get("status") in (None, "running"):
        doc.update(status="failed", error=why)
        write_json_atomic(info, doc)
