"""Numeric precision on a device: which autocast a run uses, TF32, and what run.json records about it.

One helper for every place that runs the model: training (through Accelerate, which applies the
same autocast around the prepared module's forward), validation, ``evaluate``, ``segment`` and the
feature-cache build. ``mixed_precision: auto`` (the default) means bf16 autocast on a CUDA device
that supports it and full fp32 elsewhere, so CPU runs compute exactly what they computed before the
default existed.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

MIXED_PRECISIONS = ("auto", "no", "bf16", "fp16")  # TrainConfig.mixed_precision
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(requested: str, device: torch.device | str) -> str:
    """The autocast a run uses on ``device``: ``no``, ``bf16`` or ``fp16``.

    Args:
        requested: ``TrainConfig.mixed_precision``; ``auto`` is bf16 on a CUDA device with bf16
            support, else ``no`` (the CPU keeps fp32: its numbers do not change with the default).

    Raises:
        ValueError: an unknown value.
    """
    if requested not in MIXED_PRECISIONS:
        raise ValueError(f"unknown mixed precision {requested!r}; choose from {', '.join(MIXED_PRECISIONS)}")
    if requested != "auto":
        return requested
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def autocast(device: torch.device | str, precision: str):
    """The autocast context of a resolved ``precision`` on ``device`` (a no-op for ``no``)."""
    dtype = AUTOCAST_DTYPES.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def use_tf32(device: torch.device | str, enabled: bool = True) -> bool:
    """Let CUDA run float32 matmuls and convolutions in TF32 (10-bit mantissa inputs, fp32 accumulation).

    Process-wide, and only on a CUDA device: the CPU's kernels are left exactly as they are.

    Returns:
        Whether float32 matmuls on ``device`` now use TF32.
    """
    if torch.device(device).type != "cuda":
        return False
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    return enabled


def attention_implementation(model: nn.Module) -> str | None:
    """The attention kernel Hugging Face runs for ``model`` (``sdpa``, ``eager``, ``flash_attention_2``...)."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None)


def precision_record(model: nn.Module, *, precision: str, tf32: bool) -> dict:
    """run.json's ``precision``: the autocast in use, whether TF32 is on, and the attention kernel."""
    return {"mixed_precision": precision, "tf32": tf32, "attention": attention_implementation(model)}
