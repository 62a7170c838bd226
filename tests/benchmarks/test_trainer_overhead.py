"""The trainer-overhead figure of benchmarks/throughput.py (issue 24, item 9), on a one-step epoch.

What makes the figure mean something: the bare step computes the trainer's loss on the same batch
with the same module (only the host work around it differs), and the record is the stated arithmetic
of the repetitions' times. Nothing here asserts a speed.
"""

from __future__ import annotations

import statistics

import pytest
import torch


@pytest.fixture(scope="module")
def overhead(throughput_parts_path, tmp_path_factory):
    """(the overhead module, a setup of one step per epoch on 64 px phantoms)."""
    from throughput_parts import overhead
    from throughput_parts.common import make_prepared

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a busy machine two threads wait on each other at every small operation
    root = make_prepared(tmp_path_factory.mktemp("overhead"), size=64)
    yield overhead, overhead.overhead_setup(root, steps=1)
    torch.set_num_threads(threads)


def test_the_bare_step_is_the_trainer_step_on_the_same_batch(overhead):
    from tqdm.auto import tqdm

    module, setup = overhead
    bare = module.BareStep(setup)
    with torch.no_grad():
        expected = bare.loss().item()
    with tqdm(disable=True) as pbar:
        stats = module.trainer_epochs(setup, pbar)()  # from the same weights: nothing stepped yet
    assert stats["steps"] == 1 and stats["masks"] == bare.masks == setup.cfg.batch_size * 13
    # The trainer decodes 16 pairs at a time and sums the chunks' weighted means; the bare step
    # takes one mean over every pair: float32 sums over ~4e5 elements in another order, which
    # stays within log2(4e5) ~ 19 rounding steps of the loss; 64 leaves room for other kernels.
    assert stats["loss"] == pytest.approx(expected, rel=64 * torch.finfo(torch.float32).eps, abs=0)


def test_the_record_is_the_median_of_each_repetitions_overhead(overhead):
    module, setup = overhead
    rec = module.time_overhead(setup, reps=3)
    assert rec["reps"] == len(rec["per_rep"]) == 3 and rec["steps_per_epoch"] == 1
    assert (rec["arch"], rec["strategy"], rec["image_size"], rec["masks_per_step"]) == (
        "tiny",
        "decoder",
        64,
        104,
    )
    shares = []
    for r in rec["per_rep"]:
        assert r["trainer_step_s"] > 0 and r["bare_step_s"] > 0
        assert r["overhead"] == pytest.approx(1 - r["bare_step_s"] / r["trainer_step_s"])
        shares.append(r["overhead"])
    assert rec["overhead"] == statistics.median(shares)
    assert rec["overhead_range"] == [min(shares), max(shares)]
    assert (
        min(shares)
        <= rec["overhead_quartiles"][0]
        <= rec["overhead"]
        <= rec["overhead_quartiles"][1]
        <= max(shares)
    )
    assert rec["meets_goal"] == (rec["overhead"] <= 0.25)
    # The trainer's own timer, reset after the warm-up, covers only timed steps: its phases fit inside them.
    timed = sum(r["trainer_step_s"] for r in rec["per_rep"])
    assert set(rec["breakdown_s_per_step"]) == {"data", "forward", "backward", "optimizer"}
    assert 0 < sum(rec["breakdown_s_per_step"].values()) * 3 <= timed
