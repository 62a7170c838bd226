"""input_channels and --postprocess through train, evaluate, segment and score (issue 14)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

import clipseg_bench.evaluation.predict as predict_mod
import clipseg_bench.train.loop as loop_mod
from clipseg_bench.config import load_config
from clipseg_bench.data.channels import WINDOWS
from clipseg_bench.data.dataset import PreparedData
from clipseg_bench.data.volumes import normalize
from clipseg_bench.evaluation.evaluate import evaluate_run
from clipseg_bench.evaluation.score import score_folder
from clipseg_bench.evaluation.segment import segment
from clipseg_bench.model.feature_cache import build_feature_cache, cache_key
from clipseg_bench.model.forward import encode_images, preprocess
from clipseg_bench.model.load import load_model
from clipseg_bench.strategies import available
from clipseg_bench.train.loop import train

SIZE = 64  # the phantom fixture's in-plane size: no resize, so model inputs are the cached values


def _cfg(prepared, out, strategy, channels, steps):
    return load_config(
        None,
        {
            "data": str(prepared),
            "out": str(out),
            "model": "tiny",
            "strategy": strategy,
            "image_size": SIZE,
            "batch_size": 4,
            "lr": 1e-3,
            "max_steps": steps,
            "val_max_slices": 4,
            "input_channels": channels,
        },
    )


def _expected(data: PreparedData, case: str, z: int, channels: str) -> np.ndarray:
    """(3, H, W) written out from the caches, independent of data.channels' indexing."""
    if channels == "neighbors":
        gray, n = data.array(case, "image"), data.cases_meta[case]["n_slices"]
        return np.stack([gray[max(z - 1, 0)], gray[z], gray[min(z + 1, n - 1)]])
    return np.stack([normalize(data.array(case, "hu")[z], w) for w in WINDOWS])


def _spy(monkeypatch, module, seen: list):
    real = module.preprocess

    def spy(images, **kw):
        seen.append(images.detach().cpu().clone())
        return real(images, **kw)

    monkeypatch.setattr(module, "preprocess", spy)


@pytest.mark.parametrize("channels", ["neighbors", "windows"])
def test_training_evaluate_and_segment_feed_the_same_channels(
    channels, prepared_dir, phantom_dir, tmp_path, monkeypatch
):
    data = PreparedData(prepared_dir)
    batches = []
    real_inputs = loop_mod._step_inputs

    def record(setup, batch, gen):
        batches.append((batch["index"].clone(), batch["image"].clone()))
        return real_inputs(setup, batch, gen)

    monkeypatch.setattr(loop_mod, "_step_inputs", record)
    run = train(_cfg(prepared_dir, tmp_path / "run", "full", channels, steps=1))
    rows = data.slices("train")
    index, images = batches[0]
    for i, img in zip(index.tolist(), images):
        case, z = rows.at[i, "case"], int(rows.at[i, "z"])
        assert np.array_equal(img.numpy(), _expected(data, case, z, channels)), (case, z)

    seen_eval: list = []
    _spy(monkeypatch, predict_mod, seen_eval)
    metrics = evaluate_run(run=run, show_progress=False)
    assert metrics["postprocess"] == "none"  # the default headline: the scores as predicted
    assert metrics["per_case"] == metrics["postprocess_3d"]["none"]["per_case"]
    case = metrics["cases"][0]
    n = data.cases_meta[case]["n_slices"]
    evaluated = torch.cat(seen_eval)[:n].numpy()
    cached = np.stack([_expected(data, case, z, channels) for z in range(n)])
    assert evaluated.shape == (n, 3, SIZE, SIZE) and np.array_equal(evaluated, cached)

    seen_seg: list = []
    _spy(monkeypatch, predict_mod, seen_seg)
    segment(run=run, ct=phantom_dir / "images" / f"{case}_0000.nii.gz", out=tmp_path / "m.nii.gz")
    assert np.array_equal(torch.cat(seen_seg).numpy(), cached)
    pre = json.loads((run / "run.json").read_text())["preprocessing"]
    assert pre["input_channels"] == channels
    assert (pre.get("channel_windows") is not None) == (channels == "windows")
    assert (pre.get("neighbor_spacing_mm") is not None) == (channels == "neighbors")


@pytest.mark.parametrize(
    ("strategy", "channels"),
    [(s, "neighbors" if i % 2 else "windows") for i, s in enumerate(available())],
)
def test_every_strategy_trains_and_validates_with_channels(strategy, channels, prepared_dir, tmp_path):
    """Frozen encoders go through the feature cache, trained ones through the loader; both validate.
    (evaluate and segment read the same channel images: the tests above and below.)"""
    run = train(_cfg(prepared_dir, tmp_path / strategy, strategy, channels, steps=1))
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished" and info["preprocessing"]["input_channels"] == channels
    assert np.isfinite(info["final"]["val_dice"])


@pytest.fixture(scope="module")
def neighbors_run(prepared_dir, tmp_path_factory):
    return train(_cfg(prepared_dir, tmp_path_factory.mktemp("runs") / "nb", "decoder", "neighbors", steps=1))


