"""A diverged run is a failure (issue 25): `--lr inf` trained an all-NaN model, exit 0, `finished`. A
non-finite loss (or weights) stops the run as `failed`, naming the step and its learning rate."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from cli_helpers import run_cli

from clipseg_bench.errors import RunFailed
from clipseg_bench.run_folder import RunFolder
from clipseg_bench.train import loop


def test_a_nan_loss_fails_the_run_naming_its_step(prepared_dir, tmp_path, capsys, monkeypatch):
    real = loop.segmentation_loss
    calls = []

    def nan_from_step_2(*args, **kwargs):  # `full` decodes a step's pairs in one call
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) >= 2 else loss

    monkeypatch.setattr(loop, "segmentation_loss", nan_from_step_2)
    out = tmp_path / "run"
    args = ["train", "--data", prepared_dir, "--out", out, "--strategy", "full", "--image-size", "64"]
    rc, _, err = run_cli([*args, "--max-steps", "3", "--lr", "1e-3"], capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 1 and "Traceback" not in err and len(errors) == 1 and err.rstrip().endswith(errors[0])
    assert "training diverged: the loss is not finite at step 2 (learning rate " in errors[0]
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "failed" and "step 2" in info["error"]
    assert not (out / "weights.safetensors").exists() and not (out / "checkpoints").exists()


def test_weights_that_are_not_finite_after_the_last_step_fail_it(tmp_path):
    """A finite loss at every step, but the last update made the weights inf (a rate far too large)."""
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    setup = SimpleNamespace(model=model)
    stats = {"bad_step": torch.tensor(-1), "lrs": [1e-3, 2e-3, 5e30]}
    with pytest.raises(RunFailed, match=r"the weights are not finite at step 7 \(learning rate 5e\+30\)"):
        loop.check_finite(setup, stats, 5, RunFolder(tmp_path))
    model.weight.data.fill_(1.0)
    loop.check_finite(setup, stats, 5, RunFolder(tmp_path))  # finite: nothing to say
