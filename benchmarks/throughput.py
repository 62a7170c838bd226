"""Efficiency benchmark (issue 6): our engine against what a typical CLIPSeg fine-tuning script does.

Parameter efficiency is not training efficiency unless the code skips the work frozen parts do not
need. This script measures, side by side in one run, with warm-up, on the real CLIPSeg-rd64
architecture (random weights at the real sizes, ``reference_config()``, no download) and on the tiny
one:

- per strategy, the training step time and masks/s of (a) the per-pair baseline a typical script
  runs and (b) our engine: the training loop's own step (``train.loop.train_epoch``) on the setup
  ``train()``'s own builder (``train.setup.build_training``) makes, data loader included;
- segmenting a volume for all 13 organs, both ways;
- the vision-encoder forward with and without truncation after the deepest layer the decoder reads;
- peak RSS of decoder-only training on cached features (a separate process), and what gradient
  checkpointing costs and saves;
- the share of step time spent loading data.

The baselines, honestly:

- ``decoder``: the stock ``CLIPSegForImageSegmentation.forward(input_ids, pixel_values,
  attention_mask)`` on P (image, prompt) pairs, each image repeated per prompt, then loss, backward,
  gradient clipping and AdamW on the decoder, exactly like a typical script.
- ``full``, ``adapter``, ``lora``, ``bitfit``: the stock forward cannot train them at all (it runs both
  encoders under ``no_grad``), so the fair per-pair baseline is our gradient-carrying forward without
  shared encoding: every pair encodes its own image and its own prompt again.
- ``segment``: the stock forward per slice with the slice repeated for the 13 organ prompts. It gets
  our preprocessing (done once per slice), which is cheaper than running the HF image processor per
  pair, so the baseline is if anything flattered.

Ours: B slices x K=13 prompts per step, each slice encoded once, the vision encoder stopped after the
deepest layer the decoder reads; for decoder-only the vision activations come from the fp16 feature
cache on disk (memory-mapped) and the prompt embeddings are computed once. Rates are compared in
masks/s, so the slow baselines are timed on fewer pairs than ours (the counts are in the table).
Each time is the minimum over repetitions (interference from other processes only ever adds time),
with the two sides of a comparison interleaved. Data comes from two phantom CTs prepared by
``clipseg-bench prepare`` into a temporary folder.

Peak memory is measured in a child process (this script with ``--probe``), as the peak RSS of that
process (VmHWM): it holds what ``train()`` holds, the whole model included.

Token ids for the real architecture come from the project's tiny tokenizer: the CLIP BPE vocabulary
would need a download, and with random weights only the sequence length matters. The random decoder
gets PyTorch's default init (``build_tiny`` does that): HF's N(0, 1) init saturates the decoder's
softmax, and the resulting denormal floats make its attention backward 5-10x slower on CPU, which a
pretrained checkpoint never shows.

CPU only (the targets of issue 6 are CPU numbers). ``--quick`` measures the real architecture for
``decoder`` and ``full`` only (gradient checkpointing on the tiny one) and the tiny one for every
strategy; without it, every strategy on both, gradient checkpointing's memory on both, and
``torch.compile`` on the tiny one. On a busy machine two OpenMP threads wait for each other at every
small operation, so timings get noisy; ``--threads 1`` is steadier there.

This file is the entry point (the command line, one architecture's measurements in order, the
result); each measurement is a module of ``throughput_parts/`` beside it (its ``__init__`` lists them).
Usage::

    python benchmarks/throughput.py --quick --json throughput.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from clipseg_bench.errors import ReportedError

# benchmarks/ is not a package: the measurements sit beside this script, in throughput_parts/.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput_parts.common import build_arch, check_prompts, make_prepared  # noqa: E402
from throughput_parts.memory import probe_memory, probe_rows, run_probe  # noqa: E402
from throughput_parts.overhead import OVERHEAD_GOAL, measure_overhead  # noqa: E402
from throughput_parts.plans import PLANS, Plan  # noqa: E402
from throughput_parts.report import (  # noqa: E402
    DATA_SHARE_TARGET,
    RSS_TARGET_MB,
    TARGETS,
    clean,
    format_summary,
    format_table,
    headline,
)
from throughput_parts.segment import measure_segment  # noqa: E402
from throughput_parts.steps import measure_strategy  # noqa: E402
from throughput_parts.truncation import measure_truncation  # noqa: E402

# --- the whole benchmark -----------------------------------------------------------------------


def measure_arch(arch_name: str, data_root: Path, plan: Plan, log) -> dict:
    """Everything for one architecture. Returns ``{"rows", "extras", "probe", "prompt_embeddings",
    "overhead"}`` (the trainer's overhead: only where the plan measures it, else None)."""
    from clipseg_bench.data.dataset import PreparedData

    data = PreparedData(data_root)
    t0 = time.perf_counter()
    arch = build_arch(arch_name)
    log(f"{arch_name}: model built in {time.perf_counter() - t0:.1f} s")
    prompt_check = check_prompts(arch)
    rows = measure_truncation(arch, plan, log)
    rows += measure_segment(arch, data, plan, log)
    extras = {}
    for strategy in plan.strategies:
        r, extras[strategy] = measure_strategy(arch, data, plan, strategy, log)
        rows += r
    overhead = measure_overhead(data_root, plan, log) if plan.overhead_reps else None
    del arch  # the probe process should not compete with this one for memory
    probe = run_probe(arch_name, data_root, plan, log) if plan.probe else None
    if probe:
        rows += probe_rows(arch_name, probe)
    return {
        "rows": rows,
        "extras": extras,
        "probe": probe,
        "prompt_embeddings": prompt_check,
        "overhead": overhead,
    }


def run_benchmark(*, archs: list[str], profile: str, log=print, workdir: Path | None = None) -> dict:
    """Run every measurement; returns the JSON-ready result (``ratios`` first).

    Args:
        archs: ``real`` and/or ``tiny``.
        profile: ``quick``, ``full`` or ``smoke`` (tests: minimal repetitions).
        log: progress messages.
        workdir: where the phantom dataset goes (a temporary folder by default).
    """
    from clipseg_bench.provenance import git_info, hardware_info

    t0 = time.perf_counter()
    load_start = os.getloadavg()
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="clipseg-throughput-")))
        data_root = make_prepared(workdir, size=64 if profile == "smoke" else 256)
        results = {arch: measure_arch(arch, data_root, PLANS[(arch, profile)], log) for arch in archs}
    head = headline(results)
    return {
        "ratios": head["ratios"],
        "targets": {
            **TARGETS,
            "decoder_cached_peak_rss_mb": RSS_TARGET_MB,
            "data_loading_share": DATA_SHARE_TARGET,
            "trainer_overhead": OVERHEAD_GOAL,
        },
        "pass": head["pass"],
        "headline_arch": head["arch"],
        "memory": head["memory"],
        "data_loading": head["data_loading"],
        "trainer_overhead": results["tiny"]["overhead"] if "tiny" in results else None,
        "rows": [r for a in archs for r in results[a]["rows"]],
        "extras": {a: results[a]["extras"] for a in archs},
        "prompt_embeddings": {a: results[a]["prompt_embeddings"] for a in archs},
        "plans": {a: asdict(PLANS[(a, profile)]) for a in archs},
        "profile": profile,
        "total_s": time.perf_counter() - t0,
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "hardware": hardware_info(),
        "git": git_info(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="fewer repetitions and sizes (< 5 min on 2 idle CPU cores)"
    )
    p.add_argument(
        "--smoke", action="store_true", help="tiny architecture only, minimal repetitions (for tests)"
    )
    p.add_argument("--arch", choices=["real", "tiny", "both"], default="both")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    # The memory probe re-runs this script in a child process with these:
    p.add_argument("--probe", choices=["real", "tiny"], help=argparse.SUPPRESS)
    p.add_argument("--probe-data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--probe-batch", type=int, default=4, help=argparse.SUPPRESS)
    p.add_argument("--probe-gc-batch", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: every model here is built locally
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.probe:
        print(json.dumps(probe_memory(a.probe, a.probe_data, batch=a.probe_batch, gc_batch=a.probe_gc_batch)))
        return 0

    profile = "smoke" if a.smoke else "quick" if a.quick else "full"
    archs = ["tiny"] if a.smoke else ["real", "tiny"] if a.arch == "both" else [a.arch]

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    threads = torch.get_num_threads()
    log(f"throughput benchmark ({profile}): {threads} torch threads, architectures {', '.join(archs)}")
    busy = os.getloadavg()[0]
    if busy > 0.5:
        log(
            f"note: load average {busy:.1f} at the start: other processes use the CPUs. Small operations suffer most "
            "(each waits for a descheduled OpenMP thread), so timings are noisy; --threads 1 is steadier then."
        )
    try:
        result = run_benchmark(archs=archs, profile=profile, log=log)
    except ReportedError as exc:  # e.g. prompts that embed alike: one line, no traceback
        log(f"error: {exc.message}")
        return exc.exit_code
    print(format_table(result["rows"]))
    print()
    print(format_summary(result))
    load = result["load_average"]
    print(
        f"\ntotal {result['total_s']:.0f} s; {torch.get_num_threads()} torch threads on {result['hardware']['cpu_count']} "
        f"CPUs ({result['hardware']['cpu']}); load average {load['start'][0]:.1f} at start, {load['end'][0]:.1f} at end"
    )
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(clean(result), indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
