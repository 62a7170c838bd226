"""The GPU check (issue 24): is the GPU path right, and does it keep the device busy?

It runs the real commands, not a loop of its own: for every registered strategy, in bf16,
``train()`` (Accelerate, the loader, the feature cache and its resident rows, the pair chunks, the
sync points), then ``evaluate`` on the val cases and ``segment --probabilities`` of one CT, on

- the real-size CLIPSeg-rd64 architecture with random weights (``reference_config(tokenizer=...)``,
  nothing downloaded), fed the project's tiny tokenizer with that tokenizer's bos/eos/pad ids in its
  text config (with CLIP's ids CLIP pools the first token and all 13 organ prompts embed alike),
  saved to a folder that ``train --model`` loads;
- a synthetic PREPARED folder of 512 px slices (phantom CTs at 256 px, upsampled twice in plane).

Measured per strategy (one JSON): masks/s and the step-time breakdown from run.json (per phase the
device timeline from CUDA events, and the host's own time per phase with the time it sat blocked
reading the device, ``host_s.sync``, and waiting for the loader, ``host_s.data``); the GPU busy
fraction (union of kernel and copy time over wall time, torch.profiler with CUDA activity only,
between two of the loop's sync points after warm-up: steps ``log_every`` to the last); peak CUDA
memory; evaluate and segment times.

Checks (exit 1 when any fails, the JSON says which):

- the 13 organ prompts embed differently (``model.forward.prompt_separation``);
- our logits equal the stock forward's on the device (fp32 with TF32 off: 1e-4 of their scale;
  bf16: 2e-2);
- every run finishes, with finite losses and a passing gradient audit; evaluate and segment write
  their files;
- the GPU busy fraction reaches :data:`BUSY_THRESHOLDS` (decoder-only, whose step is mostly host
  work per kernel: 0.70; strategies that train an encoder: 0.85).

``--device cpu --quick`` runs the same path on the tiny architecture at 64 px in seconds (busy
fraction not measured); a test runs it. Usage::

    python benchmarks/gpu_check.py --out gpu_check_$(date +%F).json    # one GPU, < 10 min, nothing downloaded
    python benchmarks/gpu_check.py --device cpu --quick --out check.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

BUSY_THRESHOLDS = {"decoder": 0.70}  # strategies not named here: BUSY_DEFAULT
BUSY_DEFAULT = 0.85
LOGIT_BOUNDS = {"fp32": 1e-4, "bf16": 2e-2}  # max |ours - stock| over the stock logits' scale
LOG_EVERY = 10  # the runs' sync interval: the profiled window runs from step LOG_EVERY to the last


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- inputs: a model folder and a PREPARED folder --------------------------------------------------


def base_config(arch: str, image_size: int):
    """The model's config: rd64-refined's sizes with the tiny tokenizer's special-token ids
    (``reference_config(tokenizer=...)``), or the tiny configuration."""
    from clipseg_bench.model.families.clipseg import reference_config, tiny_config
    from clipseg_bench.model.tokenizer import build_tiny_tokenizer

    if arch == "real":
        return reference_config(tokenizer=build_tiny_tokenizer())
    return tiny_config(image_size=image_size)


def make_model(folder: Path, *, arch: str, image_size: int) -> Path:
    """A random CLIPSeg of :func:`base_config` with the tiny tokenizer, saved to ``folder`` (what
    ``train --model FOLDER`` loads)."""
    from clipseg_bench.model.families.clipseg import IMAGENET_MEAN, IMAGENET_STD, build_tiny
    from clipseg_bench.model.load import LoadedModel, save_model
    from clipseg_bench.model.tokenizer import build_tiny_tokenizer

    model = build_tiny(base_config(arch, image_size))
    loaded = LoadedModel(
        model, build_tiny_tokenizer(), image_size, IMAGENET_MEAN, IMAGENET_STD, spec=str(folder)
    )
    save_model(loaded, folder)
    return folder


def make_data(root: Path, *, cases: int, size: int) -> Path:
    """A PREPARED folder of ``cases`` phantom CTs with ``size`` px slices (phantoms are made at up to
    256 px and upsampled in plane: nearest for labels, linear for HU)."""
    import nibabel as nib
    from scipy import ndimage

    from clipseg_bench.data.phantom import make_phantom
    from clipseg_bench.data.prepare import prepare

    base = min(size, 256)
    factor = size / base
    for sub in ("images", "labels"):
        (root / "ct" / sub).mkdir(parents=True, exist_ok=True)
    for i in range(cases):
        image, labels, affine = make_phantom(seed=0, index=i, style="A", size=base)
        if factor != 1:
            image = (
                ndimage.zoom(image.astype(np.float32), (factor, factor, 1), order=1).round().astype(np.int16)
            )
            labels = ndimage.zoom(labels, (factor, factor, 1), order=0)
            affine = affine @ np.diag([1 / factor, 1 / factor, 1, 1])
        case = f"gpu{i:03d}"
        for arr, path in ((image, f"images/{case}_0000.nii.gz"), (labels, f"labels/{case}.nii.gz")):
            nib.save(nib.Nifti1Image(arr, affine), root / "ct" / path)
    return prepare(
        images=root / "ct" / "images",
        labels=root / "ct" / "labels",
        out=root / "prepared",
        val_fraction=0.25,
        seed=0,
        png=False,
        workers=min(8, os.cpu_count() or 1) if cases > 4 else 1,
    )


def prompt_check(model) -> dict:
    """Whether the 13 organ prompts get 13 different embeddings
    (:func:`~clipseg_bench.model.forward.prompt_separation`, ``ok`` = ``distinct``)."""
    from clipseg_bench.model.forward import prompt_separation, tokenize
    from clipseg_bench.model.tokenizer import build_tiny_tokenizer
    from clipseg_bench.organs import prompts

    device = next(model.parameters()).device
    tokens = tokenize(build_tiny_tokenizer(), prompts("name"))
    result = prompt_separation(model, tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
    return {**result, "ok": bool(result["distinct"])}


def logits_check(model, *, size: int, precision: str, batch: int = 2) -> dict:
    """Our forward against the stock ``CLIPSegForImageSegmentation.forward``, every image with every
    organ prompt, on the model's device. fp32 runs with TF32 off (bound 1e-4 of the logits' scale:
    TF32, on by default for convolutions, moves the stock head's transposed convolutions by ~1e-3);
    bf16 autocast within 2e-2 (8 mantissa bits)."""
    from clipseg_bench.model.families.clipseg import IMAGENET_MEAN, IMAGENET_STD
    from clipseg_bench.model.forward import forward, preprocess, tokenize
    from clipseg_bench.model.precision import autocast
    from clipseg_bench.model.tokenizer import build_tiny_tokenizer
    from clipseg_bench.organs import prompts

    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    slices = torch.randint(0, 256, (batch, size, size), dtype=torch.uint8, generator=g)
    px = preprocess(slices, size=size, mean=IMAGENET_MEAN, std=IMAGENET_STD).to(device)
    tokens = {k: v.to(device) for k, v in tokenize(build_tiny_tokenizer(), prompts("name")).items()}
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad(), autocast(device, "bf16" if precision == "bf16" else "no"):
            ours = forward(model.eval(), px, input_ids=ids, attention_mask=mask).float()
            k = ids.shape[0]
            stock = model(
                pixel_values=px.repeat_interleave(k, 0),
                input_ids=ids.repeat(batch, 1),
                attention_mask=mask.repeat(batch, 1),
            ).logits.float()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    scale = stock.abs().max().item()
    diff = (ours - stock.view_as(ours)).abs().max().item()
    bound = LOGIT_BOUNDS[precision]
    return {
        "max_abs_diff": diff,
        "scale": scale,
        "bound": bound,
        "ok": math.isfinite(diff) and diff <= bound * scale,
    }


# --- the GPU busy fraction ---------------------------------------------------------------------------


class ProfileWindow:
    """A torch.profiler window (CUDA activity only) between two of the loop's sync points.

    Passed to ``train(sync_hooks=...)``: it starts at the first reading at or after ``start`` steps
    and stops at the first at or after ``stop``. At both the host has just waited for the device,
    so the host's wall time between them is the device's window too.
    """

    def __init__(self, start: int, stop: int, trace: Path):
        self.start, self.stop, self.trace = start, stop, trace
        self.prof = None
        self.t0 = self.wall_s = None
        self.steps = 0

    def __call__(self, reading) -> None:
        from torch.profiler import ProfilerActivity, profile

        if self.prof is None and reading.step >= self.start and self.wall_s is None:
            self.prof = profile(activities=[ProfilerActivity.CUDA])
            self.prof.start()
            self.t0, self.first = time.perf_counter(), reading.step
        elif self.prof is not None and reading.step >= self.stop and reading.step > self.first:
            torch.cuda.synchronize()
            self.wall_s = time.perf_counter() - self.t0
            self.steps = reading.step - self.first
            self.prof.stop()
            self.prof.export_chrome_trace(str(self.trace))
            self.prof = None

    def busy(self) -> dict | None:
        """Kernel and copy time (their union) over the window's wall time, from the exported trace."""
        if self.wall_s is None:
            return None
        return busy_fraction(json.loads(self.trace.read_text()), self.wall_s, self.steps)


