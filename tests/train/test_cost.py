"""Cost that survives a shared machine: the steady-state step time skips the warm-up, and the
Pareto plot says which cost it shows."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd

from clipseg_bench.config import load_config
from clipseg_bench.study.plots import cost_axis
from clipseg_bench.train.record import steady_step_time


def test_steady_step_time_is_the_median_after_the_warm_up():
    cfg = load_config(None, {"data": "d", "out": "o", "warmup_steps": 2})
    setup = SimpleNamespace(cfg=cfg, total_steps=5)
    # two slow warm-up steps (allocations, a busy moment), then the steady state
    assert steady_step_time(setup, [9.0, 9.0, 1.0, 1.0, 2.0]) == 1.0
    fraction = SimpleNamespace(cfg=load_config(None, {"data": "d", "out": "o"}), total_steps=5)
    assert steady_step_time(fraction, [9.0, 1.0, 1.0, 1.0, 2.0]) == 1.0  # the first step always goes
    assert steady_step_time(setup, [9.0, 9.0]) is None


def test_the_cost_axis_says_which_cost_it_shows():
    with_cpu = pd.DataFrame({"train_time_s_mean": [16.6, 6.9], "train_cpu_s_mean": [3.0, 6.5]})
    assert cost_axis(with_cpu)[0] == "train_cpu_s" and "CPU" in cost_axis(with_cpu)[1]
    old = with_cpu.assign(train_cpu_s_mean=[3.0, np.nan])  # a run from before CPU time was recorded
    assert cost_axis(old)[0] == "train_time_s" and "wall" in cost_axis(old)[1]
