"""Parameter groups: the decoder trains at ``decoder_lr`` in every strategy, the strategy's own
trainables at its ``lr``; read from the optimizer itself, never from the config."""

from __future__ import annotations

import pytest

from clipseg_bench.config import load_config
from clipseg_bench.run_folder import RunRecord
from clipseg_bench.strategies import apply_strategy, available
from clipseg_bench.train.setup import build_optimizer, group_record

LR, DECODER_LR = 3e-4, 7e-3  # apart from every strategy default, so a swapped rate shows


def _cfg(strategy: str):
    return load_config(
        None,
        {"data": "unused", "out": "unused", "strategy": strategy, "lr": LR, "decoder_lr": DECODER_LR},
    )


@pytest.mark.parametrize("name", available())
def test_every_decoder_parameter_trains_at_decoder_lr(name, model):
    apply_strategy(model, name)
    optimizer, _ = build_optimizer(_cfg(name), model, total_steps=10, num_processes=1)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        assert optimizer is None
        return
    peak = {id(p): g["initial_lr"] for g in optimizer.param_groups for p in g["params"]}
    assert len(peak) == len(trainable)  # every trainable parameter is in exactly one group
    decoder = {id(p) for p in model.decoder.parameters() if p.requires_grad}
    assert decoder  # every fine-tuning strategy trains CLIPSeg's decoder
    assert all(peak[i] == DECODER_LR for i in decoder)
    others = [i for i in peak if i not in decoder]
    assert all(peak[i] == LR for i in others)
    record = {g["name"]: g for g in group_record(optimizer)}
    assert record["decoder"]["lr"] == DECODER_LR
    assert record["decoder"]["params"] == sum(
        p.numel() for p in model.decoder.parameters() if p.requires_grad
    )
    assert ("strategy" in record) == bool(others)  # decoder-only has no strategy group


def test_old_runs_read_as_one_group():
    old = RunRecord.from_dict({"status": "finished", "lr": 1e-5, "params": {"trainable": 12, "total": 40}})
    assert old.groups() == [{"name": "all", "lr": 1e-5, "params": 12}]
    new = RunRecord.from_dict({"param_groups": [{"name": "decoder", "lr": 1e-3, "params": 5}]})
    assert new.groups() == [{"name": "decoder", "lr": 1e-3, "params": 5}]
    assert new.to_dict()["param_groups"] == new.groups()
