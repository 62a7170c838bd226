"""evaluate, segment and score agree with each other, on phantoms and on the real CT."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from clipseg_bench.config import load_config
from clipseg_bench.data.dataset import PreparedData
from clipseg_bench.evaluation.evaluate import evaluate_run
from clipseg_bench.evaluation.metrics import summarize
from clipseg_bench.evaluation.score import score_folder
from clipseg_bench.evaluation.segment import segment
from clipseg_bench.organs import ORGANS
from clipseg_bench.strategies import available
from clipseg_bench.train.loop import train


def _train(prepared, out, strategy, steps=4):
    cfg = load_config(
        None,
        {
            "data": str(prepared),
            "out": str(out),
            "model": "tiny",
            "strategy": strategy,
            "image_size": 64,
            "batch_size": 8,
            "lr": 1e-3,
            "max_steps": steps,
            "val_max_slices": 8,
        },
    )
    return train(cfg)


@pytest.fixture(scope="module")
def trained_run(prepared_dir, tmp_path_factory):
    return _train(prepared_dir, tmp_path_factory.mktemp("runs") / "adapter", "adapter", steps=6)


def test_metrics_json_has_the_promised_keys(trained_run, prepared_dir):
    m = evaluate_run(run=trained_run, show_progress=False)
    on_disk = json.loads((trained_run / "metrics.json").read_text())
    assert on_disk["dice2d"] == m["dice2d"]
    assert {"dice2d", "empty_specificity", "per_case", "summary"} <= set(on_disk)
    val_cases = [
        c
        for c, meta in json.loads((prepared_dir / "dataset.json").read_text())["cases"].items()
        if meta["split"] == "val"
    ]
    assert sorted(on_disk["per_case"]) == sorted(val_cases)
    for scores in on_disk["per_case"].values():
        assert set(scores) == {o.key for o in ORGANS}
        for s in scores.values():
            assert 0.0 <= s["dsc"] <= 1.0 and 0.0 <= s["nsd"] <= 1.0
    expect = summarize(on_disk["per_case"])
    assert on_disk["summary"]["dsc"] == pytest.approx(expect["dsc"])
    assert on_disk["summary"]["nsd"] == pytest.approx(expect["nsd"])
    for key, s in expect["per_organ"].items():
        assert on_disk["summary"]["per_organ"][key] == pytest.approx(s)
    assert 0.0 <= on_disk["dice2d"] <= 1.0 and 0.0 <= on_disk["empty_specificity"] <= 1.0
    assert on_disk["fp_slice_rate"] == pytest.approx(1 - on_disk["empty_specificity"])
    # the organs present per case, from the val labels, and the summary's mean over them
    labels = {c: np.asarray(PreparedData(prepared_dir).array(c, "label")) for c in val_cases}
    for case, keys in on_disk["organs_present"].items():
        assert keys == [o.key for o in ORGANS if (labels[case] == o.id).any()]
    assert on_disk["summary"]["dsc_present"] == pytest.approx(
        summarize(on_disk["per_case"], on_disk["organs_present"])["dsc_present"]
    )
    confusion = on_disk["prompt_confusion"]
    assert confusion["organs"] == [o.key for o in ORGANS] and np.shape(confusion["dice"]) == (13, 13)
    # the diagonal is each organ's dice2d
    for i, o in enumerate(ORGANS):
        per = on_disk["prompt_reliance_per_organ"][o.key]
        if per["pairs"]:
            assert confusion["dice"][i][i] == pytest.approx(per["dice2d"])
        else:  # never present in the val cases: no column
            assert np.isnan(confusion["dice"][i][i])
    samples = np.load(trained_run / "samples.npz")
    assert samples["image"].shape == samples["gt"].shape == samples["pred"].shape
    assert samples["image"].dtype == np.uint8 and len(samples["z"]) > 0


def test_score_of_segment_output_equals_evaluate(trained_run, phantom_dir, tmp_path):
    """The same model through segment (raw CT) + score equals evaluate (prepared slices): one code path."""
    metrics = evaluate_run(run=trained_run, show_progress=False)
    pred = tmp_path / "pred"
    pred.mkdir()
    for case in metrics["per_case"]:
        segment(
            run=trained_run, ct=phantom_dir / "images" / f"{case}_0000.nii.gz", out=pred / f"{case}.nii.gz"
        )
    table = score_folder(
        pred=pred, labels=phantom_dir / "labels", out=tmp_path / "scores.csv", missing_as_empty=True
    )
    scored = table[table["case"].isin(list(metrics["per_case"]))]
    assert len(scored) == 13 * len(metrics["per_case"])
    for row in scored.itertuples():
        ev = metrics["per_case"][row.case][row.organ]
        assert row.dsc == pytest.approx(ev["dsc"], abs=1e-6), (row.case, row.organ)
        assert row.nsd == pytest.approx(ev["nsd"], abs=1e-6), (row.case, row.organ)


def test_probabilities_are_streamed_uint8_within_half_a_level(trained_run, phantom_dir, tmp_path):
    """--probabilities: uint8 with the NIfTI scale 1/255, on the CT's grid, equal to the segmenter's
    probabilities within half a level; the temporary organ-major file is gone afterwards."""
    import torch

    from clipseg_bench.data.io import read_volume
    from clipseg_bench.data.volumes import normalize, slices_to_volume, volume_to_slices
    from clipseg_bench.evaluation.segment import load_for_segment, model_inputs

    ct = phantom_dir / "images" / sorted(p.name for p in (phantom_dir / "images").iterdir())[0]
    segment(
        run=trained_run, ct=ct, out=tmp_path / "m.nii.gz", probabilities=True, organs="liver,spleen,aorta"
    )
    img = nib.load(tmp_path / "m_probabilities.nii.gz")
    assert img.get_data_dtype() == np.uint8 and img.shape == (*nib.load(ct).shape, 3)
    assert img.dataobj.slope == pytest.approx(1 / 255) and img.dataobj.inter == 0  # the scale nibabel applies
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.nii.gz", "m_probabilities.nii.gz"]
    model = load_for_segment(run=trained_run, organs="liver,spleen,aorta", device="cpu")
    volume, affine, _ = read_volume(ct)
    slices, meta = volume_to_slices(volume, affine)
    pre = model.trained.preprocessing
    inputs = model_inputs(
        slices, normalize(slices, pre.window), channels=pre.input_channels, windows=pre.windows
    )
    probs = torch.cat([p for _, p in model.segmenter.iter_probabilities(inputs, batch_size=8)]).numpy()
    expected = np.stack([slices_to_volume(probs[:, k], meta) for k in range(3)], axis=-1)
    got = np.asarray(img.dataobj)
    assert np.abs(got - expected).max() <= 0.5 / 255 + 1e-6 and np.ptp(expected) > 4 / 255  # several levels


def test_the_probability_store_is_refused_before_it_is_written_when_the_disk_is_short(tmp_path, monkeypatch):
    """The temporary organ-major file is checked (and reserved) before a slice is segmented: a short
    disk is check_free_space's one line naming the output, not ENOSPC midway through a CT."""
    from clipseg_bench import provenance
    from clipseg_bench.errors import RunFailed
    from clipseg_bench.evaluation.segment import ProbabilityStore

    monkeypatch.setattr(provenance, "free_bytes", lambda folder: 1_000)
    with pytest.raises(RunFailed, match=r"the probabilities of m_probabilities\.nii\.gz .*needs 12\.3 kB"):
        ProbabilityStore(tmp_path / "m_probabilities.nii.gz", (3, 32, 32), 4, meta={})
    assert list(tmp_path.iterdir()) == []


