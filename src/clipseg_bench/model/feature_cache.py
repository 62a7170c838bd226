"""Frozen-feature cache: the vision activations the decoder reads, computed once per slice.

When the vision encoder is frozen (decoder-only training, zero-shot evaluation) its output for a
slice never changes, so recomputing it every epoch is pure waste: on the real rd64 architecture a decoder-only
step on cached activations is an order of magnitude faster (benchmarks/README.md). The cache is stored
memory-mapped under ``PREPARED/feature_cache/<key>/``, in fp16 (half the disk and page cache; the
default) or fp32 (the activations exactly): ``TrainConfig.feature_cache_dtype``. The key hashes
everything the cached values depend on: the vision weights, the preprocessing (window, size,
mean/std, input channels), the prepared data and the dtype, so any change builds a new cache
instead of silently reusing a stale one.
No library caches HF encoder activations to disk, so this is our own (small) code.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from clipseg_bench.data.channels import WINDOWS, needs_hu
from clipseg_bench.data.dataset import PreparedData, resize_slices
from clipseg_bench.model.families import family_of
from clipseg_bench.model.forward import encode_images, preprocess, stack_features

DTYPES = {"fp16": np.float16, "fp32": np.float32}  # TrainConfig.feature_cache_dtype -> stored dtype


def cache_key(
    model,
    *,
    data: PreparedData,
    size: int,
    mean,
    std,
    dtype: str = "fp16",
    channels: str = "gray",
    windows=None,
) -> str:
    """The cache folder's name: a hash of everything the cached values depend on.

    Args:
        windows: the run's HU windows of ``windows`` mode (``Preprocessing.windows``; None: today's).
    """
    h = hashlib.blake2b(digest_size=8)
    h.update(family_of(model).vision_fingerprint(model).encode())
    h.update((data.root / "dataset.json").read_bytes())
    h.update(json.dumps({"size": size, "mean": list(mean), "std": list(std)}).encode())
    if dtype != "fp16":  # fp16 caches keep the keys they had before the dtype became a choice
        h.update(dtype.encode())
    h.update(_channels_key(channels, windows))
    return h.hexdigest()


def _channels_key(channels: str, windows=None) -> bytes:
    """The input_channels part of the key; empty for ``gray``, so caches built before the field
    existed (all gray) keep their key and are reused."""
    if channels == "gray":
        return b""
    hu_windows = [dict(w) for w in (WINDOWS if windows is None else windows)] if needs_hu(channels) else None
    doc = {"input_channels": channels, "windows": hu_windows}
    return json.dumps(doc, sort_keys=True).encode()


@dataclass
class CacheInfo:
    path: Path
    rows: int
    size_mb: float
    build_s: float  # 0.0 when an existing cache was reused
    reused: bool


def build_feature_cache(
    model,
    *,
    data: PreparedData,
    rows,
    name: str,
    size: int,
    mean,
    std,
    device: torch.device | str = "cpu",
    batch_size: int = 16,
    show_progress: bool = True,
    key: str | None = None,
    dtype: str = "fp16",
    channels: str = "gray",
    windows=None,
) -> tuple[np.ndarray, CacheInfo]:
    """Compute (or reuse) the activations for the slices listed in ``rows``.

    Args:
        model: a model whose vision encoder is frozen (any family).
        data: the prepared dataset; rows: a manifest DataFrame (case, z) in the order items are read.
        name: file stem for this row set, e.g. "train_kept" or "val_all".
        size, mean, std: the model's preprocessing.
        key: :func:`cache_key` of these arguments, when the caller already has it (it hashes the
            whole vision encoder, so callers building several row sets compute it once).
        dtype: ``fp16`` or ``fp32`` (:data:`DTYPES`), what is stored.
        channels: the input_channels mode the images are built with (part of the key).
        windows: the run's HU windows of ``windows`` mode (part of the key; None: today's).

    Returns:
        (memmap of shape (N, ...) in ``dtype``: (N, L, T, D) for CLIPSeg, CacheInfo). Row i belongs
        to ``rows.iloc[i]``.
    """
    key = key or cache_key(
        model, data=data, size=size, mean=mean, std=std, dtype=dtype, channels=channels, windows=windows
    )
    np_dtype = DTYPES[dtype]
    folder = data.root / "feature_cache" / key
    path = folder / f"{name}.npy"
    index_path = folder / f"{name}.rows.json"
    wanted = [[str(c), int(z)] for c, z in zip(rows["case"], rows["z"])]
    if path.is_file() and index_path.is_file() and json.loads(index_path.read_text()) == wanted:
        arr = np.load(path, mmap_mode="r")
        return arr, CacheInfo(path, len(wanted), path.stat().st_size / 2**20, 0.0, True)

    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    out = None
    tmp = folder / f".{name}.{os.getpid()}.tmp.npy"
    bar = tqdm(total=len(wanted), desc=f"feature cache {name}", unit="slice", disable=not show_progress)
    with torch.no_grad():
        for start in range(0, len(wanted), batch_size):
            chunk = wanted[start : start + batch_size]
            imgs = torch.from_numpy(
                np.concatenate([data.inputs(c, [z], channels, windows) for c, z in chunk])
            )
            imgs = resize_slices(imgs, size)
            pv = preprocess(imgs, size=size, mean=mean, std=std).to(device)
            acts = stack_features(model, encode_images(model, pv)).to(
                "cpu"
            )  # (b, ...): (b, L, T, D) for CLIPSeg
            if out is None:
                out = np.lib.format.open_memmap(
                    tmp, mode="w+", dtype=np_dtype, shape=(len(wanted), *acts.shape[1:])
                )
            out[start : start + len(chunk)] = acts.float().numpy().astype(np_dtype)
            bar.update(len(chunk))
    bar.close()
    out.flush()
    del out
    os.replace(tmp, path)  # atomic: a half-built cache is never picked up
    index_path.write_text(json.dumps(wanted))
    build_s = time.perf_counter() - t0
    arr = np.load(path, mmap_mode="r")
    info = CacheInfo(path, len(wanted), path.stat().st_size / 2**20, build_s, False)
    if show_progress:
        print(f"feature cache {name}: {info.rows} slices, {info.size_mb:.1f} MiB, built in {build_s:.1f} s")
    return arr, info
