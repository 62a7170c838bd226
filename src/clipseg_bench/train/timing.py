"""Where a training step's time goes: data, forward, backward, optimizer, and validation.

Three clocks, one interface (:meth:`StepTimer.phase`):

- CPU: wall time (``perf_counter``) per phase; the device is the host, nothing to wait for.
- CUDA (the default there): a pair of CUDA events around each phase, read at the loop's sync points
  (:meth:`StepTimer.collect`), never waited for inside a step. A phase's time is then the device
  timeline's: its kernels plus any stretch the device spent waiting for the host inside it (a data
  phase the device never waits for costs ~0).
- ``profile_sync``: the device is synchronised before and after each phase and wall time read, as an
  exact host-side breakdown (it stalls the pipeline: for profiling, not for runs that are timed).

Besides, :attr:`StepTimer.host` keeps the host's own wall time per phase and the time it spent
blocked reading the device (``sync``): where the host waits.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch


class StepTimer:
    """Accumulates time per phase (see the module docstring for the clocks).

    Args:
        device: the training device.
        exact: synchronise the device around every phase (``TrainConfig.profile_sync``).

    Attributes:
        totals: seconds per phase in :data:`PHASES` (device timeline on CUDA, wall time otherwise);
            up to date after :meth:`collect`.
        host: the host's wall seconds per phase, plus ``sync`` (blocked reading the device).
    """

    PHASES = ("data", "forward", "backward", "optimizer", "eval")

    def __init__(self, device: torch.device, *, exact: bool = False):
        self.device = torch.device(device)
        self.totals = dict.fromkeys(self.PHASES, 0.0)
        self.host = dict.fromkeys((*self.PHASES, "sync"), 0.0)
        self.exact = exact
        self.events = self.device.type == "cuda" and not exact
        self._pending: list[tuple[str, object, object]] = []
        self._free: list[object] = []

    @property
    def clock(self) -> str:
        """How :attr:`totals` is measured (run.json ``timing.clock``)."""
        if self.events:
            return "cuda events"
        return "wall, synchronised" if self.exact and self.device.type == "cuda" else "wall"

    def _sync(self) -> None:
        if self.exact and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _event(self):
        if self._free:
            return self._free.pop()
        return torch.cuda.Event(enable_timing=True)

    @contextmanager
    def phase(self, name: str):
        self._sync()
        start = None
        if self.events:
            start = self._event()
            start.record()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            wall = time.perf_counter() - t0
            self.host[name] += wall
            if start is not None:
                end = self._event()
                end.record()
                self._pending.append((name, start, end))
            else:
                self.totals[name] += wall

    @contextmanager
    def waiting(self):
        """Time the host spends blocked on the device (a read of its accumulators): ``host["sync"]``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.host["sync"] += time.perf_counter() - t0

    def collect(self) -> None:
        """Add the recorded CUDA events' times to :attr:`totals` (call it where the device has been
        synchronised, e.g. after reading its accumulators: the events are complete then)."""
        for name, start, end in self._pending:
            end.synchronize()  # no wait when the stream has already passed it
            self.totals[name] += start.elapsed_time(end) / 1000.0
            self._free += [start, end]
        self._pending.clear()
