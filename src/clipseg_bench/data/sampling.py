"""The order and the (slice, organ) pairs a training epoch sees, as functions of (seed, epoch) alone.

Nothing here reads a global random state, so a resumed run sees exactly what an uninterrupted one
would have seen.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Sampler

from clipseg_bench.errors import InputError


class EpochSampler(Sampler[int]):
    """A shuffle that depends only on (seed, epoch), so a resumed run sees the same order."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def select_pairs(
    present: torch.Tensor, *, absent_fraction: float, generator: torch.Generator
) -> torch.Tensor:
    """The (slice, organ) pairs a step trains on: every present organ and a share of absent ones.

    Runs on the host, from which organs each slice holds (known before the batch reaches the
    device), so the training loop never waits for the device to learn how many pairs it decodes.

    Args:
        present: (B, K) bool, whether organ k has a pixel in slice b (at the model's resolution).
        absent_fraction: probability that an absent organ's pair is kept (it teaches "empty").
        generator: the epoch's own generator (CPU), so the draw is reproducible on resume.

    Returns:
        (P, 2) long CPU tensor of (slice index, organ index) rows in row-major order, never empty:
        every data-parallel rank must run a backward, so a batch with nothing selected keeps its
        first pair.
    """
    present = present.to("cpu", torch.bool)
    rand = torch.rand(present.shape, generator=generator)
    select = present | (rand < absent_fraction)
    if not select.any():
        select[0, 0] = True
    return select.nonzero()


def train_case_subset(cases: list[str], n: int, *, seed: int) -> list[str]:
    """The ``n`` training cases a run with ``seed`` trains on, out of the split's ``cases``.

    The cases are put in one order drawn from ``seed`` alone and the first ``n`` are taken, so the
    subsets of one seed are nested (the 5-case set contains the 1-case set) and fixed by the seed
    and the split.

    Args:
        cases: the train split's case ids (any order; they are sorted first).
        n: how many to keep, 1 <= n <= len(cases).
        seed: the run's seed.

    Returns:
        The chosen case ids, sorted.

    Raises:
        InputError: ``n`` is not between 1 and the number of cases.
    """
    if not 1 <= n <= len(cases):
        raise InputError("train_cases", f"asks for {n} training cases; the train split has {len(cases)}")
    order = np.random.default_rng([seed, 0x7CA5E5]).permutation(sorted(cases))
    return sorted(str(c) for c in order[:n])