def busy_fraction(trace: dict, wall_s: float, steps: int) -> dict:
    """The share of ``wall_s`` in which the device ran a kernel, a copy or a memset.

    Args:
        trace: a Chrome trace (``export_chrome_trace``): events with ``cat`` ``kernel``,
            ``gpu_memcpy``, ``gpu_memset``, ``ts`` and ``dur`` in microseconds.
        wall_s: the window's wall time; steps: optimizer steps in it.
    """
    spans = sorted(
        (e["ts"], e["ts"] + e["dur"])
        for e in trace.get("traceEvents", [])
        if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e
    )
    busy_us, end = 0.0, -math.inf
    for a, b in spans:  # the union of the intervals: overlapping streams count once
        if b <= end:
            continue
        busy_us += b - max(a, end)
        end = b
    kernels = sum(1 for e in trace.get("traceEvents", []) if e.get("cat") == "kernel")
    return {
        "fraction": busy_us / 1e6 / wall_s if wall_s > 0 else None,
        "device_busy_s": busy_us / 1e6,
        "wall_s": wall_s,
        "steps": steps,
        "kernels_per_step": kernels / steps if steps else None,
    }


# --- one strategy ---------------------------------------------------------------------------------------


def check_strategy(name: str, *, model: Path, data: Path, work: Path, device, settings: dict) -> dict:
    """train(), evaluate and segment of one strategy, with its measurements and checks."""
    from clipseg_bench.config import TrainConfig
    from clipseg_bench.evaluation.evaluate import evaluate_run
    from clipseg_bench.evaluation.segment import segment
    from clipseg_bench.train.loop import train

    cfg = TrainConfig(
        data=str(data),
        out=str(work / "runs" / name),
        model=str(model),
        strategy=name,
        image_size=settings["image_size"],
        batch_size=settings["batch"],
        max_steps=settings["steps"],
        epochs=1,
        lr=1e-5,
        warmup_steps=0,
        val_every=0,
        log_every=LOG_EVERY,
        mixed_precision="bf16",
        threads=settings.get("threads"),
    )
    window = ProfileWindow(LOG_EVERY, settings["steps"], work / f"trace-{name}.json")
    hooks = [window] if device.type == "cuda" else []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    row: dict = {"strategy": name}
    try:
        run = train(cfg, sync_hooks=hooks)
        info = json.loads((run / "run.json").read_text())
        history = [float(x) for x in _history(run, "loss")]
        row.update(_run_row(info, history, window.busy()))
        t0 = time.perf_counter()
        metrics = evaluate_run(
            run=run, show_progress=False, device=str(device), max_cases=settings.get("eval_cases")
        )
        row["evaluate_s"] = time.perf_counter() - t0
        row["dice2d"] = metrics.get("dice2d")
        row.update(_segment_row(segment, run, data, work / "seg" / name, device))
        row["checks"] = _row_checks(name, row, device)
    except Exception as exc:  # a failed check, reported in the JSON, not a crash of the whole check
        row["checks"] = {"runs": False}
        row["error"] = f"{type(exc).__name__}: {exc}"
    row["ok"] = all(row["checks"].values())
    return row


