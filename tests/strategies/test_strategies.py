"""Every registered strategy on the tiny model: gradients where trained, nothing else moves, identity at
start, honest parameter counts, and the stock-forward trap they would all fall into."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from clipseg_bench.errors import InputError
from clipseg_bench.model import forward as fw
from clipseg_bench.model.families import family_of
from clipseg_bench.strategies import apply_strategy, available, count_parameters
from clipseg_bench.train.audit import GradientAudit


def run(model, inputs) -> torch.Tensor:
    return fw.forward(
        model, inputs["pixel_values"], input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
    )


def loss_of(logits: torch.Tensor) -> torch.Tensor:
    target = (torch.arange(logits.shape[-1]) < logits.shape[-1] // 2).float().expand_as(logits)
    return F.binary_cross_entropy_with_logits(logits, target)


@pytest.fixture(params=["clipseg", "sam3"])
def family_model(request) -> tuple[torch.nn.Module, dict]:
    """(model, inputs) of each model family: the tiny CLIPSeg at 64 px, the tiny SAM 3 at 56 px."""
    prefix = "" if request.param == "clipseg" else "sam3_"
    return request.getfixturevalue(f"{prefix}model"), request.getfixturevalue(f"{prefix}inputs")


def test_all_six_are_registered():
    assert {"zeroshot", "full", "decoder", "adapter", "lora", "bitfit"} <= set(available())


@pytest.mark.parametrize("name", available())
def test_gradients_reach_every_trainable_parameter_and_frozen_ones_stay(name, family_model):
    """Per family and strategy, the gradient audit of a run passes: every trainable tensor reached in
    the first backward, no frozen tensor moved after two AdamW steps (weight decay included)."""
    model, inputs = family_model
    counts = apply_strategy(model, name)
    assert counts == count_parameters(model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    audit = GradientAudit.start(model)
    model.train()
    if not trainable:
        assert name == "zeroshot" and not run(model, inputs).requires_grad
        return
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2, weight_decay=0.1)
    for step in range(2):
        opt.zero_grad()
        loss_of(run(model, inputs)).backward()
        if step == 0:  # the graph reaches every trainable parameter
            assert [n for n, p in trainable.items() if p.grad is None] == []
            assert all(torch.isfinite(p.grad).all() for p in trainable.values())
            audit.check_reached(model)
        opt.step()
    audit.check_frozen(model)
    record = audit.record()
    assert all(r["reached"] == r["trainable"] and r["frozen_changed"] == 0 for r in record.values())
    # Checked after the second backward: a zero-initialised up-projection (adapter up, LoRA B)
    # makes its partner's first gradient exactly zero, by design; one step later it cannot be.
    assert [n for n, p in trainable.items() if not p.grad.abs().sum() > 0] == []
    assert [n for n, p in model.named_parameters() if n in frozen and not torch.equal(p, frozen[n])] == []


@pytest.mark.parametrize("name", available())
def test_every_strategy_starts_from_the_base_model(name, family_model):
    # Adapters (zero up-projection) and LoRA (zero B) start as the identity: logits equal exactly.
    model, inputs = family_model
    with torch.no_grad():
        before = run(model, inputs)
        apply_strategy(model, name)
        after = run(model, inputs)
    assert not model.training  # the strategy kept eval mode (LoRA dropout off)
    assert torch.equal(before, after)


@pytest.mark.parametrize("name", [n for n in available() if n != "zeroshot"])
def test_bf16_autocast_on_cpu_gives_finite_gradients(name, sam3_model, sam3_inputs):
    apply_strategy(sam3_model, name)
    sam3_model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = run(sam3_model, sam3_inputs)
    loss_of(logits.float()).backward()
    trainable = {n: p for n, p in sam3_model.named_parameters() if p.requires_grad}
    assert [n for n, p in trainable.items() if p.grad is None or not torch.isfinite(p.grad).all()] == []


def test_stock_forward_trap(model, inputs):
    """The stock HF forward gives the encoders no gradient even when every weight is 'trainable'."""
    apply_strategy(model, "full")
    b, k = 3, 3
    stock = model(
        pixel_values=inputs["pixel_values"].repeat_interleave(k, 0),
        input_ids=inputs["input_ids"].repeat(b, 1),
        attention_mask=inputs["attention_mask"].repeat(b, 1),
    ).logits
    loss_of(stock).backward()
    encoders = [*family_of(model).encoder_layers(model, "vision"), *family_of(model).parts(model).text]
    assert all(p.grad is None for m in encoders for p in m.parameters())  # the trap
    assert all(p.grad is not None for p in model.decoder.parameters())

    model.zero_grad()
    loss_of(run(model, inputs)).backward()  # ours
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for m in encoders for p in m.parameters())


def test_counts_are_honest(model):
    base_total = count_parameters(model).total
    numel = lambda ps: sum(p.numel() for p in ps)  # noqa: E731
    unused = numel(family_of(model).unused_parameters(model))
    decoder = numel(model.decoder.parameters())
    assert unused > 0  # tiny with 5 vision layers: layer 4 is never read
    expected = {"zeroshot": 0, "full": base_total - unused, "decoder": decoder}
    for name, trainable in expected.items():
        m = type(model)(model.config)
        counts = apply_strategy(m, name)
        assert (counts.trainable, counts.total) == (trainable, base_total), name
    bitfit = apply_strategy(model, "bitfit")
    biases = [
        p
        for part in (
            *family_of(model).encoder_layers(model, "vision"),
            *family_of(model).parts(model).text,
            model.clip.vision_model.pre_layrnorm,
            model.clip.text_model.final_layer_norm,
        )
        for n, p in part.named_parameters()
        if n.endswith("bias")
    ]
    assert bitfit.trainable == decoder + numel(set(biases)) and bitfit.total == base_total


def test_lora_stays_in_the_encoders_it_is_told(model):
    counts = apply_strategy(model, "lora", {"rank": 4})
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(".self_attn.q_proj." in n or ".self_attn.v_proj." in n for n in lora)
    assert not any(n.startswith("decoder.") for n in lora)  # the decoder has q_proj/v_proj too
    assert not any("vision_model.encoder.layers.4." in n for n in lora)  # never read by the decoder
    assert type(model.decoder.layers[0].self_attn.q_proj) is torch.nn.Linear
    # 4 vision + 2 text layers, q and v each: A (r x w) + B (w x r)
    expected = (4 * 2 * 2 * 4 * 64) + (2 * 2 * 2 * 4 * 32)
    assert sum(p.numel() for p in lora.values()) == expected
    assert counts.trainable == expected + sum(p.numel() for p in model.decoder.parameters())


def test_lora_options(model):
    counts = apply_strategy(model, "lora", {"encoders": ["text"], "targets": ["fc1"], "train_decoder": False})
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("text_model" in n and ".mlp.fc1.lora_" in n for n in names)
    assert counts.trainable == 2 * (8 * 32 + 64 * 8)  # 2 layers, fc1 32 -> 64, rank 8


def test_adapter_options_and_size(model):
    counts = apply_strategy(
        model,
        "adapter",
        {
            "bottleneck": 8,
            "vision_layers": [0, 2],
            "text_layers": [],
            "positions": ["mlp"],
            "train_decoder": False,
        },
    )
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert {n.split(".mlp.")[0] for n in names} == {
        "clip.vision_model.encoder.layers.0",
        "clip.vision_model.encoder.layers.2",
    }
    assert counts.trainable == 2 * (64 * 8 + 8 + 8 * 64 + 64)  # down + up, weights and biases


def test_adapter_default_covers_read_layers_and_trains_the_decoder(model):
    counts = apply_strategy(model, "adapter")
    adapters = [m for m in model.modules() if type(m).__name__ == "BottleneckAdapter"]
    assert len(adapters) == 2 * (4 + 2)  # attention + MLP in 4 read vision layers and 2 text layers
    per = lambda w: 2 * w * (w // 12) + w // 12 + w  # noqa: E731  (default bottleneck: width // 12)
    decoder = sum(p.numel() for p in model.decoder.parameters())
    assert counts.trainable == 2 * (4 * per(64) + 2 * per(32)) + decoder


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("lora", {"rnak": 4}, "unknown option 'rnak'"),
        ("lora", {"rank": 0}, "rank must be"),
        ("lora", {"targets": ["q_proj", "query"]}, "targets must be"),
        ("lora", {"targets": ["o_proj"]}, "not Linear layers of a clipseg encoder layer"),
        ("adapter", {"vision_layers": [4]}, r"out of range.*0\.\.3"),
        ("adapter", {"positions": ["ffn"]}, "positions must be"),
        ("full", {"lr": 1}, "takes no options"),
    ],
)
def test_bad_options_are_input_errors(model, name, options, match):
    with pytest.raises(InputError, match=match):
        apply_strategy(model, name, options)


def test_unknown_strategy(model):
    with pytest.raises(InputError, match="unknown strategy 'prompt-tuning'"):
        apply_strategy(model, "prompt-tuning")


# --- SAM 3: where each strategy lands ----------------------------------------------------------------


def test_sam3_lora_stays_in_the_vit_and_text_layers(sam3_model):
    counts = apply_strategy(sam3_model, "lora", {"rank": 4, "targets": ["q_proj", "v_proj", "o_proj"]})
    lora = {n: p for n, p in sam3_model.named_parameters() if "lora_" in n}
    prefixes = ("vision_encoder.backbone.layers.", "text_encoder.text_model.encoder.layers.")
    assert lora and all(n.startswith(prefixes) for n in lora)  # never the DETR or mask decoder's q/v/o_proj
    assert type(sam3_model.detr_encoder.layers[0].self_attn.q_proj) is torch.nn.Linear
    # 2 ViT layers x (q, v, o) + 2 text layers x (q, v): the text encoder has out_proj, not o_proj
    assert sum(p.numel() for p in lora.values()) == (2 * 3 + 2 * 2) * 2 * 4 * 32
    fam = family_of(sam3_model)
    decoder = sum(p.numel() for m in fam.parts(sam3_model).decoder for p in m.parameters() if p.requires_grad)
    assert counts.trainable == sum(p.numel() for p in lora.values()) + decoder


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"targets": ["o_proj"], "encoders": ["text"]}, "'o_proj' is in none of the encoders"),
        ({"targets": ["out_proj"], "encoders": ["vision"]}, "'out_proj' is in none of the encoders"),
    ],
)
def test_sam3_lora_targets_are_checked_against_its_encoders(sam3_model, options, match):
    with pytest.raises(InputError, match=match):
        apply_strategy(sam3_model, "lora", options)


def test_sam3_adapters_wrap_the_vit_and_text_sublayers(sam3_model, sam3_inputs):
    counts = apply_strategy(sam3_model, "adapter", {"bottleneck": 4, "train_decoder": False})
    names = {n.rsplit(".adapter.", 1)[0] for n, p in sam3_model.named_parameters() if p.requires_grad}
    assert names == {
        *(f"vision_encoder.backbone.layers.{i}.{s}" for i in (0, 1) for s in ("attention", "mlp")),
        *(f"text_encoder.text_model.encoder.layers.{i}.{s}" for i in (0, 1) for s in ("self_attn", "mlp")),
    }
    assert counts.trainable == 8 * (32 * 4 + 4 + 4 * 32 + 32)
    sam3_model.train()
    loss_of(
        run(sam3_model, sam3_inputs)
    ).backward()  # the ViT attention returns a tuple: adapted all the same
    assert all(p.grad is not None for p in sam3_model.parameters() if p.requires_grad)


def test_sam3_counts_are_honest(sam3_model):
    fam = family_of(sam3_model)
    numel = lambda ps: sum(p.numel() for p in ps)  # noqa: E731
    base_total = count_parameters(sam3_model).total
    unused = {id(p) for p in fam.unused_parameters(sam3_model)}
    parts = fam.parts(sam3_model)
    used = lambda modules: [p for m in modules for p in m.parameters() if id(p) not in unused]  # noqa: E731
    decoder = numel(used(parts.decoder))
    expected = {
        "zeroshot": 0,
        "full": base_total - numel(fam.unused_parameters(sam3_model)),
        "decoder": decoder,
    }
    biases = [p for m in [*parts.vision, *parts.text] for n, p in m.named_parameters() if n.endswith("bias")]
    expected["bitfit"] = decoder + numel(p for p in biases if id(p) not in unused)
    for name, trainable in expected.items():
        counts = apply_strategy(copy.deepcopy(sam3_model), name)
        assert (counts.trainable, counts.total) == (trainable, base_total), name
