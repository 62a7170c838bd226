"""The feature cache's build: resumable, refused before writing when the disk is short, shared between
processes through a lock, and one file for nested training subsets."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from clipseg_bench import provenance
from clipseg_bench.data.dataset import PreparedData
from clipseg_bench.errors import RunFailed
from clipseg_bench.model import feature_cache as fc
from clipseg_bench.model.load import load_model

SIZE = 64


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_model("tiny", image_size=SIZE)


def _cache_folder(tiny, data) -> Path:
    """The tiny model's gray fp16 cache folder in ``data`` (created)."""
    key = fc.cache_key(tiny.model, data=data, size=SIZE, mean=tiny.mean, std=tiny.std)
    folder = fc.cache_root(data) / key
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _build(tiny, data, rows, name, **kw):
    return fc.build_feature_cache(
        tiny.model,
        data=data,
        rows=rows,
        name=name,
        size=SIZE,
        mean=tiny.mean,
        std=tiny.std,
        show_progress=False,
        batch_size=4,
        **kw,
    )


def _counting(encoder, calls: list, fail_at: int | None = None):
    """``feature_cache._encoder`` whose encode function records each batch's size (and is killed at
    call ``fail_at``)."""

    def make(*a, **k):
        encode = encoder(*a, **k)

        def counted(chunk):
            calls.append(len(chunk))
            if len(calls) == fail_at:
                raise KeyboardInterrupt
            return encode(chunk)

        return counted

    return make


def test_an_interrupted_build_resumes_where_it_stopped(prepared_dir, tiny, monkeypatch):
    data = PreparedData(prepared_dir)
    rows = data.slices("train").iloc[:22]
    reference, _ = _build(tiny, data, rows, "resume_ref")
    monkeypatch.setattr(fc, "PROGRESS_EVERY", 8)
    encoder, calls = fc._encoder, []
    # killed during the 4th batch of 4: 12 rows encoded, 8 of them in the last progress record
    monkeypatch.setattr(fc, "_encoder", _counting(encoder, calls, fail_at=4))
    with pytest.raises(KeyboardInterrupt):
        _build(tiny, data, rows, "resume")
    folder = reference.path.parent
    assert not (folder / "resume.npy").exists() and (folder / ".resume.partial.json").is_file()
    calls.clear()
    monkeypatch.setattr(fc, "_encoder", _counting(encoder, calls))
    resumed, info = _build(tiny, data, rows, "resume")
    assert sum(calls) == 22 - 8 and not info.reused  # only what the progress record did not hold
    assert np.array_equal(np.asarray(resumed[:]), np.asarray(reference[:]))
    assert not (folder / ".resume.partial.json").exists()


def test_a_short_disk_is_refused_before_writing(prepared_dir, tiny, monkeypatch):
    data = PreparedData(prepared_dir)
    rows = data.slices("val").iloc[:6]
    monkeypatch.setattr(provenance, "free_bytes", lambda folder: 10_000)  # check_free_space's reading
    with pytest.raises(RunFailed) as err:
        _build(tiny, data, rows, "short_disk")
    message = str(err.value)
    assert "the feature cache" in message and "needs" in message and "10.0 kB free" in message
    assert "\n" not in message
    folder = _cache_folder(tiny, data)
    assert str(folder) in message
    assert not any(folder.glob("*short_disk*.npy")) and not any(folder.glob(".short_disk.partial*"))


def test_a_second_process_waits_for_the_build_and_reuses_it(prepared_dir, tiny, monkeypatch):
    import fcntl

    data = PreparedData(prepared_dir)
    rows = data.slices("val").iloc[:5]
    folder = _cache_folder(tiny, data)
    holder = open(provenance.lock_path(folder, "feature-cache", "shared"), "a+")
    fcntl.flock(holder, fcntl.LOCK_EX)  # another process is building
    done = {}
    waiter = threading.Thread(target=lambda: done.setdefault("info", _build(tiny, data, rows, "shared")[1]))
    waiter.start()
    time.sleep(1.5)
    assert waiter.is_alive() and not (folder / "shared.npy").exists()  # waiting, not building
    # the holder builds (under the lock it holds) and lets go
    wanted = [[str(c), int(z)] for c, z in zip(rows["case"], rows["z"])]
    encode = fc._encoder(
        tiny.model,
        data,
        size=SIZE,
        mean=tiny.mean,
        std=tiny.std,
        device="cpu",
        channels="gray",
        windows=None,
        precision="no",
    )
    _, info = fc._Build(folder, "shared", wanted).run(
        encode, np_dtype=np.float16, batch_size=4, show_progress=False
    )
    assert not info.reused
    fcntl.flock(holder, fcntl.LOCK_UN)
    holder.close()
    waiter.join(timeout=60)
    assert done["info"].reused  # it read the holder's file instead of building its own


def test_a_stalled_builder_is_reported(prepared_dir, tiny, monkeypatch):
    import fcntl

    data = PreparedData(prepared_dir)
    rows = data.slices("val").iloc[:3]
    folder = _cache_folder(tiny, data)
    monkeypatch.setattr(fc, "STALL_S", 1.0)
    with open(provenance.lock_path(folder, "feature-cache", "stalled"), "a+") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)  # held, no progress record ever written
        provenance.write_holder(holder.fileno(), "train")  # as the builder's lock records itself
        with pytest.raises(RunFailed, match="without progress") as err:
            _build(tiny, data, rows, "stalled")
    assert f"`train` process {os.getpid()} on " in str(err.value)  # the message names the holder


def test_a_training_subset_reads_the_full_cache(prepared_dir, tmp_path):
    """train_cases=1: the run's features are rows of the split's train_kept cache; no file of its own."""
    import json

    from clipseg_bench.config import load_config
    from clipseg_bench.train.setup import build_training, make_accelerator

    cfg = load_config(
        None,
        {
            "data": str(prepared_dir),
            "out": str(tmp_path / "r"),
            "strategy": "decoder",
            "image_size": SIZE,
            "train_cases": 1,
            "val_max_slices": 4,
            "threads": 1,
        },
    )
    setup = build_training(cfg, make_accelerator(cfg))
    full = PreparedData(prepared_dir).slices("train", kept_only=True)
    assert len(setup.train_rows) < len(full) and setup.features.path.name == "train_kept.npy"
    folder = setup.features.path.parent
    assert not list(folder.glob("train_kept_n*")) and json.loads(
        (folder / "train_kept.rows.json").read_text()
    ) == [[str(c), int(z)] for c, z in zip(full["case"], full["z"])]
    at = {(str(c), int(z)): i for i, (c, z) in enumerate(zip(full["case"], full["z"]))}
    for i in (0, len(setup.train_rows) - 1):
        row = setup.train_rows.iloc[i]
        assert np.array_equal(setup.features[i], setup.features.array[at[(str(row["case"]), int(row["z"]))]])
