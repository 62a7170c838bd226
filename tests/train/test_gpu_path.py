"""The GPU path on the CPU: what the hot loop may not do on a device, and the stand-ins for device-only code.

No GPU here, so the tests use stand-ins: the ``meta`` device (a tensor with a shape and no data:
reading one on the host, ``.item()``, ``.cpu()``, ``.tolist()``, ``bool()``, or a data-dependent
``nonzero``, raises) for "the loop never waits for the device inside a step"; a CPU tensor for "the
feature cache held on the device"; a ``spawn`` DataLoader for workers that open their own memory maps.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.numpy import load_file
from test_train import _cfg as train_cfg

from clipseg_bench.train.loop import train

META = torch.device("meta")


def _cfg(prepared, out, **kw):
    """test_train's run config (tiny, 64 px), smaller: 4 slices a step, 8 val slices, one thread."""
    return train_cfg(prepared, out, **{"batch_size": 4, "val_max_slices": 8, "threads": 1, **kw})


class _MetaAccelerator:
    """The run's Accelerator with its device replaced by ``meta`` (everything else delegated)."""

    def __init__(self, acc):
        self._acc = acc

    device = META

    def __getattr__(self, name):
        return getattr(self._acc, name)


def _meta_setup(prepared, tmp_path, *, on_device: str):
    """A decoder-only setup built as train() builds it, then moved to the meta device."""
    from clipseg_bench.train.resident import ResidentData
    from clipseg_bench.train.setup import build_training, make_accelerator

    cfg = _cfg(prepared, tmp_path / "r", strategy="decoder", feature_cache_on_device=on_device, log_every=2)
    setup = build_training(cfg, make_accelerator(cfg))
    setup.accelerator = _MetaAccelerator(setup.accelerator)
    setup.module.to(META)
    setup.prompt_emb = setup.prompt_emb.to(META)
    if setup.resident is not None:
        r = setup.resident
        setup.resident = ResidentData(r.features.to(META), r.labels.to(META), r.present_ids)
    params = [p for p in setup.model.parameters() if p.requires_grad]
    setup.optimizer = torch.optim.SGD(params, lr=1e-3)  # fused AdamW has no meta kernel; not the loop's code
    setup.scheduler = torch.optim.lr_scheduler.LambdaLR(setup.optimizer, lambda _: 1.0)
    return setup


@pytest.mark.parametrize("on_device", ["yes", "no"])
def test_the_training_step_never_reads_the_device(prepared_dir, tmp_path, monkeypatch, on_device):
    """A whole epoch on the meta device: any host read of device data inside a step would raise
    (``.item()``, ``.cpu()``, ``.tolist()``, ``bool()``, ``nonzero``); the loop reads only at its sync
    points, every ``log_every`` steps and at the epoch end, and never synchronises."""
    from tqdm.auto import tqdm

    from clipseg_bench.train import loop
    from clipseg_bench.train.tally import Reading, StepTally

    setup = _meta_setup(prepared_dir, tmp_path, on_device=on_device)
    assert (setup.resident is not None) == (on_device == "yes")
    reads = []

    def read(self, step):  # a real read would copy meta data to the host: recorded instead
        reads.append((step, self.steps, len(self._counts), self._loss_sum.device))
        self._counts.clear()
        return Reading(step, self.epoch, self.steps, 0.0, 0.0, float("nan"))

    monkeypatch.setattr(StepTally, "read", read)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: pytest.fail("synchronize in the loop"))
    steps = min(setup.total_steps, len(setup.loader))
    assert steps >= 4
    step, stats = loop.train_epoch(setup, 0, 0, tqdm(disable=True))
    assert step == stats["steps"] == steps
    # reads at steps 2, 4, ... and one at the epoch end; between two, chunks accumulated on the device
    assert [r[0] for r in reads] == [*range(2, steps + 1, 2), steps]
    assert all(r[3] == META for r in reads) and reads[0][2] >= 2 and reads[0][1] == 2


def test_cache_held_on_the_device_trains_like_the_memory_map(prepared_dir, tmp_path):
    """Decoder-only with the cache and labels resident (``feature_cache_on_device: yes``; on the CPU a
    tensor in memory) against the loader reading the memory map: the same run, bit for bit."""
    runs = {
        where: train(
            _cfg(
                prepared_dir, tmp_path / where, strategy="decoder", max_steps=6, feature_cache_on_device=where
            )
        )
        for where in ("yes", "no")
    }
    a, b = (pd.read_csv(runs[w] / "history.csv") for w in ("yes", "no"))
    cols = ["epoch", "step", "loss", "train_dice", "val_dice", "lr"]
    pd.testing.assert_frame_equal(a[cols], b[cols])
    assert a["loss"].notna().all() and a["train_dice"].gt(0).any()  # something was trained and scored
    wa, wb = (load_file(runs[w] / "weights.safetensors") for w in ("yes", "no"))
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)


