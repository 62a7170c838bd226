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


def _grads_at_step(optimizer, run) -> tuple[torch.Tensor, object]:
    """(every trainable gradient as the optimizer is about to step, flattened; what ``run`` returned)."""
    grads = []
    hook = optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: grads.append(
            torch.cat([p.grad.flatten() for g in opt.param_groups for p in g["params"]])
        )
    )
    try:
        out = run()
    finally:
        hook.remove()
    return grads[0], out


def test_the_bare_step_is_the_trainer_step_on_the_same_batch(overhead):
    """Same loss and same gradients from the same weights: the bare step does the trainer's arithmetic."""
    from tqdm.auto import tqdm

    module, setup = overhead
    bare = module.BareStep(setup)
    before = [p.detach().clone() for p in bare.params]
    with tqdm(disable=True) as pbar:
        g_trainer, stats = _grads_at_step(bare.optimizer, lambda: module.trainer_epochs(setup, pbar)())
    with torch.no_grad():  # back to the weights the trainer stepped from
        for p, b in zip(bare.params, before):
            p.copy_(b)
    g_bare, loss = _grads_at_step(bare.optimizer, bare)
    assert stats["steps"] == 1 and stats["masks"] == bare.masks == setup.cfg.batch_size * 13
    # The trainer decodes 16 pairs at a time and adds the chunks' weighted means and gradients; the
    # bare step takes one mean over every pair. Measured: 0.5 (loss) and 1.1 (gradient norm) float32
    # steps apart; targets paired with the wrong masks move the gradient by ~2,000 steps (while the
    # loss of this untrained model, alike for every pair, moves by 1.7). 64 steps leaves room for
    # other kernels' summation orders.
    eps = torch.finfo(torch.float32).eps
    assert stats["loss"] == pytest.approx(loss.item(), rel=64 * eps, abs=0)
    assert (g_trainer - g_bare).norm() <= 64 * eps * g_bare.norm()


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
