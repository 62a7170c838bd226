"""`benchmark --lr-sweep N` / `--lr-grid`: each strategy's learning rate chosen on cases the report
never scores.

A tune subset is carved from the training cases, by patient and fixed by the seed (``tune_fraction``,
default 20%). Every grid point of a strategy trains once, on one seed and one fold, on the other
training cases, and is scored on the tune cases (run.json's final val Dice, which a sweep run
computes on its tune slices: TrainConfig.tune_cases); the cases the report scores stay sealed (their
arrays are not opened). The best point's rate then trains every reported run of that strategy on
all its training cases. The field swept is the strategy's ``tuned_rate``: ``lr`` (its own
trainables), ``decoder_lr`` for decoder-only.

Grid points live in ``BENCH/sweep/<strategy>-lr<rate>/`` (ordinary run folders, resumed and skipped
like the matrix's runs); shards split the points, and the choice is made once every point of a
strategy has finished, whichever shard finishes last: ``BENCH/lr-sweep.json`` records the grid, each
point's tune score and compute, the choice, whether it sits at the grid's edge, and the tune cases.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from clipseg_bench.config import TrainConfig, load_config, resolved
from clipseg_bench.errors import FieldError, InputError
from clipseg_bench.provenance import read_json_object, write_json_atomic
from clipseg_bench.run_folder import RunFolder, RunStatus
from clipseg_bench.strategies import get

SWEEP_FILE = "lr-sweep.json"
SWEEP_DIR = "sweep"


def grid_around(center: float, n: int) -> list[float]:
    """``n`` log-spaced rates around ``center``, a factor sqrt(10) apart (3 points: x1/sqrt(10), x1,
    x sqrt(10); 5 points: x1/10 ... x10), rounded to 3 significant digits (run names show them)."""
    exponents = (np.arange(n) - (n - 1) / 2) / 2
    return [float(f"{center * 10**e:.3g}") for e in exponents]


def parse_lr_grid(specs: list[str] | None) -> dict[str, list[float]]:
    """``--lr-grid full=1e-5,3e-5,1e-4`` (repeatable) -> {strategy: sorted rates}.

    Raises:
        FieldError: ``lr_grid``, naming the item that is not strategy=rate,rate,... with rates > 0.
    """
    grids = {}
    for spec in specs or []:
        name, sep, values = spec.partition("=")
        try:
            rates = sorted({float(v) for v in values.split(",") if v.strip()})
        except ValueError:
            rates = []
        if not sep or not name.strip() or not rates or min(rates) <= 0:
            raise FieldError("lr_grid", f"expected strategy=rate,rate,... with rates > 0, got {spec!r}")
        grids[name.strip()] = rates
    return grids


def carve_tune_cases(train_cases: list[str], fraction: float, seed: int) -> list[str]:
    """The tune cases: ``fraction`` of the training cases (at least one, never all), drawn by
    patient from ``seed`` alone (a case id is a patient; prepare --groups keeps a patient's scans in
    one split).

    Raises:
        FieldError: ``tune_fraction`` outside (0, 1), or fewer than 2 training cases.
    """
    if not 0 < fraction < 1:
        raise FieldError("tune_fraction", f"must be between 0 and 1, got {fraction}")
    if len(train_cases) < 2:
        raise FieldError("lr_sweep", "needs at least 2 training cases: one to tune on, one to train on")
    k = min(max(1, round(fraction * len(train_cases))), len(train_cases) - 1)
    order = np.random.default_rng([seed, 0x5EE9]).permutation(sorted(train_cases))
    return sorted(str(c) for c in order[:k])


@dataclass(frozen=True)
class SweepPoint:
    """One grid point: ``strategy`` trained with ``field`` (``lr`` or ``decoder_lr``) at ``rate``."""

    strategy: str
    field: str
    rate: float

    @property
    def name(self) -> str:
        return f"{self.strategy}-{'dlr' if self.field == 'decoder_lr' else 'lr'}{self.rate:.3g}"


@dataclass
class SweepPlan:
    """A checked sweep: its points and their configs, the defaults it is centred on, the tune cases."""

    points: dict[SweepPoint, TrainConfig]
    defaults: dict[str, float]
    tune_cases: list[str]
    seed: int
    fold: int | None
    fraction: float

    def strategy_points(self, strategy: str) -> list[SweepPoint]:
        return [p for p in self.points if p.strategy == strategy]


def plan_sweep(
    *,
    out: Path,
    data,
    strategies: list[str],
    n_points: int | None,
    grids: dict[str, list[float]],
    fraction: float,
    seed: int,
    fold: int | None,
    config: str | None,
    values: dict,
    strategy_lr: dict[str, float],
) -> SweepPlan:
    """Every grid point's config, checked, writing nothing.

    Args:
        n_points: ``--lr-sweep N`` (a grid of N around each strategy's default), or None.
        grids: explicit grids per strategy (``--lr-grid``); they win over ``n_points``.
        seed, fold: the one seed and fold the sweep trains on.
        values: TrainConfig fields every point shares (the matrix's overrides, data, model).
        strategy_lr: ``--lrs``: a strategy's rate when it is not the swept field (or the centre).

    Raises:
        FieldError: an ``--lr-grid`` strategy not in the benchmark, or one with nothing to tune.
        InputError: a grid point's run folder that was trained with other settings.
    """
    from clipseg_bench.data.dataset import PreparedData

    stray = sorted(set(grids) - set(strategies))
    if stray:
        raise FieldError("lr_grid", f"{stray[0]!r} is not one of the benchmark's strategies")
    tune = carve_tune_cases(PreparedData(data).cases("train", fold), fraction, seed)
    points, defaults = {}, {}
    for s in strategies:
        field = get(s).tuned_rate
        if field is None:
            if s in grids:
                raise FieldError("lr_grid", f"{s} trains nothing: it has no rate to tune")
            continue
        base = {
            **values,
            "strategy": s,
            "seed": seed,
            "fold": fold,
            "train_cases": None,
            "lr": strategy_lr.get(s),
        }
        defaults[s] = getattr(resolved(load_config(config, {**base, "out": str(out)})), field)
        for rate in grids.get(s) or (grid_around(defaults[s], n_points) if n_points else []):
            point = SweepPoint(s, field, rate)
            run_out = str(out / SWEEP_DIR / point.name)
            points[point] = load_config(config, {**base, "out": run_out, field: rate, "tune_cases": tune})
    _refuse_changed_points(points)
    return SweepPlan(
        points=points, defaults=defaults, tune_cases=tune, seed=seed, fold=fold, fraction=fraction
    )


def _refuse_changed_points(points: dict[SweepPoint, TrainConfig]) -> None:
    """A grid point already trained with other settings (tune cases, steps...) is not reused."""
    for cfg in points.values():
        RunFolder(cfg.out).refuse_other_config(
            cfg, "a sweep point is reused only as it was run; choose another --out (or delete it to redo it)"
        )


def choices(out: Path, plan: SweepPlan) -> dict[str, dict]:
    """Each strategy whose grid points have all finished: its grid, scores, cost and choice.

    Returns:
        {strategy: {field, default, grid: [{rate, score, run, train_time_s, steps}], chosen,
        at_edge}}; a strategy with an unfinished point is left out.
    """
    done = {}
    for s, default in plan.defaults.items():
        grid = []
        for point in sorted(plan.strategy_points(s), key=lambda p: p.rate):
            record = RunFolder(plan.points[point].out).record()
            if record.status not in (RunStatus.FINISHED, RunStatus.EVALUATED):
                break
            timing = record.timing or {}
            grid.append(
                {
                    "rate": point.rate,
                    "score": (record.final or {}).get("val_dice"),
                    "run": f"{SWEEP_DIR}/{point.name}",
                    "train_time_s": timing.get("train_time_s", 0.0),
                    "steps": timing.get("steps"),
                }
            )
        else:
            if grid:
                done[s] = _choose(plan.strategy_points(s)[0].field, default, grid)
    return done


def _choose(field: str, default: float, grid: list[dict]) -> dict:
    """The best-scoring rate and whether it sits at the grid's edge.

    Points tied at the best score (equal to the score's 4th decimal: a model that predicts nothing
    scores the same at every rate) give no reason to move: the default wins among them if it is
    one, else the lowest rate; ``tied`` counts them.
    """
    scored = [g for g in grid if g["score"] is not None and np.isfinite(g["score"])]
    if not scored:
        raise InputError(grid[0]["run"], "no grid point has a tune score (did the tune cases keep slices?)")
    top = max(g["score"] for g in scored)
    best = [g for g in scored if round(g["score"], 4) == round(top, 4)]
    near_default = [g for g in best if np.isclose(g["rate"], default, rtol=1e-2)]
    chosen = (near_default or best)[0]
    at_edge = len(grid) > 1 and len(best) == 1 and chosen["rate"] in (grid[0]["rate"], grid[-1]["rate"])
    return {
        "field": field,
        "default": default,
        "grid": grid,
        "chosen": chosen["rate"],
        "at_edge": at_edge,
        "tied": len(best),
    }


def write_choices(out: Path, plan: SweepPlan, chosen: dict[str, dict]) -> None:
    """``BENCH/lr-sweep.json``: the tune cases, the seed and fold swept on, each strategy's grid and
    choice (strategies already recorded by another shard's call are kept)."""
    path = Path(out) / SWEEP_FILE
    old = read_json_object(path) if path.is_file() else {}
    write_json_atomic(
        path,
        {
            "tune_cases": plan.tune_cases,
            "tune_fraction": plan.fraction,
            "seed": plan.seed,
            "fold": plan.fold,
            "score": "final val Dice (2D) of the sweep run on the tune cases' slices",
            "strategies": {**(old.get("strategies") or {}), **chosen},
        },
    )


def read_choices(bench: Path) -> dict:
    """A BENCH folder's ``lr-sweep.json`` ({} without a sweep)."""
    path = Path(bench) / SWEEP_FILE
    return read_json_object(path) if path.is_file() else {}


def sweep_table(bench_dirs: list[Path]) -> pd.DataFrame:
    """One row per grid point of every BENCH folder's ``lr-sweep.json`` (shards merged: a strategy
    recorded by several is the same sweep).

    Returns:
        Columns strategy, field, rate, score, chosen, default, at_edge, tied, train_time_s, tune_cases;
        empty without a sweep.
    """
    rows, seen = [], set()
    for bench in bench_dirs:
        record = read_choices(bench)
        for s, c in (record.get("strategies") or {}).items():
            if s in seen:
                continue
            seen.add(s)
            for g in c["grid"]:
                rows.append(
                    {
                        "strategy": s,
                        "field": c["field"],
                        "rate": g["rate"],
                        "score": g["score"],
                        "chosen": g["rate"] == c["chosen"],
                        "default": bool(np.isclose(g["rate"], c["default"], rtol=1e-2)),
                        "at_edge": c["at_edge"],
                        "tied": c.get("tied", 1),
                        "train_time_s": g.get("train_time_s") or 0.0,
                        "tune_cases": len(record.get("tune_cases") or []),
                    }
                )
    columns = [
        "strategy",
        "field",
        "rate",
        "score",
        "chosen",
        "default",
        "at_edge",
        "tied",
        "train_time_s",
        "tune_cases",
    ]
    return pd.DataFrame(rows, columns=columns)


def _note(points: pd.DataFrame) -> str:
    """A strategy's sweep caveat: an optimum at the edge, or a best score several rates share."""
    if points["at_edge"].iloc[0]:
        return "optimum at the grid's edge: widen the grid"
    tied = int(points["tied"].iloc[0])
    return f"{tied} rates tie for the best score: the default (or the lowest) kept" if tied > 1 else ""


def sweep_display(sweep: pd.DataFrame, runs_time_s: dict[str, float]) -> pd.DataFrame:
    """The report's sweep table: per strategy the rate swept, default and chosen rate, each grid
    point's tune score, and the sweep's compute beside the reported runs' (its share of the
    strategy's whole cost).

    Args:
        sweep: :func:`sweep_table`.
        runs_time_s: per strategy, the summed training time of its reported (finished) runs.
    """
    rows = []
    for s, g in sweep.groupby("strategy", sort=False):
        sweep_s = float(g["train_time_s"].sum())
        total = sweep_s + runs_time_s.get(s, 0.0)
        default = g.loc[g["default"], "rate"]
        rows.append(
            {
                "strategy": s,
                "rate swept": g["field"].iloc[0],
                "default": f"{default.iloc[0]:.3g}" if len(default) else "–",
                "chosen": f"{g.loc[g['chosen'], 'rate'].iloc[0]:.3g}",
                "tune score per rate": ", ".join(
                    f"{r:.3g}: {'–' if sc is None or not np.isfinite(sc) else f'{sc:.3f}'}"
                    for r, sc in zip(g["rate"], g["score"])
                ),
                "sweep compute (s)": f"{sweep_s:.1f}",
                "share of the strategy's compute": f"{sweep_s / total:.0%}" if total else "–",
                "note": _note(g),
            }
        )
    return pd.DataFrame(rows)