def test_spawn_workers_open_their_own_memory_maps(prepared_dir):
    """Under ``spawn`` (Python 3.14's Linux default) a worker gets the dataset pickled: the pickle holds
    no array (not the prepared slices, not the feature cache), and the worker's items are the same."""
    from torch.utils.data import DataLoader

    from clipseg_bench.data.dataset import PreparedData, SliceDataset
    from clipseg_bench.model.feature_cache import build_feature_cache
    from clipseg_bench.model.load import load_model

    data = PreparedData(prepared_dir)
    rows = data.slices("train")
    loaded = load_model("tiny", image_size=64)
    features, _ = build_feature_cache(
        loaded.model,
        data=data,
        rows=rows,
        name="spawn_test",
        size=64,
        mean=loaded.mean,
        std=loaded.std,
        show_progress=False,
    )
    dataset = SliceDataset(data, "train", size=64, features=features, rows=rows)
    for i in range(3):  # the parent has read some rows: its memory maps are open
        dataset[i]
    arrays = features.nbytes + sum(data.array(c, "label").nbytes for c in data.cases("train"))
    blob = pickle.dumps(dataset)
    assert len(blob) < min(arrays / 10, 200_000), (len(blob), arrays)
    clone = pickle.loads(blob)
    assert clone.data._arrays == {} and clone.features._array is None  # reopened where read
    loader = DataLoader(dataset, batch_size=5, num_workers=2, multiprocessing_context="spawn")
    served = next(iter(loader))
    for i in range(5):
        item = dataset[i]
        for key in ("labels", "present_ids", "features"):
            assert torch.equal(served[key][i], item[key]), key


def _old_select_pairs(targets, *, absent_fraction, generator):
    """The selection as it ran on the device before (from the (B, K, H, W) targets)."""
    present = targets.flatten(2).amax(-1) > 0
    select = present | (torch.rand(present.shape, generator=generator) < absent_fraction)
    if not select.any():
        select[0, 0] = True
    return select.nonzero()


@pytest.mark.parametrize("fraction", [0.0, 0.1, 1.0])
def test_pairs_chosen_on_the_host_are_the_device_selection(fraction):
    """select_pairs reads which label ids each slice holds (known on the host) and draws the same
    numbers: the same pairs, in the same order, as selecting from the targets on the device."""
    from clipseg_bench.data.dataset import organ_targets, present_ids
    from clipseg_bench.data.sampling import select_pairs

    gen = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 14, (6, 16, 16), generator=gen, dtype=torch.uint8)
    labels[labels > 9] = 0  # organs 10-13 absent everywhere
    labels[2] = 0  # a slice without any organ
    organs = [1, 3, 6, 11, 13, 2]
    ids = torch.from_numpy(np.stack([present_ids(lab) for lab in labels.numpy()]))
    for seed in range(5):
        new = select_pairs(
            ids[:, organs], absent_fraction=fraction, generator=torch.Generator().manual_seed(seed)
        )
        old = _old_select_pairs(
            organ_targets(labels, organs),
            absent_fraction=fraction,
            generator=torch.Generator().manual_seed(seed),
        )
        assert torch.equal(new, old)
    empty = torch.zeros(2, 3, dtype=torch.bool)
    assert select_pairs(empty, absent_fraction=0.0, generator=gen).tolist() == [[0, 0]]


def test_tally_reads_what_per_chunk_reads_gave(monkeypatch):
    """The loss and Dice kept on the device and read once equal, bit for bit, the old per-chunk reads
    (``loss.item()`` summed in Python floats, Dice values extended into a list, then ``np.mean``)."""
    from clipseg_bench.evaluation import metrics
    from clipseg_bench.evaluation.metrics import present_pairs_dice
    from clipseg_bench.train.tally import StepTally

    gen = torch.Generator().manual_seed(0)
    tally = StepTally(torch.device("cpu"))
    monkeypatch.setattr(metrics, "_on_accelerator", lambda p, g: True)  # the device path: counts stay tensors
    loss_sum, chunks, last = 0.0, [], 0.0
    for _step in range(5):
        step_loss = 0.0
        for _chunk in range(3):
            loss = torch.rand((), generator=gen) * 0.37
            pred = torch.rand(7, 12, 12, generator=gen) > 0.5
            tgt = (torch.rand(7, 12, 12, generator=gen) > 0.8).float()
            tgt[:2] = 0  # absent organs: no Dice
            tally.add_chunk(loss, pred, tgt)
            assert isinstance(tally._counts[-1][0], torch.Tensor)  # kept as tensors, not read
            step_loss += loss.item()
            chunks.append((pred.numpy(), tgt.numpy()))
        tally.end_step()
        loss_sum += step_loss
        last = step_loss
    reading = tally.read(5)
    monkeypatch.undo()  # the old reads counted with numpy on the host
    dices = [d for pred, tgt in chunks for d in present_pairs_dice(pred, tgt).tolist()]
    assert reading.loss == loss_sum / 5 and reading.last_loss == last
    assert reading.train_dice == float(np.mean(dices)) and len(tally.dices) == len(dices) == 5 * 3 * 5


