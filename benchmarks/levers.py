"""The quality levers study (issue 14): input channels x 3D clean-up, on the demo's study.

The demo's set-up (``clipseg_bench.study.demo``): a tiny CLIPSeg pretrained on phantom style A
(gray input), fine-tuned per strategy on the shifted style B. Here every strategy x seed runs once
per ``input_channels`` mode (gray, neighbors, windows), each from the same gray-pretrained
checkpoint, as a real study would start every mode from the one pretrained CLIP. ``evaluate``
scores each run with and without the ``lcc`` clean-up, so clean-up needs no runs of its own.

Writes ``OUT/levers/<mode>/`` (one BENCH folder per mode, each with its report.html),
``OUT/levers/levers.md`` and ``levers.json`` (val 3D DSC/NSD none/lcc, costs, mean ± std over
seeds, timings with the load average they were measured under). Skips what is done, so an
interrupted study continues where it stopped.

    python benchmarks/levers.py --out levers_out               # make levers
    python benchmarks/levers.py --out levers_out --strategies zeroshot,full --seeds 0
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from clipseg_bench.data.channels import CHANNEL_MODES
from clipseg_bench.evaluation.postprocess import POSTPROCESS_MODES
from clipseg_bench.provenance import write_json_atomic, write_text_atomic
from clipseg_bench.study.demo import COMMON, SIZES, demo_lrs, prepare_demo
from clipseg_bench.study.matrix import run_matrix
from clipseg_bench.study.report import write_report
from clipseg_bench.study.results import find_runs, strategy_order


def run_rows(bench: Path, mode: str) -> list[dict]:
    """One row per finished, evaluated run of a BENCH folder: val 3D scores per clean-up, costs."""
    rows = []
    for run in find_runs(bench):
        if not run.finished or run.metrics is None or "postprocess_3d" not in run.metrics:
            continue
        timing = run.info.get("timing", {})
        row = {
            "input_channels": mode,
            "strategy": run.strategy,
            "seed": run.seed,
            "trainable_params": run.info.get("params", {}).get("trainable"),
            "train_time_s": timing.get("train_time_s"),
            "cache_build_s": timing.get("cache_build_s"),
            "eval_time_s": run.metrics.get("eval_time_s"),
            "peak_mem_mb": timing.get("peak_mem_mb"),
        }
        for pp in POSTPROCESS_MODES:
            summary = run.metrics["postprocess_3d"][pp]["summary"]
            row[f"dsc_{pp}"], row[f"nsd_{pp}"] = summary["dsc"], summary["nsd"]
        rows.append(row)
    return rows


def summarize(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean ± std over seeds per (input_channels, strategy), with the clean-up gain."""
    rows = rows.assign(
        dsc_gain=rows["dsc_lcc"] - rows["dsc_none"], nsd_gain=rows["nsd_lcc"] - rows["nsd_none"]
    )
    cols = [
        "dsc_none",
        "dsc_lcc",
        "dsc_gain",
        "nsd_none",
        "nsd_lcc",
        "nsd_gain",
        "train_time_s",
        "eval_time_s",
    ]
    g = rows.groupby(["strategy", "input_channels"], sort=False)
    out = g[cols].agg(["mean", "std"])
    out.columns = [f"{c}_{s}" for c, s in out.columns]
    out["seeds"] = g.size()
    out = out.reset_index()
    order = {s: i for i, s in enumerate(strategy_order(set(out["strategy"])))}
    modes = {m: i for i, m in enumerate(CHANNEL_MODES)}
    key = out["strategy"].map(order) * 10 + out["input_channels"].map(modes)
    return out.iloc[np.argsort(key.to_numpy(), kind="stable")].reset_index(drop=True)


def markdown(summary: pd.DataFrame) -> str:
    def pm(r, c, d=3):
        m, s = r[f"{c}_mean"], r[f"{c}_std"]
        return f"{m:.{d}f} ± {s:.{d}f}" if np.isfinite(s) else f"{m:.{d}f}"

    table = pd.DataFrame(
        {
            "strategy": summary["strategy"],
            "channels": summary["input_channels"],
            "seeds": summary["seeds"],
            "val DSC": [pm(r, "dsc_none") for _, r in summary.iterrows()],
            "val DSC lcc": [pm(r, "dsc_lcc") for _, r in summary.iterrows()],
            "DSC gain": [pm(r, "dsc_gain") for _, r in summary.iterrows()],
            "val NSD": [pm(r, "nsd_none") for _, r in summary.iterrows()],
            "val NSD lcc": [pm(r, "nsd_lcc") for _, r in summary.iterrows()],
            "NSD gain": [pm(r, "nsd_gain") for _, r in summary.iterrows()],
            "train s": [pm(r, "train_time_s", 1) for _, r in summary.iterrows()],
            "eval s": [pm(r, "eval_time_s", 1) for _, r in summary.iterrows()],
        }
    )
    return table.to_markdown(index=False)


def loadavg() -> list[float]:
    return (
        [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
        if Path("/proc/loadavg").exists()
        else []
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="levers_out", help="study folder (the demo's stages are made here)")
    ap.add_argument("--strategies", default="zeroshot,full,decoder,lora")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--modes", default=",".join(CHANNEL_MODES))
    ap.add_argument("--quick", action="store_true", help="the demo's quick sizes (smoke test)")
    a = ap.parse_args()
    out = Path(a.out)
    t0, load_start = time.perf_counter(), loadavg()
    size = SIZES["quick" if a.quick else "study"]  # "study": the size the README's table was measured at
    pretrained = prepare_demo(out, size=size)
    prepared_b = out / "prepared_B"
    steps = size.steps
    rows, per_mode_s = [], {}
    for mode in a.modes.split(","):
        t_mode = time.perf_counter()
        bench = out / "levers" / mode
        run_matrix(
            data=prepared_b,
            model=str(pretrained),
            strategies=a.strategies.split(","),
            seeds=[int(s) for s in a.seeds.split(",")],
            epochs=1000,
            max_steps=steps,
            out=bench,
            strategy_lr=demo_lrs(a.strategies.split(",")),
            extra={**COMMON, "val_every": 0, "input_channels": mode},
        )
        write_report([bench])
        per_mode_s[mode] = round(time.perf_counter() - t_mode, 1)
        rows += run_rows(bench, mode)
    table = pd.DataFrame(rows)
    summary = summarize(table)
    md = markdown(summary)
    doc = {
        "strategies": a.strategies.split(","),
        "seeds": [int(s) for s in a.seeds.split(",")],
        "modes": a.modes.split(","),
        "fine_tune_steps": steps,
        "wall_s": round(time.perf_counter() - t0, 1),
        "wall_s_per_mode": per_mode_s,
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
        "cpus": os.cpu_count(),
        "runs": rows,
        "summary": json.loads(summary.to_json(orient="records")),
    }
    write_json_atomic(out / "levers" / "levers.json", doc)
    write_text_atomic(out / "levers" / "levers.md", md + "\n")
    print(md)
    print(f"\nlevers: {doc['wall_s']:.0f} s, load average {load_start} -> {doc['loadavg_end']}")


if __name__ == "__main__":
    main()