def test_feature_cache_key_and_contents_follow_the_channels(prepared_dir):
    data = PreparedData(prepared_dir)
    torch.manual_seed(0)
    lm = load_model("tiny", image_size=SIZE)
    kw = {"data": data, "size": SIZE, "mean": lm.mean, "std": lm.std}
    keys = {c: cache_key(lm.model, channels=c, **kw) for c in ("gray", "neighbors", "windows")}
    assert len(set(keys.values())) == 3
    assert keys["gray"] == cache_key(lm.model, **kw)  # gray keeps the key caches had before the field
    rows = data.slices("val").iloc[:3]
    feats, _ = build_feature_cache(
        lm.model, rows=rows, name="t", channels="neighbors", show_progress=False, **kw
    )
    case, z = rows["case"].iloc[1], int(rows["z"].iloc[1])
    pv = preprocess(
        torch.from_numpy(data.inputs(case, [z], "neighbors")), size=SIZE, mean=lm.mean, std=lm.std
    )
    with torch.no_grad():
        direct = torch.stack(encode_images(lm.model, pv), dim=1)[0].to(torch.float16)
    assert torch.equal(torch.from_numpy(np.array(feats[1])), direct)
    assert keys["neighbors"] in str(feats.path)


def test_evaluate_writes_scores_with_and_without_clean_up(neighbors_run):
    lcc = evaluate_run(run=neighbors_run, show_progress=False, postprocess_mode="lcc")
    assert lcc["postprocess"] == "lcc" and set(lcc["postprocess_3d"]) == {"none", "lcc"}
    assert lcc["per_case"] == lcc["postprocess_3d"]["lcc"]["per_case"]
    assert lcc["summary"] == lcc["postprocess_3d"]["lcc"]["summary"]
    on_disk = json.loads((neighbors_run / "metrics.json").read_text())
    assert on_disk["postprocess_3d"]["none"]["summary"] == lcc["postprocess_3d"]["none"]["summary"]


def test_score_and_segment_postprocess(neighbors_run, phantom_dir, tmp_path):
    labels = tmp_path / "labels"
    pred = tmp_path / "pred"
    labels.mkdir()
    pred.mkdir()
    case = "phantomA_0000"
    img = nib.load(phantom_dir / "labels" / f"{case}.nii.gz")
    gt = np.asarray(img.dataobj).astype(np.uint8)
    nib.save(nib.Nifti1Image(gt, img.affine), labels / f"{case}.nii.gz")
    noisy = gt.copy()
    noisy[:3, :3, :3] = 1  # a stray liver blob in a corner
    nib.save(nib.Nifti1Image(noisy, img.affine), pred / f"{case}.nii.gz")
    raw = score_folder(pred=pred, labels=labels).set_index("organ")
    clean = score_folder(pred=pred, labels=labels, postprocess_mode="lcc").set_index("organ")
    assert raw.at["liver", "dsc"] < clean.at["liver", "dsc"] == pytest.approx(1.0)

    run = neighbors_run
    ct = phantom_dir / "images" / f"{case}_0000.nii.gz"
    raw_mask = segment(run=run, ct=ct, out=tmp_path / "raw.nii.gz")
    lcc_mask = segment(run=run, ct=ct, out=tmp_path / "lcc.nii.gz", postprocess_mode="lcc")
    from clipseg_bench.evaluation.postprocess import keep_largest_components

    raw_img = nib.load(raw_mask)
    want = keep_largest_components(np.asarray(raw_img.dataobj), raw_img.affine)
    assert np.array_equal(np.asarray(nib.load(lcc_mask).dataobj), want)


def test_evaluate_and_segment_take_the_windows_the_run_recorded(
    prepared_dir, phantom_dir, tmp_path, monkeypatch
):
    """A run's preprocessing lives in its run.json: evaluate and segment build ``windows`` inputs with
    the HU windows recorded there, not with today's constant (a later version may change it)."""
    run = train(_cfg(prepared_dir, tmp_path / "run", "full", "windows", steps=1))
    record = json.loads((run / "run.json").read_text())
    assert record["preprocessing"]["channel_windows"] == [dict(w) for w in WINDOWS]
    recorded = [{"mode": "hu", "level": -600.0, "width": 1500.0}, WINDOWS[0], {"mode": "minmax"}]
    record["preprocessing"]["channel_windows"] = recorded  # as if trained by another version
    (run / "run.json").write_text(json.dumps(record))
    data = PreparedData(prepared_dir)
    seen_eval: list = []
    _spy(monkeypatch, predict_mod, seen_eval)
    case = evaluate_run(run=run, show_progress=False)["cases"][0]
    hu = data.array(case, "hu")
    want = np.stack([np.stack([normalize(hu[z], w) for w in recorded]) for z in range(len(hu))])
    assert np.array_equal(torch.cat(seen_eval)[: len(hu)].numpy(), want)
    seen_seg: list = []
    _spy(monkeypatch, predict_mod, seen_seg)
    segment(run=run, ct=phantom_dir / "images" / f"{case}_0000.nii.gz", out=tmp_path / "m.nii.gz")
    assert np.array_equal(torch.cat(seen_seg).numpy(), want)