ZEROSHOT_SEGMENT = ["segment", "--model", "tiny", "--strategy", "zeroshot"]


def _segment_process(ct, out, *extra) -> subprocess.CompletedProcess:
    """`clipseg-bench segment` zero-shot in its own process (exit code and stderr as a user sees them)."""
    cmd = [
        sys.executable,
        "-m",
        "clipseg_bench.cli",
        *ZEROSHOT_SEGMENT,
        "--ct",
        str(ct),
        "--out",
        str(out),
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True)


def test_segment_real_ct_keeps_grid_affine_and_shape(shared_ct, tmp_path):
    ct = shared_ct / "images" / "TS_0001_0000.nii.gz"
    out = tmp_path / "mask.nii.gz"
    r = _segment_process(ct, out, "--organs", "liver,spleen", "--probabilities")
    assert r.returncode == 0, r.stderr[-2000:]
    src, mask = nib.load(ct), nib.load(out)
    assert mask.shape == src.shape
    np.testing.assert_allclose(mask.affine, src.affine)
    assert mask.header.get_zooms() == src.header.get_zooms()
    values = set(np.unique(np.asarray(mask.dataobj)).tolist())
    assert values <= {0, 1, 3}
    probs = nib.load(tmp_path / "mask_probabilities.nii.gz")
    assert probs.shape == (*src.shape, 2)
    p = np.asarray(probs.dataobj)
    assert p.min() >= 0 and p.max() <= 1


def test_segment_of_a_flipped_ct_is_the_flipped_mask(trained_run, phantom_dir, tmp_path):
    """Reorientation round trip: an LPS copy of a CT gets the mirrored mask on its own grid."""
    src = phantom_dir / "images" / sorted(p.name for p in (phantom_dir / "images").iterdir())[0]
    img = nib.load(src)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    shape = np.array(img.shape[:3])
    shift = np.eye(4)
    shift[:2, 3] = shape[:2] - 1
    lps = nib.Nifti1Image(np.asarray(img.dataobj)[::-1, ::-1], img.affine @ shift @ flip)
    nib.save(lps, tmp_path / "lps.nii.gz")
    segment(run=trained_run, ct=src, out=tmp_path / "a.nii.gz")
    segment(run=trained_run, ct=tmp_path / "lps.nii.gz", out=tmp_path / "b.nii.gz")
    a = np.asarray(nib.load(tmp_path / "a.nii.gz").dataobj)
    b = np.asarray(nib.load(tmp_path / "b.nii.gz").dataobj)
    np.testing.assert_array_equal(a, b[::-1, ::-1])


