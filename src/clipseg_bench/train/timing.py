"""Where a training step's time goes: data, forward, backward, optimizer, and validation."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch


class StepTimer:
    """Accumulates wall time per phase; synchronises the device before each reading on GPU."""

    PHASES = ("data", "forward", "backward", "optimizer", "eval")

    def __init__(self, device: torch.device):
        self.device = device
        self.totals = dict.fromkeys(self.PHASES, 0.0)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def phase(self, name: str):
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.totals[name] += time.perf_counter() - t0
