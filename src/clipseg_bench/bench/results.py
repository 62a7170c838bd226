"""Load BENCH run folders, merge shards, and turn them into tables (one row per run, mean ± std).

A BENCH folder holds ``runs/<strategy>-s<seed>/`` with the files ``train`` and ``evaluate`` write
(see docs/architecture.md): ``run.json``, ``config.yaml``, ``history.csv``, ``metrics.json`` and
``samples.npz``. Several BENCH folders are shards of one benchmark; their runs are unioned here.
Everything in this module is pure data handling: no plotting, no HTML.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from clipseg_bench.errors import InputError
from clipseg_bench.organs import ORGANS
from clipseg_bench.provenance import process_alive, read_json_object

FINISHED = "finished"
# A run whose run.json says "running" but whose process is gone (SIGKILL, the OOM killer, a reboot):
# train records its pid, host, boot id and start time, and this machine checks them. A run written
# on another host cannot be checked from here and stays "running".
KILLED = "killed"
# A cell the benchmark's record (bench-shard<i>.json) lists but that has no run folder.
NOT_STARTED = "not started"
# Strategies appear in this order in every table and plot; unknown ones follow alphabetically.
STRATEGY_ORDER = ("zeroshot", "full", "decoder", "adapter", "lora", "bitfit")
# The trainer's timing breakdown keys, in the order the time flows through a step.
BREAKDOWN_ORDER = ("data", "forward", "backward", "optimizer", "eval")
# When the same (strategy, seed) appears in two shards, keep the most complete one.
_STATUS_RANK = {FINISHED: 0, "interrupted": 1, "running": 2, KILLED: 2, "failed": 3, NOT_STARTED: 10}

# results.csv columns that the aggregate tables average over seeds.
METRICS = (
    "trainable_params",
    "total_params",
    "train_dice",
    "val_dice",
    "val_dsc3d",
    "val_nsd3d",
    "train_time_s",
    "s_per_epoch",
    "peak_mem_mb",
    "masks_per_s",
    "cache_build_s",
)


@dataclass(frozen=True)
class Run:
    """One run folder as read from disk.

    Attributes:
        bench: the BENCH folder the run was found in.
        path: the run folder itself.
        info: ``run.json`` as a dict.
        config: ``config.yaml`` as a dict (empty when the file is missing).
        metrics: ``metrics.json`` as a dict, or None when evaluate has not run.
        history: ``history.csv`` (one row per epoch), or None when absent or empty.
    """

    bench: Path
    path: Path
    strategy: str
    seed: int
    status: str
    info: dict
    config: dict
    metrics: dict | None
    history: pd.DataFrame | None

    @property
    def finished(self) -> bool:
        return self.status == FINISHED

    @property
    def samples(self) -> Path | None:
        """``samples.npz`` (CT slices, ground truth, prediction) when evaluate wrote it."""
        p = self.path / "samples.npz"
        return p if p.is_file() else None


def strategy_order(names: list[str] | set[str]) -> list[str]:
    """Sort strategy names: the study's six in their fixed order, then any others alphabetically."""
    known = [s for s in STRATEGY_ORDER if s in names]
    return known + sorted(set(names) - set(STRATEGY_ORDER))


def _read_history(path: Path) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    try:
        df = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return None
    except (ValueError, OSError, UnicodeDecodeError) as exc:  # pandas' ParserError is a ValueError
        raise InputError(path, f"not a readable CSV ({str(exc).splitlines()[0]})") from None
    return df if len(df) else None


def load_run(path: Path, bench: Path) -> Run:
    """Read one run folder. The folder name ``<strategy>-s<seed>`` is used when run.json lacks them.

    A folder without ``run.json`` (a run that never started writing) is kept with status ``missing``
    so that the report can list it.
    """
    info = read_json_object(path / "run.json") if (path / "run.json").is_file() else {"status": "missing"}
    name_strategy, _, name_seed = path.name.rpartition("-s")
    strategy = info.get("strategy") or name_strategy
    seed = info.get("seed", name_seed)
    try:
        seed = int(seed)
    except (TypeError, ValueError):
        raise InputError(
            path, "no integer seed in run.json and the folder is not named <strategy>-s<seed>"
        ) from None
    if not strategy:
        raise InputError(path, "no strategy in run.json and the folder is not named <strategy>-s<seed>")
    cfg_path = path / "config.yaml"
    try:
        config = (yaml.safe_load(cfg_path.read_text()) or {}) if cfg_path.is_file() else {}
    except yaml.YAMLError as exc:
        raise InputError(cfg_path, f"not valid YAML ({str(exc).splitlines()[0]})") from None
    metrics_path = path / "metrics.json"
    return Run(
        bench=bench,
        path=path,
        strategy=str(strategy),
        seed=seed,
        status=_status(info),
        info=info,
        config=config if isinstance(config, dict) else {},
        metrics=read_json_object(metrics_path) if metrics_path.is_file() else None,
        history=_read_history(path / "history.csv"),
    )