@pytest.mark.parametrize("bad", ["not_an_image", "two_d"])
def test_segment_bad_ct_is_one_line_and_writes_nothing(tmp_path, bad):
    ct = tmp_path / "ct.nii.gz"
    if bad == "not_an_image":
        ct.write_bytes(b"this is not a nifti file")
    else:
        nib.save(nib.Nifti1Image(np.zeros((8, 8), np.int16), np.eye(4)), ct)
    out = tmp_path / "mask.nii.gz"
    r = _segment_process(ct, out)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and str(ct) in r.stderr and "Traceback" not in r.stderr
    assert not out.exists() and not any(p.name.startswith(".mask") for p in tmp_path.iterdir())


@pytest.mark.parametrize("strategy", available())
def test_train_evaluate_segment_for_every_strategy(strategy, prepared_dir, phantom_dir, tmp_path):
    run = _train(prepared_dir, tmp_path / strategy, strategy, steps=2)
    m = evaluate_run(run=run, show_progress=False)
    assert set(m["summary"]) >= {"dsc", "nsd", "per_organ"}
    case = next(iter(m["per_case"]))
    out = segment(run=run, ct=phantom_dir / "images" / f"{case}_0000.nii.gz", out=tmp_path / "m.nii.gz")
    assert nib.load(out).shape == nib.load(phantom_dir / "images" / f"{case}_0000.nii.gz").shape


# --- segment over folders ---------------------------------------------------------------------


def _segment_cli(ct, out, *extra):
    from clipseg_bench.cli import main

    return main([*ZEROSHOT_SEGMENT, "--ct", str(ct), "--out", str(out), *extra])


def test_segment_folder_skips_done_cases_and_reports_a_corrupt_one(phantom_dir, tmp_path, capsys):
    """A corrupt CT in the middle: the others are written, it is named at the end, exit 2; a re-run skips."""
    cts = tmp_path / "cts"
    cts.mkdir()
    names = sorted(p.name for p in (phantom_dir / "images").iterdir())[:2]
    for name in names:
        (cts / name).symlink_to(phantom_dir / "images" / name)
    bad = cts / "phantomA_0000a_0000.nii.gz"  # sorts between the two good cases
    bad.write_bytes(b"not a nifti file")
    out = tmp_path / "masks"
    rc = _segment_cli(cts, out, "--organs", "liver,spleen")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "1 of 3 CTs failed" in err[0] and str(bad) in err[0], err
    good = [out / f"{n[: -len('_0000.nii.gz')]}.nii.gz" for n in names]
    assert all(p.is_file() for p in good) and sorted(p.name for p in out.iterdir()) == sorted(
        p.name for p in good
    )
    for name, mask in zip(names, good):
        src = nib.load(phantom_dir / "images" / name)
        assert nib.load(mask).shape == src.shape
        np.testing.assert_allclose(nib.load(mask).affine, src.affine)
    stamps = [p.stat().st_mtime_ns for p in good]
    bad.unlink()
    assert _segment_cli(cts, out, "--organs", "liver,spleen") == 0
    assert "skipped 2 already done" in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in good] == stamps  # not rewritten


def test_segment_per_organ_files_equal_the_multilabel_mask(phantom_dir, tmp_path, capsys):
    cts = tmp_path / "cts"
    cts.mkdir()
    name = sorted(p.name for p in (phantom_dir / "images").iterdir())[0]
    (cts / name).symlink_to(phantom_dir / "images" / name)
    out = tmp_path / "masks"
    chosen = [o for o in ORGANS if o.key in ("liver", "spleen", "left_kidney")]
    organs = ",".join(o.key for o in chosen)
    assert _segment_cli(cts, out, "--per-organ", "--threshold", "0.3", "--organs", organs) == 0
    case = name[: -len("_0000.nii.gz")]
    multi = nib.load(out / f"{case}.nii.gz")
    labels = np.asarray(multi.dataobj)
    files = sorted((out / case / "segmentations").iterdir())
    assert [p.name for p in files] == sorted(f"{o.key}.nii.gz" for o in chosen)
    for o in chosen:
        mask = nib.load(out / case / "segmentations" / f"{o.key}.nii.gz")
        np.testing.assert_array_equal(np.asarray(mask.dataobj), (labels == o.id).astype(np.uint8))
        np.testing.assert_allclose(mask.affine, multi.affine)
    assert len(set(np.unique(labels).tolist()) - {0}) > 0  # the check above compared something
    only = tmp_path / "only"
    assert _segment_cli(cts, only, "--per-organ", "only", "--organs", "liver") == 0
    assert sorted(p.name for p in only.rglob("*.nii.gz")) == ["liver.nii.gz"]


def test_segment_folder_out_must_be_a_folder(phantom_dir, tmp_path, capsys):
    rc = _segment_cli(phantom_dir / "images", tmp_path / "mask.nii.gz")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--out must be a folder" in err[0]
    assert not (tmp_path / "mask.nii.gz").exists()
