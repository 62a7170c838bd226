"""Validation during training: the 2D Dice of the model as it is now, on a prepared split."""

from __future__ import annotations

import numpy as np
import torch

from clipseg_bench.data.dataset import PreparedData, organ_targets
from clipseg_bench.evaluation.metrics import present_pairs_dice


def validation_dice(
    segmenter,
    data: PreparedData,
    split: str,
    *,
    organ_ids,
    max_slices=None,
    features=None,
    threshold=0.5,
    batch_size=16,
    channels="gray",
) -> float:
    """Mean 2D Dice over the (slice, organ) pairs of ``split`` where the organ is present.

    Args:
        segmenter: an :class:`~clipseg_bench.evaluation.predict.Segmenter` of the model being trained.
        data: the prepared dataset; only the slices `prepare` kept for training are scored.
        organ_ids: FLARE22 ids of the prompted organs, in the segmenter's prompt order.
        max_slices: score at most this many slices.
        features: cached vision activations aligned with the split's kept rows, if the encoder is frozen.
        channels: the run's input_channels mode (what the model's R, G, B hold).

    Returns:
        The mean Dice, NaN when no scored slice holds a prompted organ.
    """
    ds_rows = data.slices(split, kept_only=True)
    if max_slices:
        ds_rows = ds_rows.iloc[:max_slices]
    imgs = np.concatenate([data.inputs(c, [z], channels) for c, z in zip(ds_rows["case"], ds_rows["z"])])
    labs = np.stack([data.array(c, "label")[z] for c, z in zip(ds_rows["case"], ds_rows["z"])])
    dices = []
    if features is not None:  # cached rows follow the same manifest order; use the ones we score
        features = features[: len(ds_rows)]
    for start, probs in segmenter.iter_probabilities(imgs, batch_size=batch_size, features=features):
        t = organ_targets(torch.from_numpy(labs[start : start + len(probs)]), organ_ids)
        dices.extend(present_pairs_dice((probs > threshold).flatten(0, 1), t.flatten(0, 1)).tolist())
    return float(np.mean(dices)) if dices else float("nan")
