"""`clipseg-bench benchmark`: the strategy x seed (x training cases) matrix, one run folder per cell.

Each cell trains and evaluates in its own subprocess, so a crash stays in its cell, peak memory is
measured per run, and `--launcher "accelerate launch --num_processes 4"` can give every run several
GPUs. Finished cells are skipped on the next call; unfinished ones are resumed from their last
checkpoint. `--shard i/n` takes every n-th cell starting at i (0-based), so n machines (a SLURM
array) split the matrix deterministically and `report` merges their folders.

`--train-cases 1,5,all` adds the data-efficiency axis: every strategy x seed also trains on nested
subsets of the training cases (TrainConfig.train_cases); its runs are named
``<strategy>-s<seed>-n<cases>``, while the full training set keeps the plain ``<strategy>-s<seed>``.

`--model a,b` compares models (e.g. CLIPSeg and SAM 3): every cell is trained from each, the run
names end in ``@<model>`` and `report` shows the models side by side.

`--folds all|0,2` (data prepared with ``--folds K``) adds the fold axis: every cell trains on the
other folds and is evaluated on its own (TrainConfig.fold), ``<strategy>-s<seed>-f<fold>[-n<cases>]``;
the report pools the folds' scores out of fold. `--postprocess auto` then chooses the per-organ 3D
clean-up on those out-of-fold scores (study/choices.py) and records it in BENCH and in each run.
`--test` trains nothing: it evaluates every finished cell on the held-out test split, once the
choices are frozen. A cell is a :class:`~clipseg_bench.study.results.Cell`.

Before anything is written, every input is checked (the data, the model, each cell's config, the
output folder), and a call whose settings differ from those the folder was run with is refused:
a BENCH folder holds one benchmark, so its old runs never pass for new ones. More strategies,
seeds or training-case counts with the same settings extend it. A failed run makes the command
fail too (exit code 1), naming the run and its log.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from clipseg_bench.config import RUNTIME_FIELDS, TrainConfig, load_config, save_config
from clipseg_bench.errors import FieldError, InputError, RunFailed
from clipseg_bench.provenance import (
    check_output_folder,
    check_unlocked,
    git_info,
    hardware_info,
    output_lock,
    process_alive,
    read_json_object,
    write_json_atomic,
)
from clipseg_bench.run_folder import RunFolder, RunRecord, RunStatus
from clipseg_bench.strategies import available
from clipseg_bench.study.results import ALL_CASES, Cell, is_bench_folder, model_label, recorded_cells
from clipseg_bench.study.results import run_name as run_name  # re-exported: where callers found it
from clipseg_bench.study.sweep import SweepPlan, choices, parse_lr_grid, plan_sweep, write_choices
from clipseg_bench.train.record import LOCK as TRAIN_LOCK  # the lock `train` takes in each run folder

# What a run's config holds besides the benchmark's shared settings.
PER_CELL = ("model", "strategy", "seed", "lr", "decoder_lr", "train_cases", "fold", *RUNTIME_FIELDS)


def parse_shard(spec: str | None) -> tuple[int, int]:
    """ "i/n" -> (i, n) with 0 <= i < n; None -> (0, 1)."""
    if not spec:
        return 0, 1
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise FieldError("shard", f"expected i/n such as 0/4, got {spec!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise FieldError("shard", f"need 0 <= i < n, got {spec!r}")
    return i, n


def parse_folds(spec: str | None, n_folds: int | None) -> list[int | None]:
    """ "all" or "0,2" -> the folds to run; None (no ``--folds``) -> [None], the train/val split.

    Args:
        n_folds: how many folds the data has (None: prepared without folds).

    Raises:
        FieldError: folds asked of data without them, or a fold it does not have.
    """
    if spec is None:
        return [None]
    if n_folds is None:
        raise FieldError("folds", "the data was prepared without folds; prepare it with --folds K")
    if spec.strip().lower() == "all":
        return list(range(n_folds))
    try:
        folds = sorted({int(x) for x in spec.split(",")})
    except ValueError:
        raise FieldError("folds", f"expected 'all' or fold numbers such as 0,2, got {spec!r}") from None
    bad = [f for f in folds if not 0 <= f < n_folds]
    if bad:
        raise FieldError("folds", f"the data has folds 0..{n_folds - 1}, not {bad[0]}")
    return folds


def parse_train_cases(spec: str | None, n_train: int, *, collapse: bool = True) -> list[int | None]:
    """ "1,5,all" or "0.25,0.5,1.0" -> training-case counts, None for the whole train split.

    Args:
        spec: comma-separated counts (integers), fractions of the train split (numbers with a
            decimal point, in (0, 1]; rounded, at least 1 case) or ``all``; None means ``all``.
        n_train: the number of cases in the train split (the smallest fold's, with folds).
        collapse: a count equal to ``n_train`` is ``all`` (False when folds differ in size).

    Returns:
        Distinct counts in increasing order, None (all cases) last; a count equal to the whole split
        is None (with ``collapse``), so it names and trains the same run as ``all``.

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
            raise FieldError(
                "train_cases",
                f"expected counts, fractions in (0, 1] or 'all', such as 1,5,all; got {item!r}",
            ) from None
        if not 1 <= count <= n_train:
            raise FieldError("train_cases", f"{item} training cases asked for; the train split has {n_train}")
        out.append(None if item == ALL_CASES or (collapse and count == n_train) else count)
    counts = sorted({c for c in out if c is not None})
    return counts + ([None] if None in out else [])


def cells(
    strategies: list[str],
    seeds: list[int],
    shard: str | None = None,
    train_cases: list[int | None] | None = None,
    folds: list[int | None] | None = None,
    models: list[str] | None = None,
) -> list[Cell]:
    """The matrix in a fixed order (strategy-major, then model, training cases, seed, fold),
    restricted to one shard (so shards split over folds and models too).

    Args:
        train_cases: from :func:`parse_train_cases`; default: all training cases only.
        folds: from :func:`parse_folds`; default: the train/val split only.
        models: the ``--model`` values; with more than one, each cell names its model's label
            (:func:`~clipseg_bench.study.results.model_label`).

    Returns:
        One :class:`~clipseg_bench.study.results.Cell` per run.
    """
    i, n = parse_shard(shard)
    unknown = [s for s in strategies if s not in available()]
    if unknown:
        raise FieldError("strategies", f"unknown strategies {unknown}; available: {', '.join(available())}")
    labels = [model_label(m) for m in models] if models and len(models) > 1 else [None]
    every = [
        Cell(s, seed, k, f, m)
        for s in strategies
        for m in labels
        for k in (train_cases or [None])
        for seed in seeds
        for f in (folds or [None])
    ]
    return every[i::n]


def parse_models(spec: str | list[str]) -> list[str]:
    """``--model``: one model, or several comma-separated (each a tiny spec, folder or hub id), each once.

    Raises:
        FieldError: an empty entry, or a model named twice (their labels,
            :func:`~clipseg_bench.study.results.model_label`, name the run folders).
    """
    models = [m.strip() for m in spec.split(",")] if isinstance(spec, str) else [str(m) for m in spec]
    if not models or not all(models):
        raise FieldError("model", f"expected one model or several separated by commas, got {spec!r}")
    labels = [model_label(m) for m in models]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise FieldError("model", f"{twice[0]!r} is named twice (run folders are named by model)")
    return models


def run_status(run: Path) -> RunStatus | str:
    """The run's :class:`~clipseg_bench.run_folder.RunStatus` (``missing``, ``evaluated``...)."""
    return RunFolder(run).status()


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


def _record_path(out: Path, shard: str | None) -> Path:
    return out / f"bench-shard{parse_shard(shard)[0]}.json"


def launcher_command(launcher: str | None) -> list[str]:
    """``--launcher`` as the words that start a training process (``python`` itself without one).

    Raises:
        InputError: unbalanced quotes, or a first word that is not a command on PATH.
    """
    if not launcher:
        return [sys.executable]
    try:
        words = shlex.split(launcher)
    except ValueError as exc:
        raise FieldError("launcher", f"cannot split {launcher!r} into words ({exc})") from None
    if not words or shutil.which(words[0]) is None:
        raise FieldError("launcher", f"{(words or [''])[0]!r} is not a command on PATH")
    return words


def plan(
    *,
    data,
    model: str | list[str],
    todo: list[Cell],
    out: Path,
    config: str | None,
    overrides: dict,
    strategy_lr: dict[str, float],
    overwrite: bool,
    tuned: dict[str, dict[str, float]] | None = None,
) -> dict[Cell, TrainConfig]:
    """Check everything a benchmark call needs, writing nothing; return each cell's config.

    Args:
        tuned: per strategy, the rate fields a learning-rate sweep chose ({field: rate}); they win
            over ``strategy_lr``.

    Raises:
        InputError: a bad flag, config file, data folder, model or output folder, or settings that
            differ from those the BENCH folder was run with.
    """
    from clipseg_bench.data.dataset import PreparedData
    from clipseg_bench.model.load import check_model

    stray = sorted(set(strategy_lr) - set(available()))
    if stray:
        raise FieldError("lrs", f"unknown strategy {stray[0]!r}; available: {', '.join(available())}")
    check_output_folder(
        out, command="benchmark", ours=is_bench_folder, inputs=[Path(data)], overwrite=overwrite
    )
    PreparedData(data)
    models = parse_models(model)
    for each in models:
        check_model(each)
    spec = {model_label(m): m for m in models}  # a cell names its model by label
    cfgs = {}
    todo = [Cell(*c) for c in todo]  # plain (strategy, seed, cases[, fold]) tuples too
    for cell in todo:
        values = {
            **overrides,
            "data": str(data),
            "model": spec[cell.model] if cell.model else models[0],
            "strategy": cell.strategy,
            "seed": cell.seed,
            "out": str(out / "runs" / cell.name),
            "lr": strategy_lr.get(cell.strategy),
            "train_cases": cell.train_cases,
            "fold": cell.fold,
            **(tuned or {}).get(cell.strategy, {}),
        }
        cfgs[cell] = load_config(config, values)
    _refuse_mixed_folds(out, todo)
    _refuse_other_settings(out, cfgs)
    return cfgs


def _refuse_mixed_folds(out: Path, todo: list[Cell]) -> None:
    """A BENCH folder's runs are all on folds or all on the train/val split: runs of both would score
    fold 0's cases twice for one strategy and seed."""
    if not todo:
        return
    folded = todo[0].fold is not None
    for cell in recorded_cells(out):
        if (cell.fold is not None) != folded:
            has, asks = ("folds", "no --folds") if not folded else ("the train/val split", "--folds")
            raise InputError(
                out,
                f"this benchmark folder's runs use {has}, this call asks {asks}: a BENCH folder holds "
                "one kind; choose another --out",
            )


def shared_settings(cfg: TrainConfig) -> dict:
    """A cell's config without what differs from cell to cell: the benchmark's settings."""
    return {k: v for k, v in cfg.model_dump(mode="json").items() if k not in PER_CELL}


def _refuse_other_settings(out: Path, cfgs: dict[Cell, TrainConfig]) -> None:
    """A BENCH folder holds one benchmark: refuse a call whose runs would train differently from the
    runs already there (recorded settings, and each existing run's config.yaml)."""
    first = next(iter(cfgs.values()), None)
    for record in sorted(out.glob("bench-shard*.json")):
        recorded = read_json_object(record).get("settings")
        if first is None or not isinstance(recorded, dict):
            continue
        for key, value in shared_settings(first).items():
            old = recorded.get(key, value)
            if key == "data" and old is not None and Path(old).resolve() == Path(value).resolve():
                continue
            if old != value:
                raise InputError(
                    out,
                    f"this benchmark folder was run with {key}={old!r} ({record.name}), this call asks "
                    f"{key}={value!r}: a BENCH folder holds one set of settings; choose another --out",
                )
    for cell, cfg in cfgs.items():
        run = RunFolder(out / "runs" / cell.name)
        record = run.record()  # an unreadable run.json refuses here too
        if record.status == RunStatus.RUNNING and process_alive(record.process):
            raise InputError(
                run.path, f"is being trained right now (process {record.process['pid']}); wait for it to end"
            )
        if run.path.is_dir():  # a `train` that holds it (still building, before its run.json)
            check_unlocked(run.path, TRAIN_LOCK)
        run.refuse_other_config(
            cfg,
            "a BENCH folder holds one set of settings; choose another --out (or delete that run to redo it)",
        )


def _write_record(out: Path, shard: str | None, *, todo, model, data, epochs, cfgs, strategy_lr) -> None:
    """bench-shard<i>.json: the cells of every call into this shard, the settings, commit and hardware."""
    path = _record_path(out, shard)
    models = parse_models(model)
    old = read_json_object(path) if path.is_file() else {}
    cells_done = [Cell.of(c) for c in old.get("cells", [])]
    cells_all = cells_done + [c for c in todo if c not in cells_done]
    first = next(iter(cfgs.values()), None)
    write_json_atomic(
        path,
        {
            "strategies": list(dict.fromkeys(c[0] for c in cells_all)),
            "seeds": list(dict.fromkeys(c[1] for c in cells_all)),
            "train_cases": list(dict.fromkeys(ALL_CASES if c[2] is None else c[2] for c in cells_all)),
            "folds": list(dict.fromkeys(c.fold for c in cells_all if c.fold is not None)),
            "cells": [list(c) for c in cells_all],  # what `report` lists as never started if absent
            "shard": shard or "0/1",
            "model": models[0] if len(models) == 1 else models,
            "data": str(data),
            "epochs": epochs,
            "settings": shared_settings(first) if first is not None else {},
            "lrs": strategy_lr,
            "git": git_info(),
            "hardware": hardware_info(),
        },
    )


def run_matrix(
    *,
    data,
    model: str | list[str],
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
    folds: str | None = None,
    postprocess: str = "none",
    test: bool = False,
    overwrite: bool = False,
    lr_sweep: int | None = None,
    lr_grid: list[str] | None = None,
    tune_fraction: float = 0.2,
) -> list[dict]:
    """Train (and evaluate) every cell of this shard; returns one status dict per cell.

    Args:
        model: a ``--model`` value, several comma-separated, or a list of them (:func:`parse_models`).
        config: YAML of TrainConfig fields shared by every run; the matrix's own fields win.
        strategy_lr: learning rate per strategy (unlisted strategies use their own default).
        launcher: command that runs Python for training, e.g. "accelerate launch --num_processes 4".
        extra: more TrainConfig fields shared by every run.
        train_cases: the data-efficiency axis, e.g. "1,5,all" (see :func:`parse_train_cases`);
            None trains every run on all training cases.
        folds: "all" or "0,2": the fold axis (see :func:`parse_folds`); None: the train/val split.
        postprocess: "auto": after the runs, choose the per-organ clean-up on the out-of-fold scores
            and record it (:mod:`clipseg_bench.study.choices`; needs ``folds``); "none": no choice.
        test: train nothing; evaluate every finished cell on the held-out test split (with the
            recorded clean-up when ``postprocess`` is "auto").
        overwrite: write into a non-empty folder that is not a BENCH folder.
        lr_sweep: N: first choose each strategy's rate from a grid of N around its default, on tune
            cases carved from the training cases (:mod:`clipseg_bench.study.sweep`), on the first
            seed and fold; the matrix's runs then train at the chosen rates.
        lr_grid: explicit grids, ``strategy=a,b,c`` each (win over ``lr_sweep``'s).
        tune_fraction: the share of the training cases the sweep tunes on (by patient).

    Raises:
        InputError: see :func:`plan`; nothing is written then.
    """
    out = Path(out)
    _check_postprocess(postprocess, folds)
    fold_list, counts = _axes(data, folds, train_cases)
    todo = cells(strategies, seeds, shard, counts, fold_list, parse_models(model))
    train_cmd = launcher_command(launcher) + ["-m", "clipseg_bench.cli"]
    strategy_lr = strategy_lr or {}
    overrides = {**(extra or {}), "epochs": epochs, "max_steps": max_steps, "batch_size": batch_size}
    args = dict(data=data, model=model, out=out, config=config, overrides=overrides, strategy_lr=strategy_lr)
    sweep = _sweep_of(args, strategies, seeds[0], fold_list[0], lr_sweep, lr_grid, tune_fraction)
    chosen = choices(out, sweep) if sweep else {}
    cfgs = plan(**args, todo=todo, overwrite=overwrite, tuned=_tuned(chosen))
    # One call per shard of a folder at a time; shards run side by side (their cells differ).
    scope = f"shard{parse_shard(shard)[0]}"
    with output_lock(out, "benchmark", scope=scope):
        _refuse_other_settings(out, cfgs)  # again: a call that ended meanwhile may have recorded others
        if test:
            return _evaluate_test(out, todo, postprocess)
        return _run_cells(
            out,
            shard,
            todo,
            cfgs,
            args=args,
            sweep=sweep,
            epochs=epochs,
            train_cmd=train_cmd,
            evaluate=evaluate,
            postprocess=postprocess,
        )


def _run_cells(
    out: Path,
    shard,
    todo,
    cfgs,
    *,
    args: dict,
    sweep: SweepPlan | None,
    epochs,
    train_cmd,
    evaluate,
    postprocess,
) -> list[dict]:
    """Record the call, run this shard's learning-rate sweep points if any, then train (and
    evaluate) every cell of ``todo`` whose rate is settled (the BENCH folder is locked), and with
    ``postprocess`` "auto" choose the clean-up on the folder's out-of-fold scores.

    Args:
        args: :func:`plan`'s shared arguments (data, model, out, config, overrides, strategy_lr).
    """
    (out / "runs").mkdir(parents=True, exist_ok=True)
    _write_record(
        out,
        shard,
        todo=todo,
        model=args["model"],
        data=args["data"],
        epochs=epochs,
        cfgs=cfgs,
        strategy_lr=args["strategy_lr"],
    )
    chosen = {}
    if sweep:
        chosen = _run_sweep(sweep, out=out, shard=shard, train_cmd=train_cmd)
        cfgs = plan(**args, todo=todo, overwrite=True, tuned=_tuned(chosen))
    ready = [c for c in todo if sweep is None or c.strategy in chosen or c.strategy not in sweep.defaults]
    results = [
        _run_cell(RunFolder(out / "runs" / c.name), cfgs[c], out=out, train_cmd=train_cmd, evaluate=evaluate)
        if c in ready
        else _pending(out, c)
        for c in todo
    ]
    if postprocess == "auto":
        _choose_postprocess(out)
    _print_summary(results, out)
    return results


def _print_summary(results: list[dict], out: Path) -> None:
    """One line: how many cells are done, which failed, how many wait for a sweep."""
    failed = [r["run"] for r in results if r["status"] == "failed"]
    waiting = sum(r["status"] == "pending" for r in results)
    print(
        f"[benchmark] {len(results) - len(failed) - waiting}/{len(results)} runs done in {out}"
        + (f"; failed: {', '.join(failed)} (re-run the same command to retry)" if failed else "")
        + (f"; {waiting} waiting for their learning-rate sweep" if waiting else "")
    )


def _sweep_of(args: dict, strategies, seed: int, fold, n_points, grid, fraction: float) -> SweepPlan | None:
    """The call's learning-rate sweep (on the first seed and fold), checked; None without one.

    Args:
        args: :func:`plan`'s shared arguments (data, model, out, config, overrides, strategy_lr).
    """
    if not (n_points or grid):
        return None
    models = parse_models(args["model"])
    if len(models) > 1:  # a rate is chosen per strategy, and each model would want its own
        raise FieldError("lr_sweep", f"sweeps one model at a time; this call names {len(models)} models")
    return plan_sweep(
        out=args["out"],
        data=args["data"],
        strategies=strategies,
        n_points=n_points,
        grids=parse_lr_grid(grid),
        fraction=fraction,
        seed=seed,
        fold=fold,
        config=args["config"],
        values={**args["overrides"], "data": str(args["data"]), "model": models[0]},
        strategy_lr=args["strategy_lr"],
    )


def _tuned(chosen: dict[str, dict]) -> dict[str, dict[str, float]]:
    """The sweep's choices as config values per strategy: {strategy: {field: rate}}."""
    return {s: {c["field"]: c["chosen"]} for s, c in chosen.items()}


def _run_sweep(sweep: SweepPlan, *, out: Path, shard: str | None, train_cmd: list[str]) -> dict[str, dict]:
    """Train this shard's share of the grid points (finished ones are skipped, unfinished ones
    resumed), then record every strategy whose points have all finished; returns those choices."""
    i, n = parse_shard(shard)
    for point in list(sweep.points)[i::n]:
        cfg = sweep.points[point]
        _run_cell(RunFolder(cfg.out), cfg, out=out, train_cmd=train_cmd, evaluate=False)
    chosen = choices(out, sweep)
    if chosen:
        write_choices(out, sweep, chosen)
    for s, c in chosen.items():
        edge = " (at the grid's edge: widen the grid)" if c["at_edge"] else ""
        print(
            f"[benchmark] {s}: {c['field']} {c['chosen']:.3g} chosen on {len(sweep.tune_cases)} tune cases{edge}"
        )
    return chosen


def _pending(out: Path, cell: Cell) -> dict:
    """A cell whose strategy's sweep is not complete yet (another shard's points are unfinished)."""
    print(
        f"[benchmark] {cell.name}: waiting for its learning-rate sweep (re-run once every shard's points are done)"
    )
    return {"run": str(out / "runs" / cell.name), "status": "pending"}


def _run_cell(run: RunFolder, cfg: TrainConfig, *, out: Path, train_cmd: list[str], evaluate: bool) -> dict:
    """Train (or resume) and evaluate one cell unless it is done; its status dict for the summary."""
    log = out / "logs" / f"{run.path.name}.log"
    status = run.status()
    if status == RunStatus.EVALUATED or (status == RunStatus.FINISHED and not evaluate):
        print(f"[benchmark] {run.path.name}: done, skipped")
        return {"run": str(run.path), "status": "skipped"}
    if status != RunStatus.FINISHED:
        resume = status != RunStatus.MISSING and run.has_config()
        if not resume and run.path.exists():
            shutil.rmtree(run.path)  # without run.json and config.yaml it never started training
        (out / "configs").mkdir(exist_ok=True)
        (out / "logs").mkdir(exist_ok=True)
        cfg_path = out / "configs" / f"{run.path.name}.yaml"
        save_config(cfg, cfg_path)
        print(f"[benchmark] {run.path.name}: {'resuming' if resume else 'training'}")
        # Train and evaluate in one process: a second Python + torch start-up per run is waste.
        flags = (["--resume"] if resume else []) + (["--evaluate"] if evaluate else [])
        rc = _call(train_cmd + ["train", "--config", str(cfg_path), *flags], log)
        if rc != 0:
            _mark_failed(run, f"train exited with {rc}")
            return {
                "run": str(run.path),
                "status": "failed",
                "why": f"train exited with {rc}",
                "log": str(log),
            }
    if evaluate and run.status() != RunStatus.EVALUATED:
        rc = _call([sys.executable, "-m", "clipseg_bench.cli", "evaluate", "--run", str(run.path)], log)
        if rc != 0:
            return {
                "run": str(run.path),
                "status": "failed",
                "why": f"evaluate exited with {rc}",
                "log": str(log),
            }
    return {"run": str(run.path), "status": "done"}


def _check_postprocess(postprocess: str, folds: str | None) -> None:
    """``--postprocess``: none, or auto with folds (the only scores to choose on that the report does
    not score are out-of-fold ones)."""
    if postprocess not in ("none", "auto"):
        raise FieldError("postprocess", f"must be none or auto, got {postprocess!r}")
    if postprocess == "auto" and folds is None:
        raise FieldError(
            "postprocess",
            "auto chooses per organ on out-of-fold scores and needs --folds: without folds the only "
            "scores are the val cases the report scores",
        )


def _axes(data, folds: str | None, train_cases: str | None) -> tuple[list[int | None], list[int | None]]:
    """The fold and training-case axes of a call, checked against the data.

    With folds, training-case counts are counted against the smallest fold's training set; a count
    stands for "all" only when every fold's training set has exactly that many cases.

    Raises:
        FieldError: a fold the data lacks, a count above a fold's training cases.
        InputError: a train split without cases.
    """
    from clipseg_bench.data.dataset import PreparedData

    prepared = PreparedData(data)
    fold_list = parse_folds(folds, prepared.n_folds)
    if train_cases is None:
        return fold_list, [None]
    sizes = {len(prepared.cases("train", f)) for f in fold_list}
    if min(sizes) == 0:
        raise InputError(data, "the train split has no cases")
    # Folds of different sizes: "all" differs between them, so a count stays a count.
    return fold_list, parse_train_cases(train_cases, min(sizes), collapse=len(sizes) == 1)


def _choose_postprocess(out: Path) -> None:
    """``--postprocess auto``: choose the clean-up on the folder's out-of-fold scores and record it."""
    from clipseg_bench.study.choices import CHOICE_FILE, record_choices

    choices, skipped = record_choices(out)
    for c in choices:
        lcc = [k for k, m in c["organs"].items() if m == "lcc"]
        print(
            f"[benchmark] {c['strategy']} ({c['train_cases']} cases): lcc for {', '.join(lcc) or 'no organ'}, "
            f"chosen on {len(c['chosen_on']['cases'])} out-of-fold cases"
        )
    for s in skipped:
        print(f"[benchmark] {s['strategy']} ({s['train_cases']} cases): no clean-up chosen ({s['why']})")
    print(f"[benchmark] clean-up choices -> {out / CHOICE_FILE}")


def _evaluate_test(out: Path, todo: list[Cell], postprocess: str) -> list[dict]:
    """``--test``: evaluate every cell's finished run on the held-out test split (metrics-test.json);
    a run already evaluated there with the same clean-up is skipped, an unfinished one fails."""
    results = []
    for cell in todo:
        run = RunFolder(out / "runs" / cell.name)
        log = out / "logs" / f"{cell.name}.log"
        done = run.metrics("test") if run.has_metrics("test") else None
        if done is not None and done.get("postprocess") == postprocess:
            print(f"[benchmark] {cell.name}: test split done, skipped")
            results.append({"run": str(run.path), "status": "skipped"})
            continue
        if run.record().status != RunStatus.FINISHED:
            why = "not finished: train it first (the same command without --test)"
            results.append({"run": str(run.path), "status": "failed", "why": why, "log": str(log)})
            continue
        log.parent.mkdir(exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "clipseg_bench.cli",
            "evaluate",
            "--run",
            str(run.path),
            "--split",
            "test",
        ]
        rc = _call(cmd + ["--postprocess", postprocess], log)
        status = {"status": "done"} if rc == 0 else {"status": "failed", "why": f"evaluate exited with {rc}"}
        results.append({"run": str(run.path), **status, "log": str(log)})
    failed = sum(r["status"] == "failed" for r in results)
    print(f"[benchmark] test split: {len(results) - failed}/{len(results)} runs evaluated in {out}")
    return results


def raise_failed(results: list[dict], out: Path) -> None:
    """Fail the command when any run failed, naming them (exit code 1 through the CLI).

    Raises:
        RunFailed: naming the failed runs and the first one's log.
    """
    failed = [r for r in results if r["status"] == "failed"]
    if failed:
        names = ", ".join(Path(r["run"]).name for r in failed)
        raise RunFailed(
            out,
            f"{len(failed)} of {len(results)} runs failed: {names} ({failed[0]['why']}; "
            f"see {failed[0]['log']}); re-run the same command to retry them",
        )


def _mark_failed(run: RunFolder, why: str) -> None:
    """Record a failure in run.json (created when training refused before writing anything)."""
    try:
        record = run.record()
    except InputError:  # unreadable: replaced by the failure record
        record = RunRecord(status=RunStatus.MISSING)
    if record.status in (RunStatus.MISSING, RunStatus.RUNNING, "unknown"):
        try:
            check_unlocked(run.path, TRAIN_LOCK)  # a `train` of its own writes it: its record is its own
        except InputError:
            return
        run.create()
        run.write_record(record.with_status(RunStatus.FAILED, error=why))