def is_bench_folder(path: Path) -> bool:
    """Whether ``path`` is a BENCH folder (a ``benchmark`` call recorded itself there)."""
    return any(Path(path).glob("bench-shard*.json"))


def _status(info: dict) -> str:
    """run.json's status, with "running" turned into :data:`KILLED` when its process is gone."""
    status = str(info.get("status", "unknown"))
    if status == "running" and process_alive(info.get("process")) is False:
        return KILLED
    return status


def _not_started(bench: Path, root: Path, present: set[tuple[str, int]]) -> list[Run]:
    """The cells the BENCH folder's records list that have no run folder."""
    runs = []
    for record in sorted(bench.glob("bench-shard*.json")):
        for cell in read_json_object(record).get("cells") or []:
            try:
                strategy, seed = str(cell[0]), int(cell[1])
            except (TypeError, ValueError, IndexError):
                raise InputError(record, f"'cells' entry {cell!r} is not [strategy, seed]") from None
            if (strategy, seed) not in present:
                present.add((strategy, seed))
                path = root / f"{strategy}-s{seed}"
                runs.append(Run(bench, path, strategy, seed, NOT_STARTED, {}, {}, None, None))
    return runs


def find_runs(bench: Path) -> list[Run]:
    """All runs of one BENCH folder: its run folders (``BENCH/runs/*``; BENCH/runs itself is
    accepted too), and, as :data:`NOT_STARTED`, the cells its records list without a folder.

    Raises:
        InputError: the folder is absent or holds no runs.
    """
    bench = Path(bench)
    if not bench.is_dir():
        raise InputError(bench, "BENCH folder not found")
    root = bench / "runs" if (bench / "runs").is_dir() else bench
    dirs = sorted(d for d in root.iterdir() if d.is_dir() and ((d / "run.json").is_file() or "-s" in d.name))
    runs = [load_run(d, bench) for d in dirs]
    runs += _not_started(bench, root, {(r.strategy, r.seed) for r in runs})
    if not runs:
        raise InputError(bench, "no run folders (expected runs/<strategy>-s<seed>/run.json)")
    return runs


def _same_numbers(a: dict, b: dict) -> bool:
    def same(x, y) -> bool:
        if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
            return True
        return x == y

    return all(same(a[k], b[k]) for k in METRICS)


def merge_runs(runs: list[Run]) -> list[Run]:
    """Union of runs from several shards, one per (strategy, seed), in report order.

    A duplicate keeps the more complete status (finished > interrupted > running > failed).

    Raises:
        InputError: the same (strategy, seed) finished in two folders with different numbers.
    """
    chosen: dict[tuple[str, int], Run] = {}
    for run in runs:
        key = (run.strategy, run.seed)
        other = chosen.get(key)
        if other is None:
            chosen[key] = run
            continue
        if run.finished and other.finished:
            if not _same_numbers(run_row(run), run_row(other)):
                raise InputError(
                    run.path,
                    f"{run.strategy} seed {run.seed} finished in both {other.path} and {run.path} "
                    "with different numbers; remove one of them",
                )
            continue
        if _STATUS_RANK.get(run.status, 9) < _STATUS_RANK.get(other.status, 9):
            chosen[key] = run
    order = {s: i for i, s in enumerate(strategy_order({k[0] for k in chosen}))}
    return [chosen[k] for k in sorted(chosen, key=lambda k: (order[k[0]], k[1]))]


def load_bench(bench_dirs: list[Path]) -> list[Run]:
    """Read and merge the runs of one or more BENCH folders (shards). See :func:`merge_runs`."""
    if not bench_dirs:
        raise InputError(None, "no BENCH folder given")
    return merge_runs([r for b in bench_dirs for r in find_runs(Path(b))])


def _num(x) -> float:
    """JSON number or null -> float (NaN for missing), so that pandas averages skip it."""
    try:
        return float(x) if x is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def breakdown_keys(runs: list[Run]) -> list[str]:
    """Timing-breakdown parts present in any run, in step order (unknown parts last)."""
    seen = {k for r in runs for k in (r.info.get("timing", {}).get("breakdown_s") or {})}
    return [k for k in BREAKDOWN_ORDER if k in seen] + sorted(seen - set(BREAKDOWN_ORDER))


