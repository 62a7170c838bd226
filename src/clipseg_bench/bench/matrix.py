"""`clipseg-bench benchmark`: the strategy x seed (x training cases) matrix, one run folder per cell.

Each cell trains and evaluates in its own subprocess, so a crash stays in its cell, peak memory is
measured per run, and `--launcher "accelerate launch --num_processes 4"` can give every run several
GPUs. Finished cells are skipped on the next call; unfinished ones are resumed from their last
checkpoint. `--shard i/n` takes every n-th cell starting at i (0-based), so n machines (a SLURM
array) split the matrix deterministically and `report` merges their folders.

`--train-cases 1,5,all` adds the data-efficiency axis: every strategy x seed also trains on nested
subsets of the training cases (TrainConfig.train_cases); its runs are named
``<strategy>-s<seed>-n<cases>``, while the full training set keeps the plain ``<strategy>-s<seed>``.
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


ALL_CASES = "all"


def parse_train_cases(spec: str | None, n_train: int) -> list[int | None]:
    """ "1,5,all" or "0.25,0.5,1.0" -> training-case counts, None for the whole train split.

    Args:
        spec: comma-separated counts (integers), fractions of the train split (numbers with a
            decimal point, in (0, 1]; rounded, at least 1 case) or ``all``; None means ``all``.
        n_train: the number of cases in the train split.

    Returns:
        Distinct counts in increasing order, None (all cases) last; a count equal to the whole split
        is None, so it names and trains the same run as ``all``.

    Raises:
        InputError: an entry that is none of these, or a count above the split's size.
    """
    out: list[int | None] = []
    for item in (spec or ALL_CASES).split(","):
        item = item.strip().lower()
        try:
            if item == ALL_CASES:
                count = n_train
            elif item.isdigit():
                count = int(item)
            else:
                fraction = float(item)
                if not 0 < fraction <= 1:
                    raise ValueError
                count = max(1, round(fraction * n_train))
        except ValueError:
            raise InputError(
                "--train-cases",
                f"expected counts, fractions in (0, 1] or 'all', such as 1,5,all; got {item!r}",
            ) from None
        if not 1 <= count <= n_train:
            raise InputError(
                "--train-cases", f"{item} training cases asked for; the train split has {n_train}"
            )
        out.append(None if count == n_train else count)
    counts = sorted({c for c in out if c is not None})
    return counts + ([None] if None in out else [])


def run_name(strategy: str, seed: int, train_cases: int | None = None) -> str:
    """``<strategy>-s<seed>``, with ``-n<cases>`` for a run on a subset of the training cases."""
    return f"{strategy}-s{seed}" + ("" if train_cases is None else f"-n{train_cases}")


def cells(
    strategies: list[str],
    seeds: list[int],
    shard: str | None = None,
    train_cases: list[int | None] | None = None,
) -> list[tuple[str, int, int | None]]:
    """The matrix in a fixed order (strategy-major, then training cases, then seed), restricted to one shard.

    Args:
        train_cases: from :func:`parse_train_cases`; default: all training cases only.

    Returns:
        (strategy, seed, training-case count or None for all) per cell.
    """
    i, n = parse_shard(shard)
    unknown = [s for s in strategies if s not in available()]
    if unknown:
        raise InputError("--strategies", f"unknown strategies {unknown}; available: {', '.join(available())}")
    every = [(s, seed, k) for s in strategies for k in (train_cases or [None]) for seed in seeds]
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
    train_cases: str | None = None,
) -> list[dict]:
    """Train (and evaluate) every cell of this shard; returns one status dict per cell.

    Args:
        config: YAML of TrainConfig fields shared by every run; the matrix's own fields win.
        strategy_lr: learning rate per strategy (unlisted strategies use configs/strategies.yaml).
        launcher: command that runs Python for training, e.g. "accelerate launch --num_processes 4".
        extra: more TrainConfig fields shared by every run.
        train_cases: the data-efficiency axis, e.g. "1,5,all" (see :func:`parse_train_cases`);
            None trains every run on all training cases.
    """
    out = Path(out)
    counts = [None] if train_cases is None else parse_train_cases(train_cases, _n_train_cases(data))
    todo = cells(strategies, seeds, shard, counts)
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
            "train_cases": [ALL_CASES if c is None else c for c in counts],
            "git": git_info(),
            "hardware": hardware_info(),
        },
    )
    base = [sys.executable, "-m", "clipseg_bench.cli"]
    train_cmd = shlex.split(launcher) + ["-m", "clipseg_bench.cli"] if launcher else base
    results = []
    for strategy, seed, n_cases in todo:
        run = out / "runs" / run_name(strategy, seed, n_cases)
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
                "train_cases": n_cases,
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


def _n_train_cases(data) -> int:
    from clipseg_bench.data.dataset import PreparedData

    n = len(PreparedData(data).cases("train"))
    if n == 0:
        raise InputError(data, "the train split has no cases")
    return n


def _mark_failed(run: Path, why: str) -> None:
    info = run / "run.json"
    doc = json.loads(info.read_text()) if info.is_file() else {}
    if doc.get("status") in (None, "running"):
        doc.update(status="failed", error=why)
        write_json_atomic(info, doc)
