"""Validation during training: the 2D Dice of the model as it is now, on a sample of prepared slices.

When ``val_max_slices`` caps validation, :func:`even_sample` picks the slices: the same share for
every case, spread evenly along z within each case, the same slices in every run. (Taking the first
N rows in (case, z) order would score one patient's lowest slices.)
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from clipseg_bench.data.dataset import PreparedData, organ_targets
from clipseg_bench.evaluation.metrics import pair_counts, present_dice_from_counts


def _case_quotas(counts: list[int], total: int) -> list[int]:
    """Split ``total`` slices over cases as evenly as their sizes allow (water filling).

    Cases are served smallest first: each takes an equal share of what is left, or all it has.
    The remainder of a division goes to the larger cases. Sums to ``min(total, sum(counts))``.
    """
    quotas = [0] * len(counts)
    left = total
    order = sorted(range(len(counts)), key=lambda i: (counts[i], i))
    for served, i in enumerate(order):
        quotas[i] = min(counts[i], left // (len(order) - served))
        left -= quotas[i]
    return quotas


def even_sample(rows: pd.DataFrame, max_slices: int | None) -> np.ndarray:
    """Positions of at most ``max_slices`` rows, spread evenly over the cases and along z.

    Args:
        rows: manifest rows (``case``, ``z``) in (case, z) order, as ``PreparedData.slices`` gives them.
        max_slices: the cap; None (or at least ``len(rows)``) keeps every row.

    Returns:
        Sorted int positions into ``rows``. Each case gets an equal share (a case with fewer rows
        gives its unused share to the others); within a case of n rows, a share of q takes the rows
        at the centres of q equal strata, ``floor((j + 0.5) * n / q)``. A function of the rows
        alone, so every run with the same data and cap scores the same slices.
    """
    if not max_slices or len(rows) <= max_slices:
        return np.arange(len(rows))
    cases = rows["case"].to_numpy()
    names = list(dict.fromkeys(cases))
    members = [np.flatnonzero(cases == c) for c in names]
    picks = []
    for idx, q in zip(members, _case_quotas([len(m) for m in members], max_slices)):
        if q:
            picks.append(idx[((np.arange(q) + 0.5) * len(idx) / q).astype(int)])
    return np.sort(np.concatenate(picks))


def sample_record(chosen: pd.DataFrame, *, of: int) -> dict:
    """What run.json says about a sample: how many slices of how many, and which (case -> z list).

    Args:
        chosen: the sampled manifest rows (``case``, ``z``).
        of: how many rows it was drawn from.
    """
    return {
        "slices": len(chosen),
        "of": of,
        "z": {str(c): [int(z) for z in g["z"]] for c, g in chosen.groupby("case", sort=True)},
    }


class _Take:
    """Rows of an array (a memory map) in a given order, read one slice of rows at a time."""

    def __init__(self, array, index: np.ndarray):
        self.array, self.index = array, np.asarray(index)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, s: slice):
        return self.array[self.index[s]]


def shard_batches(n: int, batch_size: int, rank: int, world: int) -> range:
    """The rows of ``n`` that process ``rank`` of ``world`` scores: a contiguous run of whole batches.

    Whole batches, so each slice is predicted in the same batch as on one process (another batch
    composition could round differently), and contiguous, so the shards' results in rank order are
    one process's results in order.
    """
    batches = -(-n // batch_size)
    per = -(-batches // world)
    return range(min(rank * per * batch_size, n), min((rank + 1) * per * batch_size, n))


def validation_counts(
    segmenter,
    data: PreparedData,
    rows: pd.DataFrame,
    *,
    organ_ids,
    features=None,
    feature_index: np.ndarray | None = None,
    threshold=0.5,
    batch_size=16,
    channels="gray",
    windows=None,
) -> torch.Tensor:
    """Dice counts of every (slice, organ) pair of ``rows``: thresholded and counted on the
    segmenter's device, so only three integers per pair come back.

    Args: see :func:`validation_dice` (``features`` row ``feature_index[i]`` belongs to ``rows.iloc[i]``).

    Returns:
        (len(rows) * K, 3) int64 on the segmenter's device: (|P∩G|, |P|, |G|) per pair, slice-major.
    """
    device = segmenter.device
    ids = torch.as_tensor(organ_ids, dtype=torch.uint8, device=device)
    counts = [torch.zeros((0, 3), dtype=torch.int64, device=device)]
    if len(rows) == 0:
        return counts[0]
    imgs = np.concatenate([data.inputs(c, [z], channels, windows) for c, z in zip(rows["case"], rows["z"])])
    labs = np.stack([data.array(c, "label")[z] for c, z in zip(rows["case"], rows["z"])])
    if features is not None:
        features = _Take(features, np.arange(len(rows)) if feature_index is None else feature_index)
    for start, probs in segmenter.iter_probabilities(
        imgs, batch_size=batch_size, features=features, on_device=True
    ):
        labels = torch.from_numpy(labs[start : start + len(probs)]).to(device)
        t = organ_targets(labels, ids)
        found = pair_counts((probs > threshold).flatten(0, 1), t.flatten(0, 1))
        counts.append(torch.stack([torch.as_tensor(c, device=device) for c in found], dim=1))
    return torch.cat(counts)


def validation_dice(
    segmenter,
    data: PreparedData,
    rows: pd.DataFrame,
    *,
    organ_ids,
    features=None,
    feature_index: np.ndarray | None = None,
    threshold=0.5,
    batch_size=16,
    channels="gray",
    windows=None,
    accelerator=None,
) -> float:
    """Mean 2D Dice over the (slice, organ) pairs of ``rows`` where the organ is present.

    Args:
        segmenter: an :class:`~clipseg_bench.evaluation.predict.Segmenter` of the model being trained.
        data: the prepared dataset.
        rows: the manifest rows (``case``, ``z``) to score, e.g. a split's kept slices at the
            positions :func:`even_sample` chose.
        organ_ids: FLARE22 ids of the prompted organs, in the segmenter's prompt order.
        features: cached vision activations when the encoder is frozen: row ``feature_index[i]``
            (default ``i``) belongs to ``rows.iloc[i]``. Read batch by batch.
        feature_index: see ``features``.
        channels: the run's input_channels mode (what the model's R, G, B hold).
        windows: the run's HU windows of ``windows`` mode (``Preprocessing.windows``).
        accelerator: with several processes, each scores its shard of whole batches
            (:func:`shard_batches`) and the counts are gathered (every process must call this);
            the result equals one process's.

    Returns:
        The mean Dice, NaN when no scored slice holds a prompted organ (or ``rows`` is empty).
    """
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    shard = shard_batches(len(rows), batch_size, rank, world)
    mine = np.arange(shard.start, shard.stop)
    index = mine if feature_index is None else np.asarray(feature_index)[mine]
    counts = validation_counts(
        segmenter,
        data,
        rows.iloc[mine],
        organ_ids=organ_ids,
        features=features,
        feature_index=index,
        threshold=threshold,
        batch_size=batch_size,
        channels=channels,
        windows=windows,
    )
    if world > 1:
        counts = _gather_shards(accelerator, counts, len(rows) * len(organ_ids), batch_size * len(organ_ids))
    dices = present_dice_from_counts(*counts.cpu().numpy().T)
    return float(np.mean(dices)) if len(dices) else float("nan")


def _gather_shards(accelerator, counts: torch.Tensor, n_pairs: int, pairs_per_batch: int) -> torch.Tensor:
    """Every process's counts, in rank order (shards padded to one length for the gather, then cut)."""
    world = accelerator.num_processes
    sizes = [len(shard_batches(n_pairs, pairs_per_batch, r, world)) for r in range(world)]
    padded = torch.zeros((max(sizes), 3), dtype=counts.dtype, device=counts.device)
    padded[: len(counts)] = counts
    every = accelerator.gather(padded).reshape(world, max(sizes), 3)
    return torch.cat([every[r, : sizes[r]] for r in range(world)])