def test_the_first_non_finite_step_is_kept_on_the_device_until_the_read():
    """The divergence check is part of the tally: the epoch's first step with a non-finite loss is
    found on the device (no host read per step: it works on ``meta``) and comes back with the read,
    with each step's rate for the message."""
    from clipseg_bench.train.tally import StepTally

    pred, tgt = torch.zeros(2, 4, 4, dtype=torch.bool), torch.zeros(2, 4, 4)
    losses = [0.5, 0.25, float("nan"), 0.125, float("inf")]  # steps 11..15: 13 is the first bad one
    on_meta = StepTally(META, first_step=11)
    for lr, loss in enumerate(losses):
        on_meta.add_chunk(torch.tensor(loss, device=META), pred.to(META), tgt.to(META))
        on_meta.end_step(lr=0.1 * lr)
    assert on_meta._bad_step.device == META  # nothing was read
    tally = StepTally(torch.device("cpu"), first_step=11)
    for lr, loss in enumerate(losses):
        tally.add_chunk(torch.tensor(loss), pred, tgt)
        tally.end_step(lr=0.1 * lr)
        if lr == 1:
            assert tally.read(12).bad_step == -1  # a sync point before it: none yet
    assert tally.read(15).bad_step == 13 and tally.lrs[13 - 11] == 0.2


def test_validation_sharded_over_two_processes_equals_one(prepared_dir, tmp_path):
    """Two gloo processes score their shards of whole batches and gather the counts: the val and train
    Dice of a run are one process's, exactly (zero-shot: both runs hold the same weights)."""
    from test_train import _torchrun

    from clipseg_bench import cli

    args = [
        "--strategy",
        "zeroshot",
        "--image-size",
        "64",
        "--set",
        "val_max_slices=24",
        "--set",
        "threads=1",
    ]
    two, one = tmp_path / "two", tmp_path / "one"
    r = _torchrun("train", "--data", str(prepared_dir), "--out", str(two), *args, port=29531)
    assert r.returncode == 0, r.stderr[-3000:]
    assert cli.main(["train", "--data", str(prepared_dir), "--out", str(one), *args]) == 0
    f2, f1 = (json.loads((run / "run.json").read_text()) for run in (two, one))
    assert f2["hardware"]["num_processes"] == 2 and f2["validation"]["val"]["slices"] == 24
    assert f2["final"] == f1["final"] and 0 < f1["final"]["val_dice"] < 1


def test_precision_defaults_follow_the_device(monkeypatch):
    """``auto`` is bf16 on a CUDA device with bf16 support and fp32 (``no``) elsewhere, so CPU numbers
    do not change; TF32 is only ever switched on for CUDA."""
    from clipseg_bench.model.precision import resolve_precision, use_tf32

    assert resolve_precision("auto", "cpu") == "no" and resolve_precision("bf16", "cpu") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", "cuda") == "bf16" and resolve_precision("no", "cuda") == "no"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", "cuda:0") == "no"
    before = torch.backends.cuda.matmul.allow_tf32
    assert use_tf32("cpu", True) is False and torch.backends.cuda.matmul.allow_tf32 == before
    with pytest.raises(ValueError, match="unknown mixed precision"):
        resolve_precision("fp8", "cpu")


def test_run_json_records_how_the_device_computes(prepared_dir, tmp_path):
    run = train(_cfg(prepared_dir, tmp_path / "r", strategy="decoder", max_steps=2))
    info = json.loads((run / "run.json").read_text())
    assert info["compute"] == {"mixed_precision": "no", "tf32": False, "attention": "sdpa", "pair_chunk": 16}
    timing = info["timing"]
    assert timing["clock"] == "wall" and set(timing["host_s"]) == {*timing["breakdown_s"], "sync"}


class _FakeEvent:
    """A CUDA event stand-in: the time it was recorded at."""

    def __init__(self, enable_timing=False):
        self.at = None

    def record(self):
        import time

        self.at = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, end):  # milliseconds, as CUDA's
        return (end.at - self.at) * 1000.0


def test_cuda_timer_records_events_and_reads_them_at_collect(monkeypatch):
    """On CUDA a phase records two events and waits for nothing; their times reach ``totals`` only
    when the loop collects them at a sync point (``profile_sync`` synchronises instead)."""
    import time

    from clipseg_bench.train.timing import StepTimer

    synced = []
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: synced.append(a))
    timer = StepTimer(torch.device("cuda"))
    for _ in range(3):
        with timer.phase("forward"):
            time.sleep(0.01)
    assert timer.clock == "cuda events" and synced == [] and timer.totals["forward"] == 0.0
    assert timer.host["forward"] >= 0.03
    timer.collect()
    assert timer.totals["forward"] >= 0.03 and timer._pending == [] and len(timer._free) == 6
    exact = StepTimer(torch.device("cuda"), exact=True)
    with exact.phase("data"):
        pass
    assert len(synced) == 2 and exact.clock == "wall, synchronised" and exact._pending == []
