"""The gradient audit: parts from names, unreached trainable tensors fail a run, frozen tensors must not move."""

from __future__ import annotations

import copy
import json
import re
from collections import Counter

import pytest
import torch

from clipseg_bench import cli
from clipseg_bench.errors import GradientAuditError
from clipseg_bench.model.families.clipseg import CLIPSeg, build_tiny
from clipseg_bench.strategies import apply_strategy, available
from clipseg_bench.strategies.base import _REGISTRY, Strategy, register
from clipseg_bench.study.report import write_report
from clipseg_bench.train.audit import GradientAudit, parameter_parts


@pytest.fixture(scope="module")
def tiny():
    return build_tiny()


def test_parts_come_from_names_with_inserted_modules_apart(tiny):
    """Adapters and LoRA are parts of their own; the weights they wrap stay in their encoder."""
    seen = {}
    for name in available():
        model = copy.deepcopy(tiny)
        apply_strategy(model, name)
        parts = parameter_parts(model)
        seen[name] = Counter(parts[n] for n, p in model.named_parameters() if p.requires_grad)
        stock = Counter(parameter_parts(tiny).values())
        base = Counter(p for p in parts.values() if p in stock)
        assert base == stock, name  # wrappers (peft's base_layer, an adapter's sublayer) keep their part
    assert set(seen["lora"]) == {"lora", "decoder"} and set(seen["adapter"]) == {"adapter", "decoder"}
    assert set(seen["full"]) == {"vision_encoder", "text_encoder", "decoder"} and not seen["zeroshot"]


def test_a_frozen_tensor_that_changes_is_caught(tiny):
    model = copy.deepcopy(tiny)
    apply_strategy(model, "decoder")
    audit = GradientAudit.start(model)
    audit.check_frozen(model)  # nothing moved
    with torch.no_grad():
        model.clip.text_model.final_layer_norm.bias.add_(1e-6)
    with pytest.raises(GradientAuditError, match="final_layer_norm.bias"):
        audit.check_frozen(model)
    assert audit.record()["text_encoder"]["frozen_changed"] == 1


UNREACHED = "_test_unreached"


@pytest.fixture
def unreached_strategy(monkeypatch):
    """A strategy, registered for this test only, that trains a vision tensor the forward never reads
    (the pooled output's layer norm), with apply_strategy's refreezing of such tensors turned off."""

    @register
    class Unreached(Strategy):
        name = UNREACHED
        description = "test only: the decoder and the vision pooled-output layer norm"
        lr = 1e-3

        def apply(self, model, options):
            model.decoder.requires_grad_(True)
            model.clip.vision_model.post_layernorm.requires_grad_(True)

    monkeypatch.setattr(CLIPSeg, "unused_parameters", lambda self, model: [])
    yield
    _REGISTRY.pop(UNREACHED)


def test_an_unreached_trainable_tensor_fails_the_run(unreached_strategy, prepared_dir, tmp_path, capsys):
    out = tmp_path / "B" / "runs" / f"{UNREACHED}-s0"  # a BENCH folder, for the report
    args = ["train", "--data", str(prepared_dir), "--out", str(out), "--strategy", UNREACHED]
    rc = cli.main([*args, "--image-size", "64", "--max-steps", "3", "--set", "threads=1"])
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.replace("\r", "\n").splitlines() if "error" in line.lower()]
    assert rc == 1 and len(errors) == 1 and "Traceback" not in stderr, stderr  # a failed run, not exit 2
    err = errors[0].strip()
    assert err.startswith("error: gradient audit:") and "clip.vision_model.post_layernorm.weight" in err
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "failed" and info["error"] == err.removeprefix("error: ")
    audit = info["gradient_audit"]
    assert audit["vision_encoder"]["trainable"] == 2 and audit["vision_encoder"]["reached"] == 0
    assert audit["decoder"]["reached"] == audit["decoder"]["trainable"] > 0
    assert not (out / "weights.safetensors").exists()  # stopped at the first step
    page = write_report([tmp_path / "B"]).read_text()
    audit = page[page.index("<h2>Gradient audit</h2>") :]
    assert re.search(r">FAILED</td>", audit) and re.search(r">0/2</td>", audit)  # vision: 0 of 2 reached
