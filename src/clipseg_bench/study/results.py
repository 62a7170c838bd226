"""Load BENCH run folders, merge shards, and turn them into tables (one row per run, mean ± std).

A BENCH folder holds ``runs/<strategy>-s<seed>/`` (``-f<fold>`` for a run on one fold of a folder
prepared with ``--folds``, ``-n<cases>`` for a run on a subset of the training cases, ``@<model>``
in a benchmark of several models) with the
files ``train`` and ``evaluate`` write (see docs/architecture.md): ``run.json``, ``config.yaml``,
``history.csv``, ``metrics.json`` (``metrics-test.json`` for the test split) and ``samples.npz``.
Several BENCH folders are shards of one benchmark; their runs are unioned here.

**Folds.** The runs of one (strategy, training cases, seed) on the K folds each score their own
fold's cases, which they never trained on: together every labelled non-test case is scored once,
out of fold. :func:`case_scores` is that pooled long table (one row per strategy, seed and case),
and :func:`pool_folds` turns the per-run table into one row per (strategy, training cases, seed)
whose scores are those pooled cases' means. On the test split every fold's model scores the same
test cases; a case's score is then the mean over the fold models.
Everything in this module is pure data handling: no plotting, no HTML.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from clipseg_bench.errors import InputError
from clipseg_bench.organs import ORGANS
from clipseg_bench.provenance import process_alive, read_json_object
from clipseg_bench.run_folder import RunFolder, RunStatus
from clipseg_bench.study import stats

FINISHED = RunStatus.FINISHED
# results.csv's train_cases of a run on the whole train split (and of runs from before that axis).
ALL_CASES = "all"
# Run folder names: <strategy>-s<seed>[-f<fold>][-n<training cases>][@<model>].
_RUN_NAME = re.compile(
    r"^(?P<strategy>.+)-s(?P<seed>[^-@]+)(?:-f(?P<fold>\d+))?(?:-n(?P<cases>\d+))?(?:@(?P<model>.+))?$"
)
# A strategy of one model in a report of several: "<strategy> [<model>]" (the report's arms).
_ARM = re.compile(r"^(?P<strategy>.+) \[(?P<model>.+)\]$")


def model_label(spec: str | None) -> str:
    """How run folders and report rows name a ``--model``: a local folder by its own name, a hub id
    with ``/`` as ``--`` (a tiny spec as it is); empty for none."""
    if not spec:
        return ""
    path = Path(spec)
    if path.is_dir() or spec.startswith(("/", ".", "~")):
        return path.name
    return spec.replace("/", "--")


def arm(strategy: str, model: str) -> str:
    """The report's name of ``strategy`` trained from ``model`` (a label) when runs span several models."""
    return f"{strategy} [{model}]"


def base_strategy(name: str) -> str:
    """The strategy of an :func:`arm` name (a plain strategy name as it is)."""
    match = _ARM.match(name)
    return match["strategy"] if match else name


def run_name(
    strategy: str,
    seed: int,
    train_cases: int | None = None,
    fold: int | None = None,
    model: str | None = None,
) -> str:
    """``<strategy>-s<seed>``, with ``-f<fold>`` for a run on one fold, ``-n<cases>`` for a run on a
    subset of the training cases and ``@<model>`` (:func:`model_label`) in a benchmark of several
    models (runs without any keep the names they always had)."""
    return (
        f"{strategy}-s{seed}"
        + ("" if fold is None else f"-f{fold}")
        + ("" if train_cases is None else f"-n{train_cases}")
        + (f"@{model_label(model)}" if model else "")
    )


class Cell(NamedTuple):
    """One run of a benchmark matrix. A new axis (a learning-rate tag) is a new field at the end with
    a default, so cells recorded before it still read (:meth:`of`) and keep their names."""

    strategy: str
    seed: int
    train_cases: int | None = None  # None: every training case
    fold: int | None = None  # None: the folder's train/val split
    model: str | None = None  # None: the benchmark's one model; else its label (several models)

    @property
    def name(self) -> str:
        """The run folder's name (:func:`run_name`)."""
        return run_name(*self)

    @classmethod
    def of(cls, entry) -> Cell:
        """A cell from a bench record's ``cells`` entry: ``[strategy, seed]``, ``[..., training cases]``,
        ``[..., training cases, fold]`` or ``[..., fold, model]`` (older records have fewer fields).

        Raises:
            ValueError, TypeError, IndexError: not such a list.
        """
        strategy, seed = str(entry[0]), int(entry[1])
        rest = [None if v is None else int(v) for v in list(entry[2:4])]
        rest += [None] * (2 - len(rest))
        model = model_label(str(entry[4])) if len(entry) > 4 and entry[4] is not None else None
        return cls(strategy, seed, *rest, model)


# A run whose run.json says "running" but whose process is gone (SIGKILL, the OOM killer, a reboot):
# train records its pid, host, boot id and start time, and this machine checks them. A run written
# on another host cannot be checked from here and stays "running".
KILLED = RunStatus.KILLED
# A cell the benchmark's record (bench-shard<i>.json) lists but that has no run folder.
NOT_STARTED = RunStatus.NOT_STARTED
# The trainer's timing breakdown keys, in the order the time flows through a step.
BREAKDOWN_ORDER = ("data", "forward", "backward", "optimizer", "eval")
# When the same (strategy, seed) appears in two shards, keep the most complete one.
_STATUS_RANK = {
    RunStatus.FINISHED: 0,
    RunStatus.INTERRUPTED: 1,
    RunStatus.RUNNING: 2,
    RunStatus.KILLED: 2,
    RunStatus.FAILED: 3,
    RunStatus.NOT_STARTED: 10,
}