def _history(run: Path, column: str) -> list:
    import pandas as pd

    return pd.read_csv(run / "history.csv")[column].tolist()


def _run_row(info: dict, losses: list, busy: dict | None) -> dict:
    timing = info.get("timing", {})
    steps = max(int(timing.get("steps") or 0), 1)
    return {
        "status": info.get("status"),
        "losses": losses,
        "finite": all(math.isfinite(x) for x in losses),
        "audit_ok": all(
            a["reached"] == a["trainable"] and a["frozen_changed"] == 0
            for a in info["gradient_audit"].values()
        ),
        "compute": info.get("compute"),
        "vision_features": info.get("vision_features"),
        "masks_per_s": timing.get("masks_per_s"),
        "steps": timing.get("steps"),
        "step_s": timing.get("train_time_s", 0.0) / steps,
        "clock": timing.get("clock"),
        "breakdown_s_per_step": {k: v / steps for k, v in timing.get("breakdown_s", {}).items()},
        "host_s_per_step": {k: v / steps for k, v in timing.get("host_s", {}).items()},
        "peak_mem_mb": timing.get("peak_mem_mb"),
        "peak_mem_kind": timing.get("peak_mem_kind"),
        "busy": busy,
    }


def _segment_row(segment, run: Path, data: Path, out: Path, device) -> dict:
    import nibabel as nib

    from clipseg_bench.data.dataset import PreparedData

    prepared = PreparedData(data)
    case = prepared.cases("val")[0]
    ct = Path(prepared.cases_meta[case]["image"])
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    mask = segment(run=run, ct=ct, out=out / "mask.nii.gz", probabilities=True, device=str(device))
    seconds = time.perf_counter() - t0
    probs = nib.load(out / "mask_probabilities.nii.gz")
    return {
        "segment_s": seconds,
        "segment_ok": nib.load(mask).shape == nib.load(ct).shape and probs.shape[:3] == nib.load(ct).shape,
    }


