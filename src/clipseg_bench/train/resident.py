"""Decoder-only training data held on the device: the feature cache and the labels, read by index.

With a frozen vision encoder a step needs only each slice's cached activations and its label map at
the model's side. When both fit in the device's memory (FLARE22's fp16 cache fits an H100), they are
copied there once and a step gathers its rows by index: no loader work, no host-to-device copy per
step. Otherwise the loader reads the memory-mapped cache and copies each batch from pinned memory.
The values are the cache's own, so a run trains exactly alike either way (a test compares them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from clipseg_bench.data.dataset import SliceDataset, present_ids

DEVICE_SHARE = 0.5  # at most this share of the device's free memory goes to resident data


@dataclass
class ResidentData:
    """The training rows on the device.

    Attributes:
        features: (N, ...) cached activations in the cache's dtype, on the device.
        labels: (N, S, S) uint8 label maps at the model's side, on the device.
        present_ids: (N, 256) bool on the host: which label ids each slice holds (pair selection
            runs on the host, see :func:`~clipseg_bench.data.sampling.select_pairs`).
    """

    features: torch.Tensor
    labels: torch.Tensor
    present_ids: torch.Tensor

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.features, self.labels))


def resident_bytes(dataset: SliceDataset) -> int:
    """What :func:`load_resident` would place on the device for ``dataset`` (features and labels)."""
    n = len(dataset)
    return dataset.features.nbytes + n * dataset.size * dataset.size


def wants_resident(choice: str, device: torch.device, nbytes: int) -> bool:
    """Whether to hold the training rows on the device (``TrainConfig.feature_cache_on_device``).

    ``yes`` always (on the CPU: a tensor in memory instead of the memory map), ``no`` never, ``auto``
    on CUDA when ``nbytes`` is at most :data:`DEVICE_SHARE` of the free device memory.
    """
    if choice != "auto":
        return choice == "yes"
    if torch.device(device).type != "cuda":
        return False  # the CPU reads the memory map through the page cache already
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= DEVICE_SHARE * free


def load_resident(dataset: SliceDataset, device: torch.device) -> ResidentData:
    """Copy ``dataset``'s features and its labels at the model's side to ``device``.

    Args:
        dataset: a training :class:`~clipseg_bench.data.dataset.SliceDataset` with ``features``.
    """
    features = dataset.features
    if not hasattr(features, "to_tensor"):  # a plain array (tests, benchmarks)
        features_t = torch.from_numpy(np.ascontiguousarray(features)).to(device)
    else:
        features_t = features.to_tensor(device)
    labels = torch.stack([dataset.labels(i) for i in range(len(dataset))])  # (N, S, S) uint8
    present = torch.from_numpy(np.stack([present_ids(lab) for lab in labels.numpy()]))
    return ResidentData(features=features_t, labels=labels.to(device), present_ids=present)
