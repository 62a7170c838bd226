"""Resume checkpoints: written atomically at every epoch end, read back without unpickling code.

A checkpoint holds only what changes during training: the trainable parameters (safetensors),
optimizer and scheduler state (tensors and numbers, read with ``weights_only=True``), and the loop's
bookkeeping (:class:`LoopState`, JSON). Frozen weights come from the base model again, so a
decoder-only checkpoint of the real model is a few MB rather than 600.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from clipseg_bench.errors import InputError
from clipseg_bench.model.weights import load_weights, save_weights
from clipseg_bench.provenance import check_free_space, read_json_object, write_error


@dataclass
class LoopState:
    """The training loop's bookkeeping: what a resumed run continues from.

    Attributes:
        epoch: epochs finished.
        global_step: optimizer steps taken.
        history: one history.csv row (dict) per finished epoch.
        train_time_s: wall time of the finished epochs' training (validation excluded).
        train_cpu_s: this process's CPU time (all its threads) over the same span: what the training
            cost on a shared machine, where wall time also counts waiting for a core.
        step_times_s: wall time of each optimizer step (data to optimizer), in order.
        masks: (slice, organ) masks trained on, over all processes.
        breakdown_s: time per phase (:class:`~clipseg_bench.train.timing.StepTimer`).
        host_s: the host's time per phase and blocked on the device (``StepTimer.host``).
        num_processes: processes that wrote it (the scheduler's state counts per-process ticks);
            None in checkpoints from before it was recorded.
    """

    epoch: int = 0
    global_step: int = 0
    history: list[dict] = field(default_factory=list)
    train_time_s: float = 0.0
    train_cpu_s: float = 0.0
    step_times_s: list[float] = field(default_factory=list)
    masks: int = 0
    breakdown_s: dict = field(default_factory=dict)
    host_s: dict = field(default_factory=dict)
    num_processes: int | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, doc: dict) -> LoopState:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in known})


def checkpoint_bytes(model, optimizer) -> int:
    """Bytes a checkpoint takes at least: the trainable parameters, and with AdamW their two moment
    estimates (``optim.pt``), in their own dtypes."""
    params = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return params * (3 if optimizer is not None else 1)


def save_resume_state(folder: Path, *, model, optimizer, scheduler, state: LoopState) -> None:
    """Write ``folder`` (e.g. RUN/checkpoints/last) atomically: build aside, then swap in.

    The space it needs is checked first (the previous checkpoint stays until the new one is whole);
    a write that fails anyway (a full disk, ``ulimit -f``) removes the half-built folder, so the
    last complete checkpoint is what a resumed run finds.

    Raises:
        RunFailed: no room for it (naming the folder or file, and the space free).
    """
    tmp = folder.with_name(f".{folder.name}.tmp")
    need = checkpoint_bytes(model, optimizer)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        check_free_space(folder.parent, need, what="the resume checkpoint", largest=need * 2 // 3 or None)
        tmp.mkdir()
        save_weights(model, tmp / "trainable.safetensors")
        if optimizer is not None:
            torch.save(
                {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optim.pt"
            )
        (tmp / "state.json").write_text(json.dumps(state.to_dict(), indent=2))
        old = folder.with_name(f".{folder.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    except Exception as exc:  # torch.save and safetensors wrap the file system's error in their own
        error = write_error(getattr(exc, "filename", None) or folder, exc, need=need)
        if error is None:
            raise
        raise error from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_resume_state(folder: Path, *, model, optimizer=None, scheduler=None) -> LoopState:
    """Restore what :func:`save_resume_state` wrote into ``model``, ``optimizer`` and ``scheduler``;
    returns the loop's bookkeeping.

    Raises:
        InputError: naming the checkpoint file that is missing, corrupt or does not fit the run.
    """
    state_path, optim_path = folder / "state.json", folder / "optim.pt"
    state = read_json_object(state_path)  # the cheapest check first
    if not isinstance(state.get("epoch"), int) or not isinstance(state.get("global_step"), int):
        raise InputError(state_path, "not a resume checkpoint state (no integer epoch and global_step)")
    load_weights(model, folder / "trainable.safetensors")
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
    return LoopState.from_dict(state)
