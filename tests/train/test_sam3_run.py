"""A SAM 3 run end to end through the CLI (issue 23): `strategies`, `train` with its audit, a resume
after SIGKILL, `evaluate` and `segment`, on the tiny SAM 3 at 56 px (its smallest input)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from clipseg_bench import cli
from clipseg_bench.model.load import load_model
from clipseg_bench.organs import ORGANS
from clipseg_bench.strategies import apply_strategy

SAM3_ARGS = ["--model", "sam3-tiny", "--image-size", "56", "--batch-size", "8", "--lr", "1e-3"]
SAM3_ARGS += [
    "--set",
    "threads=1",
    "--set",
    "val_max_slices=8",
    "--set",
    "train_cases=1",
    "--strategy",
    "lora",
    "--epochs",
    "2",
]

# Trains in a subprocess and SIGKILLs itself right after the first epoch's checkpoint is written
# (deterministic, unlike a kill on a timer): what a killed run leaves on disk.
KILL_SCRIPT = """
import os, signal, sys
import clipseg_bench.train.loop as loop
from clipseg_bench import cli

save = loop.save_resume_state
def save_then_die(folder, **kw):
    save(folder, **kw)
    if kw["state"].epoch == 1:
        os.kill(os.getpid(), signal.SIGKILL)
loop.save_resume_state = save_then_die
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def sam3_run(prepared_dir, tmp_path_factory):
    """An uninterrupted LoRA run of the tiny SAM 3 (2 epochs), evaluated on the val case."""
    run = tmp_path_factory.mktemp("sam3") / "run"
    assert cli.main(["train", "--data", str(prepared_dir), "--out", str(run), *SAM3_ARGS, "--evaluate"]) == 0
    return run


def test_a_sam3_run_records_its_family_audit_and_preprocessing(sam3_run):
    info = json.loads((sam3_run / "run.json").read_text())
    assert info["status"] == "finished"
    assert (info["model"], info["model_family"]) == ("sam3-tiny", "sam3")
    audit = info["gradient_audit"]
    assert audit["lora"]["trainable"] > 0 and audit["decoder"]["trainable"] > 0
    assert all(a["reached"] == a["trainable"] and a["frozen_changed"] == 0 for a in audit.values()), audit
    prep = info["preprocessing"]
    assert (prep["image_size"], prep["mean"], prep["std"]) == (56, [0.5] * 3, [0.5] * 3)  # SAM 3's own
    metrics = json.loads((sam3_run / "metrics.json").read_text())
    assert 0 <= metrics["summary"]["dsc"] <= 1 and metrics["cases"]


def test_strategies_command_counts_the_sam3_model(capsys):
    assert cli.main(["strategies", "--model", "sam3-tiny", "--json"]) == 0
    listed = {row["strategy"]: row for row in json.loads(capsys.readouterr().out)}
    for name in ("lora", "decoder", "full"):
        counts = apply_strategy(load_model("sam3-tiny").model, name)
        assert listed[name]["trainable_params"] == counts.trainable, name


def test_sam3_resume_after_sigkill_is_exact(sam3_run, prepared_dir, tmp_path):
    """Killed after epoch 1's checkpoint and resumed: the weights, history and final numbers of the
    uninterrupted run, bit for bit (LoRA's dropout makes the RNG state part of it)."""
    run = tmp_path / "killed"
    args = ["train", "--data", str(prepared_dir), "--out", str(run), *SAM3_ARGS]
    r = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, *args], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == -9, r.stderr[-2000:]
    assert json.loads((run / "run.json").read_text())["status"] == "running"
    assert not (run / "weights.safetensors").exists()

    assert cli.main([*args, "--resume"]) == 0
    a, b = load_file(sam3_run / "weights.safetensors"), load_file(run / "weights.safetensors")
    assert a.keys() == b.keys() and any("lora_" in k for k in a)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    cols = ["epoch", "step", "loss", "train_dice", "val_dice", "lr"]
    ha, hb = pd.read_csv(sam3_run / "history.csv"), pd.read_csv(run / "history.csv")
    pd.testing.assert_frame_equal(ha[cols], hb[cols])
    final = [json.loads((r / "run.json").read_text())["final"] for r in (sam3_run, run)]
    assert final[0] == final[1]


def test_evaluate_and_segment_with_a_sam3_run(sam3_run, phantom_dir, tmp_path):
    """`evaluate` gives the metrics `train --evaluate` wrote; `segment` writes a label volume of the
    CT's shape from a run, and from --model sam3-tiny zero-shot; it applies the run's weights: a copy
    of the run whose semantic head says "organ" everywhere labels every voxel."""
    first = json.loads((sam3_run / "metrics.json").read_text())
    assert cli.main(["evaluate", "--run", str(sam3_run)]) == 0
    again = json.loads((sam3_run / "metrics.json").read_text())
    assert (again["dice2d"], again["summary"]) == (first["dice2d"], first["summary"])

    everywhere = tmp_path / "everywhere"
    shutil.copytree(sam3_run, everywhere)
    weights = load_file(everywhere / "weights.safetensors")
    weights["mask_decoder.semantic_projection.weight"][:] = 0
    weights["mask_decoder.semantic_projection.bias"][:] = 20  # logit 20 for every organ, every pixel
    with safe_open(everywhere / "weights.safetensors", "np") as f:
        metadata = f.metadata()
    save_file(weights, everywhere / "weights.safetensors", metadata=metadata)

    ct = sorted((phantom_dir / "images").glob("*.nii.gz"))[0]
    shape = nib.load(ct).shape
    labels = {o.id for o in ORGANS} | {0}
    masks = []
    for args in (
        ["--run", sam3_run],
        ["--model", "sam3-tiny", "--strategy", "zeroshot"],
        ["--run", everywhere],
    ):
        out = tmp_path / f"mask{len(masks)}.nii.gz"
        assert cli.main(["segment", *map(str, args), "--ct", str(ct), "--out", str(out)]) == 0
        masks.append(np.asarray(nib.load(out).dataobj))
        assert masks[-1].shape == shape and set(np.unique(masks[-1])) <= labels
    assert (masks[2] > 0).all() and not (masks[0] > 0).all()