def _row_checks(name: str, row: dict, device) -> dict:
    checks = {
        "finished": row.get("status") == "finished",
        "finite_loss": row.get("finite", False),
        "gradient_audit": row.get("audit_ok", False),
        "segment": row.get("segment_ok", False),
    }
    busy = row.get("busy")
    if device.type == "cuda" and row.get("losses"):  # zero-shot trains nothing: no step to keep busy
        threshold = BUSY_THRESHOLDS.get(name, BUSY_DEFAULT)
        row["busy_threshold"] = threshold
        checks["busy"] = busy is not None and (busy["fraction"] or 0) >= threshold
    return checks


# --- the command ----------------------------------------------------------------------------------------


def settings_for(device: torch.device, quick: bool, args) -> dict:
    """What runs: the real architecture at 512 px data on CUDA; the tiny one at 64 px with ``--quick``."""
    real = args.arch == "real" or (args.arch is None and not quick)
    return {
        "arch": "real" if real else "tiny",
        "slice_px": 512 if real else 64,
        "image_size": 352 if real else 64,
        "cases": args.cases or (12 if real else 2),
        "eval_cases": None if real else 1,
        "batch": args.batch or (8 if real else 4),
        "steps": args.steps or (40 if real else 3),
        "threads": args.threads,
    }


