"""Resume checkpoints: written atomically at every epoch end, read back without unpickling code.

A checkpoint holds only what changes during training: the trainable parameters (safetensors),
optimizer and scheduler state (tensors and numbers, read with ``weights_only=True``), and the loop's
bookkeeping (JSON). Frozen weights come from the base model again, so a decoder-only checkpoint of
the real model is a few MB rather than 600.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from clipseg_bench.errors import InputError
from clipseg_bench.model.checkpoint import load_trained, save_trained
from clipseg_bench.provenance import read_json_object


def save_resume_state(folder: Path, *, model, optimizer, scheduler, state: dict) -> None:
    """Write ``folder`` (e.g. RUN/checkpoints/last) atomically: build aside, then swap in."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_trained(model, tmp / "trainable.safetensors")
    if optimizer is not None:
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optim.pt"
        )
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    old = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def load_resume_state(folder: Path, *, model, optimizer=None, scheduler=None) -> dict:
    """Restore what :func:`save_resume_state` wrote; returns the bookkeeping dict.

    Raises:
        InputError: naming the checkpoint file that is missing, corrupt or does not fit the run.
    """
    state_path, optim_path = folder / "state.json", folder / "optim.pt"
    state = read_json_object(state_path)  # the cheapest check first
    if not isinstance(state.get("epoch"), int) or not isinstance(state.get("global_step"), int):
        raise InputError(state_path, "not a resume checkpoint state (no integer epoch and global_step)")
    load_trained(model, folder / "trainable.safetensors")
    if optimizer is not None and optim_path.is_file():
        try:
            blob = torch.load(optim_path, map_location="cpu", weights_only=True)
            optimizer.load_state_dict(blob["optimizer"])
            scheduler.load_state_dict(blob["scheduler"])
        except Exception as exc:  # torch raises pickle, zip and key errors for a bad file
            raise InputError(
                optim_path,
                f"corrupt or foreign optimizer state ({exc.__class__.__name__}: {str(exc).splitlines()[0][:80]})",
            ) from None
    return state