def run_row(run: Run, breakdown: list[str] | None = None) -> dict:
    """One results.csv row: the run's numbers, each taken from the file named in the comments.

    Args:
        run: the run.
        breakdown: breakdown parts to give a ``time_<part>_s`` column each (default: this run's own).
    """
    info, timing = run.info, run.info.get("timing") or {}
    final, params = info.get("final") or {}, info.get("params") or {}
    metrics = run.metrics or {}
    summary = metrics.get("summary") or {}
    parts = timing.get("breakdown_s") or {}
    git, hw = info.get("git") or {}, info.get("hardware") or {}
    row = {
        "strategy": run.strategy,
        "seed": run.seed,
        "status": run.status,
        "model": info.get("model", run.config.get("model")),
        "trainable_params": _num(params.get("trainable")),  # run.json params
        "total_params": _num(params.get("total")),
        "train_dice": _num(final.get("train_dice")),  # run.json final
        # evaluate's 2D Dice over the whole val split; the trainer's last val Dice otherwise
        "val_dice": _num(metrics.get("dice2d", final.get("val_dice"))),
        "val_dsc3d": _num(summary.get("dsc")),  # metrics.json summary (FLARE22 3D scores)
        "val_nsd3d": _num(summary.get("nsd")),
        "empty_specificity": _num(metrics.get("empty_specificity")),
        "train_time_s": _num(timing.get("train_time_s")),  # run.json timing
        "s_per_epoch": _num(timing.get("s_per_epoch")),
        "epochs": _num(timing.get("epochs")),
        "steps": _num(timing.get("steps")),
        "peak_mem_mb": _num(timing.get("peak_mem_mb")),
        "peak_mem_kind": timing.get("peak_mem_kind"),
        "masks_per_s": _num(timing.get("masks_per_s")),
        "cache_build_s": _num(timing.get("cache_build_s")),
        "cache_size_mb": _num(timing.get("cache_size_mb")),
    }
    for part in breakdown if breakdown is not None else list(parts):
        row[f"time_{part}_s"] = _num(parts.get(part))
    per_organ = summary.get("per_organ") or {}
    for metric in ("dsc", "nsd"):
        for o in ORGANS:
            row[f"{metric}_{o.key}"] = _num((per_organ.get(o.key) or {}).get(metric))
    row.update(
        git_commit=git.get("commit"),
        git_dirty=git.get("dirty"),
        gpu=hw.get("gpu"),
        torch=hw.get("torch"),
        bench_dir=str(run.bench),
        run_dir=str(run.path.relative_to(run.bench)),
    )
    return row


def runs_table(runs: list[Run]) -> pd.DataFrame:
    """results.csv: one row per run (all statuses), in report order."""
    keys = breakdown_keys(runs)
    return pd.DataFrame([run_row(r, keys) for r in runs])


def summary_table(table: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample std (ddof=1) over seeds of each metric, finished runs only.

    Args:
        table: :func:`runs_table` output.

    Returns:
        One row per strategy (report order) with ``n_seeds``, ``seeds`` and ``<metric>_mean`` /
        ``<metric>_std`` columns for :data:`METRICS` and every ``time_*_s`` column. The std of a
        single seed is NaN. NaN values (e.g. a run evaluate skipped) are left out of that metric.
    """
    done = table[table["status"] == FINISHED]
    cols = [c for c in (*METRICS, *(c for c in table.columns if c.startswith("time_"))) if c in done]
    rows = []
    for strategy in strategy_order(set(done["strategy"])):
        g = done[done["strategy"] == strategy]
        row = {"strategy": strategy, "n_seeds": len(g), "seeds": ",".join(str(s) for s in g["seed"])}
        for c in cols:
            row[f"{c}_mean"] = g[c].mean()
            row[f"{c}_std"] = g[c].std(ddof=1)
        rows.append(row)
    return pd.DataFrame(rows)


def per_organ_table(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per-organ mean and std over finished seeds of one 3D metric.

    Args:
        table: :func:`runs_table` output.
        metric: ``dsc`` or ``nsd``.

    Returns:
        Long format: columns ``strategy, organ, name, mean, std, n`` (13 organs per strategy).
    """
    done = table[table["status"] == FINISHED]
    rows = []
    for strategy in strategy_order(set(done["strategy"])):
        g = done[done["strategy"] == strategy]
        for o in ORGANS:
            v = g[f"{metric}_{o.key}"]
            rows.append(
                {
                    "strategy": strategy,
                    "organ": o.key,
                    "name": o.name,
                    "mean": v.mean(),
                    "std": v.std(ddof=1),
                    "n": int(v.notna().sum()),
                }
            )
    return pd.DataFrame(rows, columns=["strategy", "organ", "name", "mean", "std", "n"])