# results.csv columns that the aggregate tables average over seeds.
METRICS = (
    "trainable_params",
    "total_params",
    "train_dice",
    "val_dice",
    "val_dsc3d",
    "val_nsd3d",
    "train_time_s",
    "train_cpu_s",
    "step_time_s",
    "s_per_epoch",
    "peak_mem_mb",
    "masks_per_s",
    "cache_build_s",
    "prompt_reliance",
    "dice2d_wrong_prompt",
    "prompt_follows",
    "prompt_ignores",
    "prompt_reliance_norm",
    "fp_slice_rate",
    "val_dsc3d_present",
    "val_nsd3d_present",
)
# Prefix of the results.csv columns holding evaluate's dice2d under each prompt wording.
VARIANT_PREFIX = "prompt_variant_"


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
        train_cases: how many training cases the run trained on; None for the whole train split.
        fold: the fold it validated on (trained on the others); None without folds.
        split: which of evaluate's files ``metrics`` holds: "val" (metrics.json; out of fold with
            folds) or "test" (metrics-test.json).
        model: :func:`model_label` of the model the run started from (run.json ``model``).
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
    train_cases: int | None = None
    fold: int | None = None
    split: str = "val"
    model: str = ""

    @property
    def cell(self) -> Cell:
        return Cell(self.strategy, self.seed, self.train_cases, self.fold, self.model or None)

    @property
    def train_cases_label(self) -> str:
        """``all``, or the number of training cases as text (results.csv's ``train_cases``)."""
        return ALL_CASES if self.train_cases is None else str(self.train_cases)

    @property
    def finished(self) -> bool:
        return self.status == FINISHED

    @property
    def samples(self) -> Path | None:
        """``samples.npz`` (``samples-test.npz`` for the test split): CT slices, ground truth and
        prediction, when evaluate wrote it."""
        p = RunFolder(self.path).samples_file(self.split)
        return p if p.is_file() else None


def strategy_order(names: list[str] | set[str]) -> list[str]:
    """Sort strategy names by each strategy's own ``order`` (its file), then any others alphabetically
    (runs of a strategy this install does not have); :func:`arm` names by their strategy, then model,
    so the models stand side by side."""
    from clipseg_bench.strategies import display_order

    bases = {n: i for i, n in enumerate(display_order({base_strategy(n) for n in names}))}
    return sorted(set(names), key=lambda n: (bases[base_strategy(n)], n))


