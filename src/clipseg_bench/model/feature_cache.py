"""Frozen-feature cache: the vision activations the decoder reads, computed once per slice.

When the vision encoder is frozen (decoder-only training, zero-shot evaluation) its output for a
slice never changes, so recomputing it every epoch is pure waste: on the real rd64 architecture a decoder-only
step on cached activations is an order of magnitude faster (benchmarks/README.md). The cache is stored
memory-mapped under ``<root>/<key>/`` (:func:`cache_root`: ``--cache-dir``, ``$CLIPSEG_BENCH_CACHE``,
``PREPARED/feature_cache`` when the prepared folder can be written, else ``feature_cache/`` beside the
run folder), in fp16 (half the disk and page cache; the
default) or fp32 (the activations exactly): ``TrainConfig.feature_cache_dtype``. The key hashes
everything the cached values depend on: the vision weights, the preprocessing (window, size,
mean/std, input channels), the prepared data and the dtype, so any change builds a new cache
instead of silently reusing a stale one.
No library caches HF encoder activations to disk, so this is our own (small) code.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import tempfile
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
from clipseg_bench.provenance import check_free_space, write_error

DTYPES = {"fp16": np.float16, "fp32": np.float32}  # TrainConfig.feature_cache_dtype -> stored dtype
CACHE_ENV = "CLIPSEG_BENCH_CACHE"  # the cache folder when --cache-dir is not given
FOLDER = "feature_cache"


def _writable(folder: Path) -> bool:
    """Whether files can be created in ``folder`` (created if missing): tried, since ``os.access``
    says yes to root on a read-only mount's permission bits but the mount still refuses."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def cache_root(
    data: PreparedData, *, cache_dir: str | Path | None = None, beside: str | Path | None = None
) -> Path:
    """The folder that holds the feature caches (one ``<key>/`` sub-folder per model, data, preprocessing).

    Args:
        data: the prepared data the cache is built from.
        cache_dir: the user's choice (``--cache-dir``); else ``$CLIPSEG_BENCH_CACHE``.
        beside: the run folder; with a read-only PREPARED folder (a shared dataset on a read-only
            mount) the cache goes to ``feature_cache/`` in the folder that holds the run, which runs
            written next to each other (a benchmark's runs/) share.

    Returns:
        ``cache_dir``, ``$CLIPSEG_BENCH_CACHE``, ``PREPARED/feature_cache`` when it can be written,
        else ``<run's parent>/feature_cache`` (the key keeps runs of other data or models apart).
    """
    chosen = cache_dir or os.environ.get(CACHE_ENV)
    if chosen:
        return Path(chosen).expanduser()
    default = data.root / FOLDER
    if _writable(default) or beside is None:
        return default
    return Path(beside).absolute().parent / FOLDER


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


def fold_suffix(fold: int | None) -> str:
    """A feature-cache file name's fold part: each fold's row set gets a file of its own (``_f<k>``),
    so concurrent runs on different folds never rebuild each other's; none without a fold."""
    return "" if fold is None else f"_f{fold}"


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
    root: Path | None = None,
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
        root: the folder of caches (:func:`cache_root`; default: the data's own rule without a run).

    Returns:
        (memmap of shape (N, ...) in ``dtype``: (N, L, T, D) for CLIPSeg, CacheInfo). Row i belongs
        to ``rows.iloc[i]``.
    """
    key = key or cache_key(
        model, data=data, size=size, mean=mean, std=std, dtype=dtype, channels=channels, windows=windows
    )
    folder = (root or cache_root(data)) / key
    path = folder / f"{name}.npy"
    index_path = folder / f"{name}.rows.json"
    wanted = [[str(c), int(z)] for c, z in zip(rows["case"], rows["z"])]
    if path.is_file() and index_path.is_file() and _read_rows(index_path) == wanted:
        arr = np.load(path, mmap_mode="r")
        return arr, CacheInfo(path, len(wanted), path.stat().st_size / 2**20, 0.0, True)

    t0 = time.perf_counter()
    tmp = folder / f".{name}.{os.getpid()}.tmp.npy"
    encode = _encoder(
        model, data, size=size, mean=mean, std=std, device=device, channels=channels, windows=windows
    )
    bar = functools.partial(
        tqdm, total=len(wanted), desc=f"feature cache {name}", unit="slice", disable=not show_progress
    )
    try:
        _write_cache(encode, wanted, tmp, DTYPES[dtype], batch_size=batch_size, bar=bar)
        os.replace(tmp, path)  # atomic: a half-built cache is never picked up
        index_path.write_text(json.dumps(wanted))
    except OSError as exc:  # a full disk, ulimit -f, a read-only --cache-dir
        raise write_error(exc.filename or tmp, exc) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    build_s = time.perf_counter() - t0
    arr = np.load(path, mmap_mode="r")
    info = CacheInfo(path, len(wanted), path.stat().st_size / 2**20, build_s, False)
    if show_progress:
        print(f"feature cache {name}: {info.rows} slices, {info.size_mb:.1f} MiB, built in {build_s:.1f} s")
    return arr, info


def _read_rows(index_path: Path):
    try:
        return json.loads(index_path.read_text())
    except (OSError, ValueError):  # half-written by a run that died: rebuilt
        return None


def _encoder(model, data: PreparedData, *, size, mean, std, device, channels, windows):
    """(case, z) rows -> the model's stacked vision features of those slices, on the CPU."""

    def encode(chunk: list) -> torch.Tensor:
        imgs = torch.from_numpy(np.concatenate([data.inputs(c, [z], channels, windows) for c, z in chunk]))
        pv = preprocess(resize_slices(imgs, size), size=size, mean=mean, std=std).to(device)
        with torch.no_grad():
            return stack_features(model, encode_images(model, pv)).to("cpu")  # (b, L, T, D) for CLIPSeg

    return encode


def _write_cache(encode, wanted: list, tmp: Path, np_dtype, *, batch_size: int, bar) -> None:
    """Encode ``wanted`` in batches into a new memmap at ``tmp``, showing progress with ``bar()``.

    Its size is known after the first batch: the space is checked (before the progress bar shows),
    then reserved with ``posix_fallocate``, so a disk that fills while the cache is written fails
    here with ENOSPC instead of killing the process with SIGBUS when a memory-mapped page cannot be
    stored.
    """
    out = progress = None
    try:
        for start in range(0, len(wanted), batch_size):
            chunk = wanted[start : start + batch_size]
            acts = encode(chunk)
            if out is None:
                shape = (len(wanted), *acts.shape[1:])
                need = int(np.prod(shape)) * np.dtype(np_dtype).itemsize
                tmp.parent.mkdir(parents=True, exist_ok=True)
                check_free_space(
                    tmp.parent, need, what="the feature cache (--cache-dir or $CLIPSEG_BENCH_CACHE)"
                )
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np_dtype, shape=shape)
                _reserve(tmp)
                progress = bar()
            out[start : start + len(chunk)] = acts.float().numpy().astype(np_dtype)
            progress.update(len(chunk))
        out.flush()
    finally:
        if progress is not None:
            progress.close()
        del out


def _reserve(path: Path) -> None:
    """Allocate a file's blocks now (``posix_fallocate``) where the file system can."""
    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    finally:
        os.close(fd)
