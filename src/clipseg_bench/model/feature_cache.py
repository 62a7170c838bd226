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

The build is resumable and shared: it runs under an exclusive lock on its folder (a second process,
or another rank of a distributed run, waits for it and then reuses the file instead of waiting in a
collective with a fixed timeout), writes into a partial file whose progress is recorded every few
hundred slices (a build killed midway continues where it stopped), and checks, then reserves, its disk
space before it writes. Readers get :class:`CachedRows`, which opens its memory map on first read, so a
DataLoader worker under ``spawn`` opens its own instead of receiving a pickled copy of the array.
"""

from __future__ import annotations

import contextlib
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
from clipseg_bench.errors import RunFailed
from clipseg_bench.model.families import family_of
from clipseg_bench.model.forward import encode_images, preprocess, stack_features
from clipseg_bench.model.precision import autocast
from clipseg_bench.provenance import (
    check_free_space,
    holder_text,
    lock_path,
    read_holder,
    reserve_file,
    try_flock,
    write_error,
    write_holder,
)

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
    precision: str = "no",
) -> str:
    """The cache folder's name: a hash of everything the cached values depend on.

    Args:
        windows: the run's HU windows of ``windows`` mode (``Preprocessing.windows``; None: today's).
        precision: the resolved autocast the encoder runs under (``no``, ``bf16``, ``fp16``); fp32
            caches keep the keys they had before it was a choice.
    """
    h = hashlib.blake2b(digest_size=8)
    h.update(family_of(model).vision_fingerprint(model).encode())
    h.update((data.root / "dataset.json").read_bytes())
    h.update(json.dumps({"size": size, "mean": list(mean), "std": list(std)}).encode())
    if dtype != "fp16":  # fp16 caches keep the keys they had before the dtype became a choice
        h.update(dtype.encode())
    h.update(_channels_key(channels, windows))
    if precision != "no":
        h.update(f"autocast {precision}".encode())
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


class CachedRows:
    """Rows of a feature-cache file, in a given order, memory-mapped on first read.

    Pickling it (a DataLoader worker under ``spawn``) sends the path and the row positions, never the
    array: the worker opens its own memory map.

    Args:
        path: the cache's ``.npy`` file (N_file, ...).
        positions: which file rows, in which order (default: all, in order).
    """

    def __init__(self, path: str | Path, positions: np.ndarray | None = None):
        self.path = Path(path)
        self.positions = None if positions is None else np.asarray(positions, dtype=np.int64)
        # Opened here, so this process keeps reading this file even if a later build replaces it;
        # a process it is pickled to checks that the file it reopens is still this one.
        self._array: np.ndarray | None = np.load(self.path, mmap_mode="r")
        self._stamp = _stamp(self.path)

    @property
    def array(self) -> np.ndarray:
        """The whole file, memory-mapped (reopened on first use after unpickling)."""
        if self._array is None:
            if _stamp(self.path) != self._stamp:
                raise RunFailed(self.path, "the feature cache file was replaced while a run was reading it")
            self._array = np.load(self.path, mmap_mode="r")
        return self._array

    def __len__(self) -> int:
        return len(self.array) if self.positions is None else len(self.positions)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.array.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def __getitem__(self, key):
        """Row ``key`` (an int), or rows (a slice or an index array) as a numpy array."""
        return self.array[key] if self.positions is None else self.array[self.positions[key]]

    def take(self, positions) -> CachedRows:
        """These rows (positions into this view), as a view of the same file."""
        positions = np.asarray(positions, dtype=np.int64)
        view = CachedRows.__new__(CachedRows)
        view.__dict__.update(self.__dict__)  # the same open file
        view.positions = positions if self.positions is None else self.positions[positions]
        return view

    def to_tensor(self, device: torch.device | str, *, chunk: int = 256) -> torch.Tensor:
        """All rows as one tensor on ``device``, copied ``chunk`` rows at a time (bounded host memory)."""
        out = torch.empty(self.shape, dtype=torch.from_numpy(np.zeros(0, self.dtype)).dtype, device=device)
        for start in range(0, len(self), chunk):
            rows = torch.from_numpy(np.array(self[start : start + chunk]))  # a writable copy of the chunk
            out[start : start + len(rows)].copy_(rows)
        return out

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_array"] = None  # reopened where it is read
        return state


def _stamp(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


@dataclass
class CacheInfo:
    path: Path
    rows: int
    size_mb: float
    build_s: float  # 0.0 when an existing cache was reused
    reused: bool


BUILD_BATCH = 16  # slices encoded at a time
PROGRESS_EVERY = 256  # slices between two progress records of a build (what a resumed build keeps)
STALL_S = 600.0  # a waiting process gives up after this long without progress from the builder


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
    batch_size: int = BUILD_BATCH,
    show_progress: bool = True,
    key: str | None = None,
    dtype: str = "fp16",
    channels: str = "gray",
    windows=None,
    precision: str = "no",
    root: Path | None = None,
) -> tuple[CachedRows, CacheInfo]:
    """Compute (or reuse) the activations for the slices listed in ``rows``.

    Safe to call from several processes at once (ranks of one run, runs sharing a PREPARED folder):
    one builds under the folder's lock while the others wait for it and reuse its file. A build
    interrupted midway resumes from its last progress record.

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
        precision: the resolved autocast the encoder runs under (part of the key).
        root: the folder of caches (:func:`cache_root`; default: the data's own rule without a run).

    Returns:
        (:class:`CachedRows` of shape (N, ...) in ``dtype``: (N, L, T, D) for CLIPSeg, CacheInfo).
        Row i belongs to ``rows.iloc[i]``.

    Raises:
        RunFailed: not enough free disk for the cache (:func:`~clipseg_bench.provenance.check_free_space`,
            naming its folder, before anything is written) or no room while writing it; another
            process holds the build and stopped making progress for :data:`STALL_S`.
        InputError: the cache folder cannot be written (a read-only ``--cache-dir``).
    """
    inputs = {"size": size, "mean": mean, "std": std, "channels": channels, "windows": windows}
    key = key or cache_key(model, data=data, dtype=dtype, precision=precision, **inputs)
    build = _Build(
        (root or cache_root(data)) / key, name, [[str(c), int(z)] for c, z in zip(rows["case"], rows["z"])]
    )
    found = build.finished()
    if found is not None:
        return found
    encode = _encoder(model, data, device=device, precision=precision, **inputs)
    try:
        build.folder.mkdir(parents=True, exist_ok=True)
        with build.locked(show_progress):
            found = build.finished()  # built by the process we waited for
            if found is not None:
                return found
            return build.run(
                encode, np_dtype=DTYPES[dtype], batch_size=batch_size, show_progress=show_progress
            )
    except OSError as exc:  # a full disk, ulimit -f, a read-only --cache-dir
        raise write_error(exc.filename or build.folder, exc) from None


def _encoder(model, data: PreparedData, *, size, mean, std, device, channels, windows, precision):
    """A function (case, z) pairs -> (b, ...) float32 CPU activations, as the cache stores them."""
    device = torch.device(device)

    def encode(chunk: list) -> torch.Tensor:
        imgs = torch.from_numpy(np.concatenate([data.inputs(c, [z], channels, windows) for c, z in chunk]))
        pv = preprocess(resize_slices(imgs, size), size=size, mean=mean, std=std).to(device)
        with torch.no_grad(), autocast(device, precision):
            acts = stack_features(model, encode_images(model, pv))  # (b, ...): (b, L, T, D) for CLIPSeg
        return acts.float().cpu()

    return encode


class _Build:
    """One row set's cache file: finished, being built (partial file + progress record), or absent."""

    def __init__(self, folder: Path, name: str, wanted: list):
        self.folder, self.name, self.wanted = folder, name, wanted
        self.path = folder / f"{name}.npy"
        self.index_path = folder / f"{name}.rows.json"
        self.partial = folder / f".{name}.partial.npy"
        self.progress = folder / f".{name}.partial.json"

    def finished(self) -> tuple[CachedRows, CacheInfo] | None:
        """The finished file and its info when it holds exactly the wanted rows."""
        if not (self.path.is_file() and self.index_path.is_file()):
            return None
        if _read_rows(self.index_path) != self.wanted:
            return None
        info = CacheInfo(self.path, len(self.wanted), self.path.stat().st_size / 2**20, 0.0, True)
        return CachedRows(self.path), info

    @contextlib.contextmanager
    def locked(self, show_progress: bool):
        """Hold the build's lock (:func:`~clipseg_bench.provenance.lock_path` in its folder, flock as
        :func:`~clipseg_bench.provenance.output_lock`); unlike a run folder's, a second process waits
        for the holder while its build makes progress, then reuses what it built."""
        lock = lock_path(self.folder, "feature-cache", self.name)
        with os.fdopen(os.open(lock, os.O_RDWR | os.O_CREAT, 0o644), "r+b") as fh:  # closed: released
            if try_flock(fh.fileno()) is False:
                if show_progress:
                    print(
                        f"feature cache {self.name}: waiting for {holder_text(read_holder(fh.fileno()))}, "
                        f"which is building it in {self.folder}"
                    )
                self._wait(fh)
            write_holder(fh.fileno(), "feature-cache")
            yield

    def _wait(self, fh) -> None:
        last, since = self._progress_mark(), time.monotonic()
        while try_flock(fh.fileno()) is False:
            time.sleep(1.0)
            mark = self._progress_mark()
            if mark != last:
                last, since = mark, time.monotonic()
            elif time.monotonic() - since > STALL_S:
                raise RunFailed(
                    self.folder,
                    f"{holder_text(read_holder(fh.fileno()))} has held the feature cache build of "
                    f"{self.name!r} for {STALL_S:.0f} s without progress; stop it, or remove {self.folder}",
                )

    def _progress_mark(self):
        try:
            return self.progress.stat().st_mtime_ns
        except FileNotFoundError:
            return None

    def _resume_from(self, np_dtype) -> tuple[np.ndarray | None, int]:
        """The partial file and the rows it holds, when a killed build of the same rows left them."""
        try:
            record = json.loads(self.progress.read_text())
            if record.get("rows") != self.wanted or record.get("dtype") != np.dtype(np_dtype).str:
                return None, 0
            out = np.load(self.partial, mmap_mode="r+")
        except (OSError, ValueError):
            return None, 0
        return out, int(record.get("done", 0))

    def _record(self, out: np.ndarray, done: int) -> None:
        out.flush()
        doc = {"rows": self.wanted, "dtype": out.dtype.str, "done": done}
        tmp = self.progress.with_name(self.progress.name + ".tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, self.progress)

    def _create(self, np_dtype, shape: tuple[int, ...]) -> np.ndarray:
        """The partial file, its space checked and reserved (``posix_fallocate``) before anything is
        written: a disk that fills while the cache is written fails here with ENOSPC instead of
        killing the process with SIGBUS when a memory-mapped page cannot be stored."""
        need = int(np.prod(shape)) * np.dtype(np_dtype).itemsize
        check_free_space(self.folder, need, what="the feature cache (--cache-dir or $CLIPSEG_BENCH_CACHE)")
        out = np.lib.format.open_memmap(self.partial, mode="w+", dtype=np_dtype, shape=shape)
        reserve_file(self.partial)
        return out

    def run(self, encode, *, np_dtype, batch_size: int, show_progress: bool) -> tuple[CachedRows, CacheInfo]:
        """Encode the rows not yet in the partial file, then move it into place."""
        t0 = time.perf_counter()
        out, done = self._resume_from(np_dtype)
        n = len(self.wanted)
        bar = None  # shown once the space is checked: a refusal is the only line
        recorded = done
        for start in range(done, n, batch_size):
            acts = encode(self.wanted[start : start + batch_size])
            if out is None:
                out = self._create(np_dtype, (n, *acts.shape[1:]))
            if bar is None:
                bar = tqdm(
                    total=n,
                    initial=start,
                    desc=f"feature cache {self.name}",
                    unit="slice",
                    disable=not show_progress,
                )
            out[start : start + len(acts)] = acts.numpy().astype(np_dtype)
            bar.update(len(acts))
            if start + len(acts) - recorded >= PROGRESS_EVERY:
                recorded = start + len(acts)
                self._record(out, recorded)
        if bar is not None:
            bar.close()
        out.flush()
        del out
        os.replace(self.partial, self.path)  # atomic: a half-built cache is never picked up
        self.index_path.write_text(json.dumps(self.wanted))
        self.progress.unlink(missing_ok=True)
        build_s = time.perf_counter() - t0
        info = CacheInfo(self.path, n, self.path.stat().st_size / 2**20, build_s, False)
        if show_progress:
            print(
                f"feature cache {self.name}: {info.rows} slices, {info.size_mb:.1f} MiB, built in {build_s:.1f} s"
            )
        return CachedRows(self.path), info


def _read_rows(index_path: Path):
    try:
        return json.loads(index_path.read_text())
    except (OSError, ValueError):  # half-written by a run that died: rebuilt
        return None