def run_check(device: torch.device, settings: dict, work: Path) -> dict:
    """Build the inputs, check the prompts, then every strategy; the JSON document without provenance."""
    from clipseg_bench.data.dataset import PreparedData
    from clipseg_bench.strategies import available

    t0 = time.perf_counter()
    model = make_model(work / "model", arch=settings["arch"], image_size=settings["image_size"])
    data = make_data(work / "data", cases=settings["cases"], size=settings["slice_px"])
    kept = len(PreparedData(data).slices("train", kept_only=True))
    settings["steps"] = max(
        1, min(settings["steps"], kept // settings["batch"])
    )  # one epoch: no checkpoint inside
    log(
        f"inputs ready in {time.perf_counter() - t0:.0f} s: {kept} kept train slices, {settings['steps']} steps"
    )
    from clipseg_bench.model.load import load_model

    loaded = load_model(str(model)).model.to(device)  # as train() will load it
    prompts = prompt_check(loaded)
    log(
        f"prompt embeddings: min pairwise difference {prompts['separation']:.3g} (tolerance "
        f"{prompts['tolerance']:.3g}): {'ok' if prompts['ok'] else 'FAIL: the prompts coincide'}"
    )
    logits = {p: logits_check(loaded, size=settings["image_size"], precision=p) for p in LOGIT_BOUNDS}
    for p, r in logits.items():
        log(
            f"logits {p}: max |ours - stock| {r['max_abs_diff']:.3g} of {r['scale']:.3g}: {'ok' if r['ok'] else 'FAIL'}"
        )
    del loaded
    doc = {"settings": settings, "prompt_embeddings": prompts, "logits": logits, "strategies": []}
    if not prompts["ok"]:  # every mask would be conditioned alike: nothing after this means anything
        return doc
    for name in available():
        row = check_strategy(name, model=model, data=data, work=work, device=device, settings=settings)
        doc["strategies"].append(row)
        log(_summary(row))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return doc


def _summary(row: dict) -> str:
    if "error" in row:
        return f"{row['strategy']:>9}: FAIL {row['error']}"
    busy = row.get("busy") or {}
    parts = [
        f"{row['strategy']:>9}: {'ok' if row['ok'] else 'FAIL ' + ','.join(k for k, v in row['checks'].items() if not v)}",
        f"{row.get('masks_per_s') or 0:.0f} masks/s",
        f"step {1000 * row.get('step_s', 0):.1f} ms",
        f"host wait {1000 * row['host_s_per_step'].get('sync', 0):.1f} ms/step",
    ]
    if busy.get("fraction") is not None:
        parts.append(f"busy {busy['fraction']:.0%} (>= {row.get('busy_threshold', 0):.0%})")
    if row.get("peak_mem_mb"):
        parts.append(f"peak {row['peak_mem_mb']:.0f} MiB")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:1, cpu"
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny architecture at 64 px, 3 steps (seconds on CPU)"
    )
    p.add_argument("--arch", choices=["real", "tiny"], help="default: real, tiny with --quick")
    p.add_argument(
        "--out", "--json", dest="out", type=Path, default=Path("gpu_check.json"), help="the JSON to write"
    )
    p.add_argument("--steps", type=int, help="training steps per strategy (default 40, quick 3)")
    p.add_argument("--batch", type=int, help="slices per step (default 8, quick 4)")
    p.add_argument("--cases", type=int, help="phantom CTs in the synthetic folder (default 12, quick 2)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the network
    from clipseg_bench.provenance import git_info, hardware_info, write_json_atomic

    device = torch.device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    settings = settings_for(device, a.quick, a)
    log(f"gpu check on {device}: {settings}")
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        work = a.keep or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu_check_")))
        work.mkdir(parents=True, exist_ok=True)
        doc = run_check(device, settings, work)
    ok = (
        doc["prompt_embeddings"]["ok"]
        and all(r["ok"] for r in doc["logits"].values())
        and bool(doc["strategies"])
        and all(r["ok"] for r in doc["strategies"])
    )
    doc = {
        "ok": ok,
        "device": str(device),
        **doc,
        "busy_thresholds": {**BUSY_THRESHOLDS, "default": BUSY_DEFAULT},
        "total_s": time.perf_counter() - t0,
        "load_average": os.getloadavg(),
        "hardware": hardware_info(),
        "git": git_info(),
    }
    write_json_atomic(a.out, doc)
    log(f"{'all checks passed' if ok else 'SOME CHECKS FAILED'} in {doc['total_s']:.0f} s -> {a.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
