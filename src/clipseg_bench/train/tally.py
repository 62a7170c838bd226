"""What a training epoch reports (loss, train Dice), accumulated where the step computes it.

On a GPU, reading a loss with ``.item()`` or Dice values with ``.tolist()`` makes the host wait for
every kernel queued before it: one such read per chunk of pairs left the device idle most of a
decoder-only step. :class:`StepTally` keeps the step losses (float64) and the Dice counts
(:func:`~clipseg_bench.evaluation.metrics.pair_counts`) on the device, and :meth:`StepTally.read`
brings them to the host in one transfer: the loop calls it every ``log_every`` steps and at the
epoch end, its sync points. The divergence check lives here too: the first step whose loss was not
finite is found on the device and read with the rest (the loop fails the run at the epoch end). The numbers are the ones the per-chunk reads gave, bit for bit: the same
float64 additions of the same float32 losses in the same order, and the same integer counts turned
into Dice in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from clipseg_bench.evaluation.metrics import pair_counts, present_dice_from_counts


@dataclass
class Reading:
    """The tally as read at a sync point.

    Attributes:
        step: the global optimizer step at the read.
        epoch: the 0-based epoch.
        steps: steps of this epoch so far.
        loss: mean step loss of the epoch so far (0 before the first step).
        last_loss: the last step's loss (NaN before the first step).
        train_dice: mean Dice of the epoch's present (slice, organ) pairs so far (NaN without any).
        bad_step: the global step number of the epoch's first step whose loss was not finite
            (-1: none so far).
    """

    step: int
    epoch: int
    steps: int
    loss: float
    last_loss: float
    train_dice: float
    bad_step: int = -1


class StepTally:
    """An epoch's step losses and Dice counts, kept on ``device`` until :meth:`read`.

    Args:
        device: where the step computes (its losses and masks live there).
        epoch: the 0-based epoch (reported in each :class:`Reading`).
        first_step: the global step number (1-based) of the epoch's first step.
    """

    def __init__(self, device: torch.device, epoch: int = 0, *, first_step: int = 1):
        self.device, self.epoch, self.first_step = torch.device(device), epoch, first_step
        self.steps = 0
        self.lrs: list[float] = []  # each step's learning rate (host values), in step order
        # The first step whose loss was not finite (-1: none), found on the device: a per-step check
        # on the host would wait for every step to finish. Read with the rest at the sync points.
        self._bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        self._loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._step_loss: torch.Tensor | None = None
        self._last: torch.Tensor | None = None
        self._counts: list[tuple] = []  # per chunk: (|P∩G|, |P|, |G|), on the device or the host
        self.dices: list[float] = []  # per present pair, in training order (read so far)

    def add_chunk(self, loss: torch.Tensor, pred: torch.Tensor, target: torch.Tensor) -> None:
        """One decoded chunk: its (already weighted) loss and its predicted and true masks (P, H, W)."""
        if self._step_loss is None:
            self._step_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        self._step_loss += loss.detach().to(torch.float64)
        self._counts.append(pair_counts(pred, target))

    def end_step(self, lr: float = float("nan")) -> None:
        """Close the step: its summed chunk losses join the epoch's sum; a non-finite one is recorded
        as the epoch's first bad step (on the device) unless one came before; ``lr``: its rate."""
        step = self.first_step + len(self.lrs)
        self.lrs.append(lr)
        if self._step_loss is None:
            return
        finite = torch.isfinite(self._step_loss)
        self._bad_step = torch.where((self._bad_step < 0) & ~finite, step, self._bad_step)
        self._loss_sum += self._step_loss
        self._last, self._step_loss = self._step_loss, None
        self.steps += 1

    def read(self, step: int) -> Reading:
        """Bring the accumulators to the host (the one wait for the device) and return the tally."""
        if self._counts:
            counts = [torch.cat([torch.as_tensor(c[i]) for c in self._counts]) for i in range(3)]
            host = torch.stack(counts).cpu().numpy()  # one transfer for every pair since the last read
            self.dices.extend(present_dice_from_counts(*host).tolist())
            self._counts.clear()
        loss_sum = float(self._loss_sum)
        return Reading(
            step=step,
            epoch=self.epoch,
            steps=self.steps,
            loss=loss_sum / max(self.steps, 1),
            last_loss=float(self._last) if self._last is not None else float("nan"),
            train_dice=float(np.mean(self.dices)) if self.dices else float("nan"),
            bad_step=int(self._bad_step),
        )
