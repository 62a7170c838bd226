"""A prepared GPU check (issue 11): every strategy on the real-size CLIPSeg, bf16 and fp32, on one device.

On the architecture of ``CIDAS/clipseg-rd64-refined`` with random weights (``reference_config()``
with the tiny tokenizer's special-token ids; nothing is downloaded): first, the 13 organ prompts must
get 13 different embeddings (with CLIP's own end-of-text id, which the tiny tokenizer never emits,
CLIP pools the first token and every prompt embeds alike); then, for every registered strategy and
for fp32 and bf16 (``torch.autocast`` with bfloat16, which is what Accelerate's
``--mixed-precision bf16`` applies around the forward):

- a few training steps: B slices x K organ prompts through ``PromptedModule`` (the module the
  trainer optimises), the trainer's loss and fused AdamW; every loss must be finite, and the
  gradient audit (``train.audit``) must pass: every trainable tensor reached at the first step,
  no frozen tensor changed at the end;
- masks per second over the timed steps (after one warm-up step, device synchronised) and peak
  CUDA memory (``torch.cuda.max_memory_allocated``; None on CPU);

and, once per precision, our logits against the stock ``CLIPSegForImageSegmentation.forward`` on the
device. In fp32 both run with TF32 off (cuDNN enables it for convolutions by default, which would
make the stock head's transposed convolutions differ from our matmul chain by ~1e-3); the bound is
1e-4 of the logits' scale. Under bf16 autocast the bound is 2e-2 (bf16 keeps 8 mantissa bits).

Decoder-only runs its frozen encoder live here (the trainer would read a feature cache): this is a
check of numerics, memory and speed of the forward and backward, not of the data path.

Writes one JSON file and exits 1 if any check fails. ``--device cpu --quick`` runs the same checks on
the tiny architecture in seconds (a test does that); the real architecture runs on CUDA, or on CPU
when asked with ``--arch real``. Usage::

    python benchmarks/gpu_check.py --json gpu_check.json                 # CUDA if present
    python benchmarks/gpu_check.py --device cpu --quick --json check.json
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from pathlib import Path

import torch

PRECISIONS = ("fp32", "bf16")
LOGIT_BOUNDS = {"fp32": 1e-4, "bf16": 2e-2}  # max |ours - stock|, as a share of max |stock|


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def base_model(arch: str, image_size: int):
    """A randomly initialised CLIPSeg (decoder with PyTorch's default init, as ``build_tiny`` gives it),
    its text config pooling at the tiny tokenizer's end-of-text token (the prompts are tokenized by it)."""
    from clipseg_bench.model.families.clipseg import build_tiny, reference_config, tiny_config
    from clipseg_bench.model.tokenizer import build_tiny_tokenizer

    if arch == "real":
        return build_tiny(reference_config(tokenizer=build_tiny_tokenizer()))
    return build_tiny(tiny_config(image_size=image_size))


def prompt_check(model) -> dict:
    """Whether the 13 organ prompts get 13 different embeddings (:func:`~clipseg_bench.model.forward.prompt_separation`).

    All 13, whatever ``--quick`` trains on: identical embeddings (a text config pooling at an id
    the tokenizer never emits) would let every other check pass while every mask sees the same prompt.
    """
    from clipseg_bench.model.forward import prompt_separation, tokenize
    from clipseg_bench.model.tokenizer import build_tiny_tokenizer
    from clipseg_bench.organs import prompts

    tokens = tokenize(build_tiny_tokenizer(), prompts("name"))
    return prompt_separation(model, tokens["input_ids"], tokens["attention_mask"])


def make_inputs(*, batch: int, prompts: int, size: int, device: torch.device, seed: int = 0) -> dict:
    """Random uint8 slices preprocessed for CLIPSeg, organ prompts tokenized, and random targets."""
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from clipseg_bench.model.forward import preprocess, tokenize
    from clipseg_bench.model.tokenizer import build_tiny_tokenizer
    from clipseg_bench.organs import ORGANS
    from clipseg_bench.organs import prompts as organ_prompts

    g = torch.Generator().manual_seed(seed)
    slices = torch.randint(0, 256, (batch, size, size), dtype=torch.uint8, generator=g)
    tokens = tokenize(build_tiny_tokenizer(), organ_prompts("name", ORGANS[:prompts]))
    return {
        "pixel_values": preprocess(
            slices, size=size, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD
        ).to(device),
        "input_ids": tokens["input_ids"].to(device),
        "attention_mask": tokens["attention_mask"].to(device),
        "targets": (torch.rand(batch, prompts, size, size, generator=g) > 0.7).float().to(device),
    }


def train_check(model, inputs: dict, *, device: torch.device, precision: str, steps: int) -> dict:
    """A few training steps of ``model`` (strategy applied): losses, audit, masks/s, peak memory."""
    from clipseg_bench.model.forward import encode_prompts, text_trainable
    from clipseg_bench.model.prompted import PromptedModule
    from clipseg_bench.train.audit import GradientAudit
    from clipseg_bench.train.losses import segmentation_loss
    from clipseg_bench.train.setup import make_optimizer

    module = PromptedModule(model, inputs["input_ids"], inputs["attention_mask"]).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, lr=1e-4, weight_decay=1e-4) if params else None
    audit = GradientAudit.start(model)
    prompt_emb = None
    if not text_trainable(model):  # computed once, as the trainer does
        with torch.no_grad():
            prompt_emb = encode_prompts(model, inputs["input_ids"], inputs["attention_mask"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, timed = [], 0.0
    for step in range(steps + 1):  # step 0 warms up and is not timed
        _sync(device)
        t0 = time.perf_counter()
        with torch.set_grad_enabled(optimizer is not None), _autocast(device, precision):
            logits = module(inputs["pixel_values"], prompt_emb=prompt_emb)
        loss = segmentation_loss(logits, inputs["targets"])
        if optimizer is not None:
            loss.backward()
            if step == 0:
                audit.check_reached(model)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if step:
            timed += time.perf_counter() - t0
        losses.append(loss.item())
    audit.check_frozen(model)
    masks = inputs["targets"].shape[0] * inputs["targets"].shape[1] * steps
    return {
        "losses": losses,
        "finite": all(math.isfinite(x) for x in losses),
        "masks_per_s": masks / timed if timed else None,
        "peak_cuda_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "gradient_audit": audit.record(),
    }


def logits_check(model, inputs: dict, *, device: torch.device, precision: str) -> dict:
    """Our forward against the stock one, every image with every prompt, on ``device``."""
    from clipseg_bench.model.forward import forward

    model = model.to(device).eval()
    px, ids, mask = inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]
    b, k = px.shape[0], ids.shape[0]
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad(), _autocast(device, precision):
            ours = forward(model, px, input_ids=ids, attention_mask=mask).float()
            stock = model(
                pixel_values=px.repeat_interleave(k, 0),
                input_ids=ids.repeat(b, 1),
                attention_mask=mask.repeat(b, 1),
            ).logits.float()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    scale = stock.abs().max().item()
    diff = (ours - stock.view_as(ours)).abs().max().item()
    return {
        "max_abs_diff": diff,
        "scale": scale,
        "relative": diff / scale if scale else None,
        "bound": LOGIT_BOUNDS[precision],
        "ok": math.isfinite(diff) and diff <= LOGIT_BOUNDS[precision] * scale,
    }


def run_checks(
    *, arch: str, device: torch.device, batch: int, prompts: int, size: int, steps: int, log
) -> dict:
    """The prompt-embedding check, every strategy x precision training check, and the logits check per precision."""
    from clipseg_bench.errors import GradientAuditError
    from clipseg_bench.strategies import apply_strategy, available

    base = base_model(arch, size)
    separation = prompt_check(base)
    log(
        f"prompt embeddings: closest two of {separation['prompts']} differ by {separation['separation']:.3g}: "
        + ("ok" if separation["distinct"] else "FAIL, the prompts embed alike")
    )
    inputs = make_inputs(batch=batch, prompts=prompts, size=size, device=device)
    logits = {p: logits_check(copy.deepcopy(base), inputs, device=device, precision=p) for p in PRECISIONS}
    for p, r in logits.items():
        log(
            f"logits {p}: max |ours - stock| {r['max_abs_diff']:.3g} of {r['scale']:.3g}: {'ok' if r['ok'] else 'FAIL'}"
        )
    checks = []
    for name in available():
        for precision in PRECISIONS:
            model = copy.deepcopy(base)
            apply_strategy(model, name)
            row = {"strategy": name, "precision": precision}
            try:
                row.update(
                    train_check(model.to(device), inputs, device=device, precision=precision, steps=steps)
                )
                row["ok"] = row["finite"]
            except (GradientAuditError, RuntimeError) as exc:  # a failed check, reported, not a crash
                row.update(ok=False, error=f"{type(exc).__name__}: {exc}")
            checks.append(row)
            rate = f"{row['masks_per_s']:.1f} masks/s" if row.get("masks_per_s") else ""
            mem = f", peak {row['peak_cuda_mb']:.0f} MiB" if row.get("peak_cuda_mb") else ""
            log(
                f"{name:>9} {precision}: {'ok' if row['ok'] else 'FAIL ' + row.get('error', 'loss not finite')} {rate}{mem}"
            )
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return {"prompt_embeddings": separation, "logits": logits, "checks": checks}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:1, cpu"
    )
    p.add_argument("--arch", choices=["real", "tiny"], help="default: real on CUDA, tiny on CPU")
    p.add_argument(
        "--quick", action="store_true", help="fewer steps and prompts, smaller batch (seconds on CPU)"
    )
    p.add_argument("--steps", type=int, help="timed training steps per check (default 3, quick 1)")
    p.add_argument("--batch", type=int, help="slices per step (default 4, quick 2)")
    p.add_argument("--json", type=Path, default=Path("gpu_check.json"), help="where to write the results")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the network
    from clipseg_bench.provenance import git_info, hardware_info, write_json_atomic

    device = torch.device(a.device)
    arch = a.arch or ("real" if device.type == "cuda" else "tiny")
    size = 352 if arch == "real" else 64
    prompts = 3 if a.quick else 13
    steps = a.steps or (1 if a.quick else 3)
    batch = a.batch or (2 if a.quick else 4)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    log(
        f"gpu check: {arch} architecture on {device}, {batch} slices x {prompts} prompts at {size} px, {steps} steps"
    )
    t0 = time.perf_counter()
    result = run_checks(
        arch=arch, device=device, batch=batch, prompts=prompts, size=size, steps=steps, log=log
    )
    ok = (
        result["prompt_embeddings"]["distinct"]
        and all(r["ok"] for r in result["logits"].values())
        and all(c["ok"] for c in result["checks"])
    )
    doc = {
        "ok": ok,
        "arch": arch,
        "device": str(device),
        "settings": {"batch": batch, "prompts": prompts, "image_size": size, "steps": steps},
        **result,
        "total_s": time.perf_counter() - t0,
        "load_average": os.getloadavg(),
        "hardware": hardware_info(),
        "git": git_info(),
    }
    write_json_atomic(a.json, doc)
    log(f"{'all checks passed' if ok else 'SOME CHECKS FAILED'} in {doc['total_s']:.0f} s -> {a.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
