"""Save and load only the trained parameters, as safetensors with the resolved config inside.

A run's ``weights.safetensors`` holds the parameters that had ``requires_grad`` (a few MB for
adapters or LoRA instead of a whole CLIPSeg) and the run's config as JSON in the file's metadata.
To load, rebuild the base model, apply the same strategy (which injects the same modules), then
:func:`load_weights`. safetensors never unpickles, so a weights file cannot run code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from clipseg_bench.errors import InputError
from clipseg_bench.provenance import replacing

FORMAT = "clipseg-bench-trained/1"


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Name -> tensor of every parameter that requires grad (detached, contiguous, on CPU)."""
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def save_weights(model: nn.Module, path: str | Path, *, config: dict[str, Any] | None = None) -> None:
    """Write the trainable parameters of ``model`` to a safetensors file.

    Args:
        model: the model after its strategy was applied (and trained).
        path: file to write (``weights.safetensors``).
        config: the resolved run config (JSON-serialisable), stored in the file's metadata.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": FORMAT, "config": json.dumps(config or {}, sort_keys=True)}
    with replacing(path) as tmp:  # a full disk leaves no half-written weights under the real name
        save_file(trained_state(model), str(tmp), metadata=metadata)


def read_weights_config(path: str | Path) -> dict[str, Any]:
    """The config stored in a weights file by :func:`save_weights`, without loading tensors."""
    _, config = _open(Path(path), load_tensors=False)
    return config


def _open(path: Path, *, load_tensors: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if not path.is_file():
        raise InputError(path, "weights file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()} if load_tensors else {}
    except (SafetensorError, OSError) as exc:
        raise InputError(path, f"not a safetensors file ({exc})") from None
    if meta.get("format") != FORMAT:
        raise InputError(
            path, f"not a clipseg-bench weights file (format {meta.get('format')!r}, expected {FORMAT})"
        )
    return tensors, json.loads(meta.get("config", "{}"))


def load_weights(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load trained parameters into a model that had the same strategy applied.

    Strict: the file must hold exactly the model's trainable parameters, with the same shapes.

    Args:
        model: base model after ``apply_strategy`` with the run's strategy and options.
        path: a file written by :func:`save_weights`.

    Returns:
        The config stored in the file.

    Raises:
        InputError: not a weights file, or it does not fit the model (other strategy or options).
    """
    path = Path(path)
    tensors, config = _open(path, load_tensors=True)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        what = f"missing {len(missing)} (e.g. {missing[0]})" if missing else ""
        what += (", " if what else "") + (
            f"unexpected {len(unexpected)} (e.g. {unexpected[0]})" if unexpected else ""
        )
        raise InputError(path, f"does not fit the model with this strategy: {what}")
    for name, p in params.items():
        if tensors[name].shape != p.shape:
            raise InputError(
                path, f"{name} has shape {tuple(tensors[name].shape)}, the model {tuple(p.shape)}"
            )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name].to(device=p.device, dtype=p.dtype))
    return config
