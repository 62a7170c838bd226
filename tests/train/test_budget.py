"""Budgets in steps: every training-set size gets the same optimizer steps and anneals to the end of
its cosine schedule; the warm-up is a share of the run; old configs keep meaning what they meant."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from clipseg_bench.config import load_config
from clipseg_bench.run_folder import RunFolder
from clipseg_bench.train.loop import train
from clipseg_bench.train.setup import build_schedule, warmup_steps


def _run(prepared, out, **kw):
    base = {
        "data": str(prepared),
        "out": str(out),
        "model": "tiny",
        "image_size": 64,
        "batch_size": 8,
        "strategy": "decoder",
        "epochs": 2,
        "val_every": 0,
        "val_max_slices": 4,
        "threads": 1,
    }
    train(load_config(None, {**base, **kw}))
    timing = json.loads((out / "run.json").read_text())["timing"]
    # the costs beside the wall time (tests/train/test_cost.py checks how they are computed)
    assert timing["train_cpu_s"] > 0 and 0 < timing["step_time_s"] < timing["train_time_s"]
    return timing["steps"], pd.read_csv(out / "history.csv")


@pytest.fixture(scope="module")
def budget_runs(prepared_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("budget")
    return {
        "all": _run(prepared_dir, root / "all"),
        "one": _run(prepared_dir, root / "one", train_cases=1),
        "one_epochs": _run(prepared_dir, root / "one_e", train_cases=1, budget="epochs"),
    }


def test_one_case_and_all_cases_take_the_same_steps_and_anneal_to_zero(budget_runs):
    (n_all, h_all), (n_one, h_one) = budget_runs["all"], budget_runs["one"]
    assert n_all == n_one == h_all["step"].iloc[-1] == h_one["step"].iloc[-1]
    assert h_all["lr"].iloc[-1] == 0.0 and h_one["lr"].iloc[-1] == 0.0  # the end of the cosine
    assert len(h_one) > len(h_all)  # the subset makes more passes over its own slices
    n_epochs, h_epochs = budget_runs["one_epochs"]
    assert n_epochs < n_all and h_epochs["lr"].iloc[-1] == 0.0  # `epochs`: 2 passes of its own


def test_schedule_counts():
    cfg = load_config(None, {"data": "d", "out": "o", "batch_size": 4, "epochs": 3})
    assert build_schedule(cfg, 10, 1) == (9, 3)  # 3 steps per epoch
    assert build_schedule(cfg, 2, 1, n_budget=10) == (9, 9)  # 1 step per pass over 2 slices
    assert build_schedule(cfg.model_copy(update={"max_steps": 5}), 2, 1, n_budget=10) == (5, 5)


def test_warmup_is_a_share_of_the_run_unless_a_count_is_set():
    cfg = load_config(None, {"data": "d", "out": "o"})
    assert cfg.warmup_fraction == 0.05 and warmup_steps(cfg, 140) == 7 and warmup_steps(cfg, 5000) == 250
    fixed = cfg.model_copy(update={"warmup_steps": 200})
    assert warmup_steps(fixed, 5000) == 200 and warmup_steps(fixed, 140) == 140


def test_an_old_config_reads_as_it_trained(tmp_path):
    old = {"data": "d", "out": "o", "strategy": "full", "lr": 1e-5, "warmup_steps": 20, "train_cases": 1}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    cfg = RunFolder(tmp_path).config()
    # one rate for everything, epochs over the subset, a fixed warm-up: what the run did
    assert (cfg.decoder_lr, cfg.budget, cfg.warmup_steps) == (1e-5, "epochs", 20)
    new = load_config(None, {k: v for k, v in old.items() if k != "warmup_steps"})
    assert (new.decoder_lr, new.budget, new.warmup_steps) == (1e-3, "steps", None)