def read_run(path: Path, bench: Path, split: str = "val") -> Run:
    """Read one run folder. The folder name ``<strategy>-s<seed>[-f<fold>][-n<cases>]`` is used when
    run.json and config.yaml lack them; a run with no training-case count trained on all cases.

    A folder without ``run.json`` (a run that never started writing) is kept with status ``missing``
    so that the report can list it.

    Args:
        split: whose scores ``metrics`` holds: "val" (metrics.json) or "test" (metrics-test.json).
    """
    folder = RunFolder(path)
    info = folder.record().to_dict()  # typed on the way: old layouts read as today's
    named = _RUN_NAME.match(path.name)
    name_strategy, name_seed, name_fold, name_cases, name_model = (
        named.groups() if named else ("", None, None, None, None)
    )
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
    config = folder.config().model_dump(mode="json") if folder.has_config() else {}
    train_cases = config.get("train_cases", name_cases)
    fold = config.get("fold", name_fold)
    return Run(
        bench=bench,
        path=path,
        strategy=str(strategy),
        seed=seed,
        status=_status(info),
        info=info,
        config=config,
        metrics=folder.metrics(split),
        history=folder.history(),
        train_cases=None if train_cases is None else int(train_cases),
        fold=None if fold is None else int(fold),
        split=split,
        model=model_label(info.get("model") or config.get("model")) or (name_model or ""),
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


def recorded_cells(bench: Path) -> list[Cell]:
    """Every cell the BENCH folder's records (bench-shard*.json) list, in record order.

    A cell is ``[strategy, seed, training cases or null, fold or null]`` (``[strategy, seed]`` before
    the data axis, three entries before folds), and its model fifth in a benchmark of several models.

    Raises:
        InputError: naming the record whose entry is not such a list.
    """
    cells = []
    for record in sorted(Path(bench).glob("bench-shard*.json")):
        for entry in read_json_object(record).get("cells") or []:
            try:
                cells.append(Cell.of(entry))
            except (TypeError, ValueError, IndexError):
                raise InputError(
                    record, f"'cells' entry {entry!r} is not [strategy, seed, training cases, fold]"
                ) from None
    return cells


def _not_started(bench: Path, root: Path, present: set[Cell], split: str) -> list[Run]:
    """The cells the BENCH folder's records list that have no run folder (a cell without a model, as
    a benchmark of one model records it, matches a run of any model)."""
    runs = []
    anonymous = {c._replace(model=None) for c in present}
    for cell in recorded_cells(bench):
        if cell not in (present if cell.model else anonymous):
            present.add(cell)
            anonymous.add(cell._replace(model=None))
            path = root / cell.name
            runs.append(
                Run(
                    bench,
                    path,
                    cell.strategy,
                    cell.seed,
                    NOT_STARTED,
                    {},
                    {},
                    None,
                    None,
                    cell.train_cases,
                    cell.fold,
                    split,
                    cell.model or "",
                )
            )
    return runs


def find_runs(bench: Path, split: str = "val") -> list[Run]:
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
    runs = [read_run(d, bench, split) for d in dirs]
    runs += _not_started(bench, root, {r.cell for r in runs}, split)
    if not runs:
        raise InputError(bench, "no run folders (expected runs/<strategy>-s<seed>/run.json)")
    return runs


def _same_numbers(a: dict, b: dict) -> bool:
    def same(x, y) -> bool:
        if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
            return True
        return x == y

    return all(same(a[k], b[k]) for k in METRICS)


def settings_difference(a: Run, b: Run) -> tuple[str, object, object] | None:
    """The first setting two runs of one cell were recorded with differently, or None.

    Settings are the whole resolved config (config.yaml) less the runtime fields
    (:func:`~clipseg_bench.config.config_differences`), so the model, steps and epochs, batch size,
    rates, channels and every other field count. The data counts by its fingerprint (run.json's
    ``data``) where both runs recorded one, since shards on other machines see it at other paths;
    else by its path. A run without a config (not started) has nothing to compare.
    """
    if not a.config or not b.config:
        return None
    from clipseg_bench.config import TrainConfig, config_differences

    prints = [(r.info.get("data") or {}).get("fingerprint") for r in (a, b)]
    fields = set(TrainConfig.model_fields) - ({"data"} if all(prints) else set())
    if all(prints) and prints[0] != prints[1]:
        return "data (dataset.json fingerprint)", prints[0], prints[1]
    diffs = config_differences(TrainConfig(**a.config), TrainConfig(**b.config), fields)
    return diffs[0] if diffs else None


def merge_runs(runs: list[Run]) -> list[Run]:
    """Union of runs from several shards, one per (strategy, training cases, seed, fold), in report
    order (strategy, then training cases from fewest to all, then seed, then fold).

    A duplicate keeps the more complete status (finished > interrupted > running > failed).

    Raises:
        InputError: the same (strategy, training cases, seed) recorded in two folders with different
            settings (:func:`settings_difference`), whatever its numbers; or finished in both with
            different numbers.
    """
    chosen: dict[tuple[str, int | None, int, int | None, str], Run] = {}
    for run in runs:
        key = (run.strategy, run.train_cases, run.seed, run.fold, run.model)
        other = chosen.get(key)
        if other is None:
            chosen[key] = run
            continue
        cases = "" if run.train_cases is None else f" on {run.train_cases} training cases"
        cases += "" if run.fold is None else f" fold {run.fold}"
        differs = settings_difference(other, run)
        if differs is not None:
            field, old, new = differs
            raise InputError(
                run.path,
                f"{run.strategy} seed {run.seed}{cases} is recorded in both {other.path} and {run.path} "
                f"with different settings ({field}: {old!r} there, {new!r} here); they are not one run: "
                "remove one of them, or report them apart",
            )
        if run.finished and other.finished:
            if not _same_numbers(run_row(run), run_row(other)):
                raise InputError(
                    run.path,
                    f"{run.strategy} seed {run.seed}{cases} finished in both {other.path} and {run.path} "
                    "with different numbers; remove one of them",
                )
            continue
        if _STATUS_RANK.get(run.status, 9) < _STATUS_RANK.get(other.status, 9):
            chosen[key] = run
    order = {s: i for i, s in enumerate(strategy_order({k[0] for k in chosen}))}

    def report_order(k):
        strategy, cases, seed, fold, model = k
        return order[strategy], model, cases is None, cases or 0, seed, -1 if fold is None else fold

    return [chosen[k] for k in sorted(chosen, key=report_order)]


def read_bench(bench_dirs: list[Path], split: str = "val") -> list[Run]:
    """Read and merge the runs of one or more BENCH folders (shards). See :func:`merge_runs`.

    Args:
        split: whose scores the runs carry: "val" (out of fold with folds) or "test".
    """
    if not bench_dirs:
        raise InputError(None, "no BENCH folder given")
    return as_arms(merge_runs([r for b in bench_dirs for r in find_runs(Path(b), split)]))


def as_arms(runs: list[Run]) -> list[Run]:
    """Runs of several models side by side: each run's strategy becomes its :func:`arm`
    (``lora [sam3-tiny]``), so every table, plot and test of the report keeps each (model, strategy)
    apart and compares them all, within a model and across models on the same val cases. Runs of one
    model are returned as they are."""
    if len({r.model for r in runs if r.model}) < 2:  # a run of unknown model is no second model
        return runs
    return [replace(r, strategy=arm(r.strategy, r.model)) for r in runs]


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


def _audit_parts(audit: dict) -> tuple[dict[str, str], list, int, bool]:
    """run.json's ``gradient_audit`` counted: ``reached/trainable`` per part that trains, each part's
    ``frozen_changed`` (None where unknown), the number of frozen tensors, and whether it failed."""
    trained = {p: a for p, a in audit.items() if a.get("trainable")}
    reached = {
        p: f"{'?' if a.get('reached') is None else a['reached']}/{a['trainable']}" for p, a in trained.items()
    }
    changed = [a.get("frozen_changed") for a in audit.values()]
    frozen = sum(a.get("frozen") or 0 for a in audit.values())
    failed = any(a.get("reached") is not None and a["reached"] < a["trainable"] for a in trained.values())
    return reached, changed, frozen, failed or any(c for c in changed)


def audit_summary(audit: dict | None) -> str:
    """run.json's ``gradient_audit`` in a few words: tensors reached of trainable per trained part,
    frozen tensors that changed, and ``ok`` or ``FAILED`` in front; ``–`` for a run without one."""
    if not audit:
        return "–"
    reached, changed, frozen, failed = _audit_parts(audit)
    parts = [", ".join(f"{p} {r}" for p, r in reached.items()) + " reached" if reached else "nothing trains"]
    if all(c is not None for c in changed):
        parts.append(f"{sum(changed)}/{frozen} frozen changed")
    return ("FAILED: " if failed else "ok: ") + "; ".join(parts)


def audit_cells(info: dict) -> dict[str, str]:
    """A run's gradient audit as table cells: ``reached/trainable`` per part that trains, then
    ``Frozen changed`` and ``Audit`` (``ok``, ``FAILED``, or ``–`` for a run without an audit)."""
    audit = info.get("gradient_audit") or {}
    if not audit:
        return {"Audit": "–"}
    reached, changed, frozen, failed = _audit_parts(audit)
    return {
        **reached,
        "Frozen changed": "?" if None in changed else f"{sum(changed)} of {frozen}",
        "Audit": "FAILED" if failed else "ok",
    }


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
    case_ids = info.get("train_case_ids")  # run.json: the cases trained on (runs since the data axis)
    row = {
        "strategy": run.strategy,
        "seed": run.seed,
        "train_cases": run.train_cases_label,  # config.yaml train_cases, "all" without one
        "n_train_cases": _num(len(case_ids) if case_ids is not None else run.train_cases),
        "fold": _num(run.fold),  # config.yaml fold (NaN: the folder's train/val split)
        "n_folds": _num(info.get("folds")),  # run.json: how many folds the data has (runs on a fold)
        "scored_on": scored_on(run),
        "scored_cases": _num(len(metrics["cases"]) if "cases" in metrics else None),  # metrics.json cases
        "status": run.status,
        "model": info.get("model", run.config.get("model")),
        "model_family": info.get("model_family"),  # run.json (runs since SAM 3 joined)
        "trainable_params": _num(params.get("trainable")),  # run.json params
        "total_params": _num(params.get("total")),
        "train_dice": _num(final.get("train_dice")),  # run.json final
        # evaluate's 2D Dice over the whole val split; the trainer's last val Dice otherwise
        "val_dice": _num(metrics.get("dice2d", final.get("val_dice"))),
        "val_dsc3d": _num(summary.get("dsc")),  # metrics.json summary (FLARE22 3D scores)
        "val_nsd3d": _num(summary.get("nsd")),
        "empty_specificity": _num(metrics.get("empty_specificity")),
        # metrics.json; runs evaluated before it have its complement, empty_specificity
        "fp_slice_rate": _num(metrics.get("fp_slice_rate", 1 - _num(metrics.get("empty_specificity")))),
        # metrics.json summary: the 3D case mean over the organs present in the truth (newer runs)
        "val_dsc3d_present": _num(summary.get("dsc_present")),
        "val_nsd3d_present": _num(summary.get("nsd_present")),
        # metrics.json prompt reliance (evaluation.reliance): dice2d with a wrong organ's name
        "prompt_reliance": _num(metrics.get("prompt_reliance")),
        "dice2d_wrong_prompt": _num(metrics.get("dice2d_wrong_prompt")),
        # ... and from the prompt-confusion matrix (organ-averaged; newer runs)
        "prompt_follows": _num(metrics.get("prompt_follows")),
        "prompt_ignores": _num(metrics.get("prompt_ignores")),
        "prompt_reliance_norm": _num(metrics.get("prompt_reliance_norm")),
        **{f"{VARIANT_PREFIX}{k}": _num(v) for k, v in (metrics.get("prompt_variants") or {}).items()},
        "train_time_s": _num(timing.get("train_time_s")),  # run.json timing
        "train_cpu_s": _num(timing.get("train_cpu_s")),  # NaN for runs from before it was recorded
        "step_time_s": _num(timing.get("step_time_s")),  # steady-state median step (wall)
        "s_per_epoch": _num(timing.get("s_per_epoch")),
        "epochs": _num(timing.get("epochs")),
        "steps": _num(timing.get("steps")),
        "peak_mem_mb": _num(timing.get("peak_mem_mb")),
        "peak_mem_kind": timing.get("peak_mem_kind"),
        "masks_per_s": _num(timing.get("masks_per_s")),
        "cache_build_s": _num(timing.get("cache_build_s")),
        "cache_size_mb": _num(timing.get("cache_size_mb")),
        "gradient_audit": audit_summary(info.get("gradient_audit")),  # run.json gradient_audit
        # run.json cases (absent in runs older than it): 0 when the data had no val case
        "val_cases": _num((info.get("cases") or {}).get("val")),
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


def scored_on(run: Run) -> str:
    """Which split a run's scores come from: ``val``, ``fold k (out of fold)`` or ``test``."""
    if run.split == "test":
        return "test"
    return "val" if run.fold is None else f"fold {run.fold} (out of fold)"


# Columns pool_folds averages over a group's folds weighted by their scored cases (the scores of the
# cases each fold scored); every other number is the plain mean over the folds' runs (costs).
_CASE_WEIGHTED = ("val_", "dsc_", "nsd_", "prompt_", "dice2d", "empty_specificity", "fp_slice_rate")
_UNIT = ["strategy", "train_cases", "seed"]


def pool_folds(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (strategy, training cases, seed): a seed's runs on the K folds pooled into one.

    Runs without a fold pass through unchanged. For a seed's fold runs, the scores (``val_*``,
    per-organ ``dsc_*``/``nsd_*``, prompt reliance, ...) are the means over the cases the folds
    scored (each fold's mean weighted by its ``scored_cases``: the pooled out-of-fold mean on the val
    split, the mean over the fold models on the test split), the costs (time, memory, parameters,
    train Dice) the mean over the folds' runs; ``val_cases`` and ``scored_cases`` add up. The pooled
    row is ``finished`` only when every one of the data's folds finished (else ``k of K folds``), so
    a partial set of folds never stands in for the whole.

    Args:
        table: :func:`runs_table` output.

    Returns:
        The same columns; ``fold`` holds the pooled folds (``0,1,2``), ``scored_on`` says
        ``out of fold (K folds)`` or ``test (K fold models)``.
    """
    if "fold" not in table or table["fold"].isna().all():
        return table
    rows: list[dict] = []
    for _, g in table.groupby(_UNIT, sort=False):  # in report order
        rows += g[g["fold"].isna()].to_dict("records")
        if g["fold"].notna().any():
            rows.append(_pool_group(g[g["fold"].notna()]))
    return pd.DataFrame(rows, columns=table.columns)


def _pool_group(g: pd.DataFrame) -> dict:
    """One seed's fold runs as one row (see :func:`pool_folds`)."""
    done = g[g["status"] == FINISHED]
    row = dict((done if len(done) else g).iloc[0])
    n_folds = int(g["n_folds"].max()) if g["n_folds"].notna().any() else len(g)
    folds = sorted(int(f) for f in done["fold"])
    test = (g["scored_on"] == "test").all()
    row.update(
        fold=",".join(map(str, folds)),
        scored_on=f"test ({len(folds)} fold models)" if test else f"out of fold ({n_folds} folds)",
        status=FINISHED if folds == list(range(n_folds)) else f"{len(folds)} of {n_folds} folds",
    )
    if done.empty:
        return row
    weights = done["scored_cases"].fillna(1.0).astype(float)
    for col in g.columns:
        if col in ("fold", "n_folds", "seed") or not pd.api.types.is_numeric_dtype(g[col]):
            continue
        values = done[col].astype(float)
        if col in ("val_cases", "scored_cases"):  # the folds' cases add up; the test cases are shared
            row[col] = values.max() if test and col == "scored_cases" else values.sum()
        elif col.startswith(_CASE_WEIGHTED):
            ok = values.notna()
            row[col] = float((values[ok] * weights[ok]).sum() / weights[ok].sum()) if ok.any() else math.nan
        else:
            row[col] = values.mean()
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
    cols += [c for c in table.columns if c.startswith(VARIANT_PREFIX)]
    rows = []
    for strategy in strategy_order(set(done["strategy"])):
        g = done[done["strategy"] == strategy]
        row = {"strategy": strategy, "n_seeds": len(g), "seeds": ",".join(str(s) for s in g["seed"])}
        for c in cols:
            row[f"{c}_mean"] = g[c].mean()
            row[f"{c}_std"] = g[c].std(ddof=1)
        rows.append(row)
    return pd.DataFrame(rows)


CLEANUP_MEAN = "mean"  # the organ column of the gain over all organs (metrics.json summary)


def _cleanup_gain(postprocess_3d: dict, organ: str, metric: str) -> float:
    """Score after ``lcc`` minus score as predicted, for one organ key or :data:`CLEANUP_MEAN`."""

    def score(mode: str) -> float:
        s = (postprocess_3d.get(mode) or {}).get("summary") or {}
        return _num(
            s.get(metric) if organ == CLEANUP_MEAN else (s.get("per_organ", {}).get(organ) or {}).get(metric)
        )

    return score("lcc") - score("none")


def _pooled_gain(runs: list[Run], organ: str, metric: str) -> float:
    """One seed's clean-up gain: its run's, or its fold runs' weighted by the cases each scored (the
    gain over the pooled out-of-fold cases)."""
    gains = [_cleanup_gain(r.metrics["postprocess_3d"], organ, metric) for r in runs]
    if len(runs) == 1:
        return gains[0]
    weights = [len(r.metrics.get("cases") or []) or 1 for r in runs]
    return math.fsum(g * w for g, w in zip(gains, weights)) / sum(weights)


def cleanup_gain_table(runs: list[Run], metric: str) -> pd.DataFrame:
    """What the 3D clean-up gains, per strategy and organ, over finished evaluated seeds.

    Reads ``metrics.json`` ``postprocess_3d`` (evaluate scores every run as predicted and after
    ``lcc``); runs evaluated before it existed are left out. A seed's fold runs count as one (their
    gains weighted by the cases each scored).

    Args:
        runs: the benchmark's runs.
        metric: ``dsc`` or ``nsd``.

    Returns:
        Long format, columns ``strategy, organ, name, mean, std, n``: per strategy the 13 organs and
        a last row ``organ == "mean"`` (the overall score's gain). ``mean`` > 0: the clean-up helps.
        Empty when no run has both scores.
    """
    done = [r for r in runs if r.finished and r.metrics and "postprocess_3d" in r.metrics]
    organs = [(o.key, o.name) for o in ORGANS] + [(CLEANUP_MEAN, "all organs (mean)")]
    rows = []
    for strategy in strategy_order({r.strategy for r in done}):
        seeds: dict[tuple, list[Run]] = {}  # a seed's runs: one, or its K fold runs
        for r in done:
            if r.strategy == strategy:
                seeds.setdefault((r.train_cases, r.seed), []).append(r)
        for key, name in organs:
            v = pd.Series([_pooled_gain(group, key, metric) for group in seeds.values()], dtype=float)
            rows.append(
                {
                    "strategy": strategy,
                    "organ": key,
                    "name": name,
                    "mean": v.mean(),
                    "std": v.std(ddof=1),
                    "n": int(v.notna().sum()),
                }
            )
    return pd.DataFrame(rows, columns=["strategy", "organ", "name", "mean", "std", "n"])


# --- the study's questions: how much data, and which differences are real --------------------


def full_data_runs(runs: list[Run]) -> list[Run]:
    """The runs on the benchmark's largest training set: all cases if any run had them, else the
    largest count. The strategy tables and plots describe these; the data-efficiency section all."""
    if not runs:
        return []
    counts = {r.train_cases for r in runs}
    level = None if None in counts else max(counts)
    return [r for r in runs if r.train_cases == level]


def efficiency_table(table: pd.DataFrame, metric: str = "val_dsc3d") -> pd.DataFrame:
    """One metric against the number of training cases: mean and sample std over finished seeds.

    Args:
        table: :func:`runs_table` output (every training-case level).
        metric: a results.csv column.

    Returns:
        Columns ``strategy, train_cases, n_train_cases, mean, std, n, trainable_params``, one row per
        (strategy, training cases) in report order. ``n_train_cases`` is the number of cases the
        runs trained on (NaN for runs from before it was recorded); ``trainable_params`` is 0 for a
        strategy that trains nothing, whose score cannot depend on the training cases.
    """
    done = table[table["status"] == FINISHED]
    rows = []
    for (strategy, cases), g in done.groupby(["strategy", "train_cases"], sort=False):
        rows.append(
            {
                "strategy": strategy,
                "train_cases": cases,
                "n_train_cases": g["n_train_cases"].max(),
                "mean": g[metric].mean(),
                "std": g[metric].std(ddof=1),
                "n": int(g[metric].notna().sum()),
                "trainable_params": g["trainable_params"].mean(),
            }
        )
    return pd.DataFrame(
        rows, columns=["strategy", "train_cases", "n_train_cases", "mean", "std", "n", "trainable_params"]
    )


# The long tables' grouping columns: every test, interval and ranking is made within one group.
# A second model family adds "model" here; out-of-fold runs need nothing: cases are keyed by id.
GROUP_KEYS = ("train_cases",)
CASE_METRICS = ("dsc", "nsd", "dsc_present", "nsd_present")


def _case_mean(organs: dict, metric: str, keys) -> float:
    values = [_num((organs.get(k) or {}).get(metric)) for k in keys]
    return math.fsum(values) / len(values) if values else math.nan


def case_scores(runs: list[Run]) -> pd.DataFrame:
    """Per (strategy, training cases, seed, case) scores: the long table every statistic of
    :mod:`.stats` starts from (keyed by case id).

    With folds this is the pooled out-of-fold table: each fold's run contributes the cases of its
    own fold, so every labelled non-test case appears once per strategy and seed. On the test split
    every fold's model scores the same cases, and a case's score is the mean over those models.

    Returns:
        Columns ``strategy, train_cases, seed, case, dsc, nsd, dsc_present, nsd_present, folds`` for
        every finished, evaluated run: a case's 3D DSC/NSD is the mean over its organs in
        metrics.json ``per_case``, the rule by which ``evaluation.metrics.summarize`` makes the run's
        own summary (not imported: it brings MONAI, seconds of start-up a report does not otherwise
        need); ``*_present`` is the mean over the organs present in that case's truth (metrics.json
        ``organs_present``), NaN for runs evaluated before it was recorded; ``folds`` names the fold
        whose run scored the case (the folds averaged, on the test split; empty without folds).

    Raises:
        InputError: a case scored twice on the val split for one strategy, training-case count and
            seed (e.g. a run on the train/val split beside runs on folds), naming both runs.
    """
    rows, source = [], {}
    for r in runs:
        per_case = (r.metrics or {}).get("per_case") or {}
        present = (r.metrics or {}).get("organs_present") or {}
        if not r.finished:
            continue
        for case, organs in per_case.items():
            if not organs:
                continue
            known = present.get(case)
            key = (r.strategy, r.train_cases_label, r.seed, str(case))
            if r.split != "test" and key in source:
                raise InputError(
                    r.path,
                    f"scores case {case!r}, which {source[key]} scores too: a case is scored once, out of fold",
                )
            source[key] = r.path
            rows.append(
                {
                    "strategy": r.strategy,
                    "train_cases": r.train_cases_label,
                    "seed": r.seed,
                    "case": str(case),
                    **{m: _case_mean(organs, m, list(organs)) for m in ("dsc", "nsd")},
                    **{
                        f"{m}_present": math.nan if known is None else _case_mean(organs, m, known)
                        for m in ("dsc", "nsd")
                    },
                    "folds": "" if r.fold is None else str(r.fold),
                }
            )
    table = pd.DataFrame(rows, columns=["strategy", "train_cases", "seed", "case", *CASE_METRICS, "folds"])
    return _mean_over_fold_models(table, ["strategy", "train_cases", "seed", "case"], CASE_METRICS)


def _mean_over_fold_models(table: pd.DataFrame, keys: list[str], metrics) -> pd.DataFrame:
    """The test split of fold runs: every fold's model scored the same case, so a case's score is
    the mean over the fold models (``folds`` joined); any other table comes back as it is."""
    if table.empty or not table.duplicated(keys).any():
        return table
    means = {m: (m, "mean") for m in metrics}
    return table.groupby(keys, sort=False).agg(**means, folds=("folds", ",".join)).reset_index()


def organ_scores(runs: list[Run]) -> pd.DataFrame:
    """Per (run, val case, organ) 3D scores from metrics.json ``per_case``, finished runs only
    (with folds pooled out of fold, as :func:`case_scores`).

    Returns:
        Columns ``strategy, train_cases, seed, case, organ, dsc, nsd, folds`` (FLARE22 rules: an organ
        absent from both truth and prediction scores 1, as in the run's own per-organ summary).
    """
    rows = [
        {
            "strategy": r.strategy,
            "train_cases": r.train_cases_label,
            "seed": r.seed,
            "case": str(case),
            "organ": key,
            "dsc": _num((s or {}).get("dsc")),
            "nsd": _num((s or {}).get("nsd")),
            "folds": "" if r.fold is None else str(r.fold),
        }
        for r in runs
        if r.finished
        for case, organs in ((r.metrics or {}).get("per_case") or {}).items()
        for key, s in (organs or {}).items()
    ]
    table = pd.DataFrame(
        rows, columns=["strategy", "train_cases", "seed", "case", "organ", "dsc", "nsd", "folds"]
    )
    return _mean_over_fold_models(table, ["strategy", "train_cases", "seed", "case", "organ"], ("dsc", "nsd"))


def _levels(labels) -> list[str]:
    """Training-case levels: the full training set first, then from the fewest cases up."""
    return sorted(set(labels), key=lambda c: (c != ALL_CASES, int(c) if c != ALL_CASES else 0))


def comparison_families(level: pd.DataFrame) -> dict[str, list[tuple[str, str]]]:
    """The pre-specified families of one training-case level, found from the numbers, never by name.

    Args:
        level: :func:`runs_table` rows of finished runs at one level.

    Returns:
        ``{"vs untrained": [(strategy, baseline), ...], "trained pairs": [(a, b), ...]}``: every
        strategy against each strategy that trains nothing (``trainable_params`` 0, the zero-shot
        baseline), and every pair of trained strategies in report order (difference a minus b).
        With runs of several models (:func:`arm` names) both are made within each model, and
        ``"across models"`` adds each strategy of one model against the same strategy of every other
        model (on the val cases both have: the same data).
    """
    names = strategy_order(set(level["strategy"]))
    models = {n: _ARM.match(n)["model"] if _ARM.match(n) else "" for n in names}
    params = level.groupby("strategy")["trainable_params"].max()
    untrained = [s for s in names if params.get(s) == 0]
    trained = [s for s in names if s not in untrained]
    versus = [
        (s, u)
        for i, u in enumerate(untrained)
        for s in names
        if s != u and s not in untrained[:i] and models[s] == models[u]
    ]
    pairs = [(a, b) for i, a in enumerate(trained) for b in trained[i + 1 :] if models[a] == models[b]]
    out = {"vs untrained": versus, "trained pairs": pairs}
    across = [
        (a, b)
        for i, a in enumerate(names)
        for b in names[i + 1 :]
        if models[a] != models[b] and base_strategy(a) == base_strategy(b)
    ]
    return {**out, "across models": across} if across else out


PAIRED_COLUMNS = [
    *GROUP_KEYS,
    "family",
    "metric",
    *stats.PAIR_COLUMNS,
    "p_adjusted",
    "p_equivalence_adjusted",
    "equivalence_margin",
    "verdict",
    "note",
]


def _notes(rows: pd.DataFrame, totals, margin: float) -> list[str]:
    """Per decided row: fewer cases than its level (or organ) has (``totals``: one number, or one
    per row), and a difference that is also within the margin (both tests reject: real, and
    smaller than the margin)."""
    notes = []
    totals = [totals] * len(rows) if isinstance(totals, int) else list(totals)
    for r, total in zip(rows.itertuples(), totals):
        parts = [] if r.n_cases == total else [f"paired on {r.n_cases} of the {total} val cases"]
        if r.verdict in (stats.HIGHER, stats.LOWER) and r.p_equivalence_adjusted < stats.ALPHA:
            parts.append(f"also within ±{margin:g} (equivalence test)")
        notes.append("; ".join(parts))
    return notes


def paired_differences(
    table: pd.DataFrame, scores: pd.DataFrame, *, margin: float = stats.EQUIVALENCE_MARGIN
) -> pd.DataFrame:
    """The pre-specified comparisons of every training-case level, tested over cases, Holm-corrected.

    Per level, metric (``dsc`` primary, ``nsd`` secondary) and family (:func:`comparison_families`),
    each pair is compared over the val cases both strategies have, seeds averaged within each case
    first (:mod:`clipseg_bench.study.stats`), and the family is corrected and decided together.

    Args:
        table: :func:`runs_table` output.
        scores: :func:`case_scores` of the same runs.
        margin: the equivalence margin, in DSC/NSD units.

    Returns:
        :data:`PAIRED_COLUMNS` (paired.csv), the full training set's rows first. ``note`` says when a
        row was paired on fewer cases than the level has.
    """
    done = table[table["status"] == FINISHED]
    frames = []
    for cases in _levels(done["train_cases"]):
        level = scores[scores["train_cases"] == cases]
        total = level["case"].nunique()
        families = comparison_families(done[done["train_cases"] == cases])
        for metric in ("dsc", "nsd"):
            means = stats.case_means(level, metric)
            for family, pairs in families.items():
                if not pairs:
                    continue
                rows = stats.decide(stats.paired_rows(means, pairs, metric, margin=margin))
                frames.append(
                    rows.assign(
                        train_cases=cases,
                        family=family,
                        metric=metric,
                        equivalence_margin=margin,
                        note=_notes(rows, total, margin),
                    )
                )
    return _frame(frames, PAIRED_COLUMNS)


def _frame(frames: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


RANKING_COLUMNS = [*GROUP_KEYS, "metric", *stats.RANK_COLUMNS]


def ranking_table(scores: pd.DataFrame) -> pd.DataFrame:
    """Ranking stability (ranking.csv): per level and metric, each strategy's mean rank, 95% rank
    interval and P(rank 1) over 1,000 bootstrap resamples of the cases every strategy has.

    Args:
        scores: :func:`case_scores` output.

    Returns:
        :data:`RANKING_COLUMNS`, strategies in report order within each (level, metric).
    """
    frames = []
    for cases in _levels(scores["train_cases"]):
        level = scores[scores["train_cases"] == cases]
        order = {s: i for i, s in enumerate(strategy_order(set(level["strategy"])))}
        level = level.sort_values("strategy", key=lambda s: s.map(order), kind="stable")
        for metric in ("dsc", "nsd"):
            ranks = stats.ranking(stats.case_means(level, metric), metric)
            frames.append(ranks.assign(train_cases=cases, metric=metric))
    return _frame(frames, RANKING_COLUMNS)


ORGAN_MAP_COLUMNS = [
    *GROUP_KEYS,
    "metric",
    "organ",
    "name",
    *(c for c in PAIRED_COLUMNS if c not in (*GROUP_KEYS, "metric")),
]


def organ_map_table(
    table: pd.DataFrame, organs: pd.DataFrame, *, margin: float = stats.EQUIVALENCE_MARGIN
) -> pd.DataFrame:
    """The per-organ significance map (organ_map.csv): every comparison of both families, per organ,
    over cases; Holm over the whole map of one level and metric (13 organs x all comparisons).

    Args:
        table: :func:`runs_table` output.
        organs: :func:`organ_scores` of the same runs.
        margin: the equivalence margin.

    Returns:
        :data:`ORGAN_MAP_COLUMNS`, one row per (level, metric, organ, comparison).
    """
    done = table[table["status"] == FINISHED]
    names = {o.key: o.name for o in ORGANS}
    frames = []
    for cases in _levels(done["train_cases"]):
        level = organs[organs["train_cases"] == cases]
        families = comparison_families(done[done["train_cases"] == cases])
        for metric in ("dsc", "nsd"):
            means = stats.case_means(level, metric, ["organ"])
            parts = []
            for organ, g in means.groupby("organ", sort=False):
                total = g["case"].nunique()
                for family, pairs in families.items():
                    if pairs:
                        rows = stats.paired_rows(g, pairs, metric, margin=margin)
                        parts.append(rows.assign(organ=organ, family=family, total=total))
            if parts:
                decided = stats.decide(pd.concat(parts, ignore_index=True))
                frames.append(
                    decided.assign(
                        train_cases=cases,
                        metric=metric,
                        equivalence_margin=margin,
                        note=_notes(decided, decided["total"].astype(int), margin),
                    )
                )
    out = _frame(frames, [c for c in ORGAN_MAP_COLUMNS if c != "name"])
    return out.assign(name=out["organ"].map(lambda k: names.get(k, k)))[ORGAN_MAP_COLUMNS]


def case_summary_table(scores: pd.DataFrame, metrics=CASE_METRICS) -> pd.DataFrame:
    """Per level, metric and strategy: mean over cases with its 95% interval over cases, and the sd
    over seeds (:func:`clipseg_bench.study.stats.summary_over_cases`).

    Returns:
        Columns ``train_cases, metric, strategy, n_cases, n_seeds, mean, ci_low, ci_high,
        sd_seeds``; a metric no run has (``*_present`` of older runs) has no rows.
    """
    frames = [
        stats.summary_over_cases(scores, m, GROUP_KEYS).assign(metric=m)
        for m in metrics
        if m in scores and scores[m].notna().any()
    ]
    cols = [*GROUP_KEYS, "metric", "strategy", "n_cases", "n_seeds", "mean", "ci_low", "ci_high", "sd_seeds"]
    return _frame(frames, cols)


def organ_summary_table(organs: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per level, strategy and organ: mean over cases [95% interval over cases] and sd over seeds.

    Returns:
        Columns ``train_cases, strategy, organ, name, n_cases, n_seeds, mean, ci_low, ci_high,
        sd_seeds``, organs in FLARE22 order within each strategy.
    """
    out = stats.summary_over_cases(organs, metric, [*GROUP_KEYS, "organ"])
    names = {o.key: o.name for o in ORGANS}
    rank = {o.key: i for i, o in enumerate(ORGANS)}
    order = {s: i for i, s in enumerate(strategy_order(set(out["strategy"])))}
    out = out.assign(name=out["organ"].map(lambda k: names.get(k, k)))
    out = out.sort_values(
        ["strategy", "organ"], key=lambda c: c.map(order if c.name == "strategy" else rank), kind="stable"
    )
    cols = [
        *GROUP_KEYS,
        "strategy",
        "organ",
        "name",
        "n_cases",
        "n_seeds",
        "mean",
        "ci_low",
        "ci_high",
        "sd_seeds",
    ]
    return out[cols].reset_index(drop=True)


def prompt_confusion_table(runs: list[Run]) -> pd.DataFrame:
    """The prompt-confusion matrices of finished runs (metrics.json ``prompt_confusion``), long.

    Returns:
        Columns ``strategy, train_cases, seed, fold, named, organ, dice``: the Dice of the mask for
        the prompt naming ``named`` against the truth of ``organ`` (NaN where that organ was never
        present); a run on a fold gives its fold's matrix (``fold`` NaN without folds). Runs
        evaluated before the matrix existed have no rows.
    """
    rows = []
    for r in runs:
        confusion = (r.metrics or {}).get("prompt_confusion") if r.finished else None
        if not confusion:
            continue
        keys = confusion.get("organs") or []
        for named, row in zip(keys, confusion.get("dice") or []):
            for organ, value in zip(keys, row):
                rows.append(
                    {
                        "strategy": r.strategy,
                        "train_cases": r.train_cases_label,
                        "seed": r.seed,
                        "fold": _num(r.fold),
                        "named": named,
                        "organ": organ,
                        "dice": _num(value),
                    }
                )
    return pd.DataFrame(rows, columns=["strategy", "train_cases", "seed", "fold", "named", "organ", "dice"])
