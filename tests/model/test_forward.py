"""Our forward against Hugging Face's: same logits, one encoding per image, truncation, caching, grads."""

from __future__ import annotations

import pytest
import torch

from clipseg_bench.model import forward as fw
from clipseg_bench.model import ops
from clipseg_bench.model.families import clipseg as clip
from clipseg_bench.model.families.clipseg import build_tiny, tiny_config
from clipseg_bench.strategies import apply_strategy
from tolerance import assert_close

# float32 rounding steps (tolerance.py) the model comparisons allow. A forward: the widest reduction
# is a 64-wide dot product, and another summation order can move a result by one step per term at
# worst (measured here: at most 7.6 steps over three ISAs). A gradient sums over every row of a
# batch (600 in the MLP tests): 256 steps (measured: at most 29).
FORWARD_STEPS = 64
GRAD_STEPS = 256


def stock_logits(model, inputs) -> torch.Tensor:
    """The stock HF forward on every (image, prompt) pair, as (B, K, S, S)."""
    px, ids, mask = inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]
    b, k = px.shape[0], ids.shape[0]
    out = model(
        pixel_values=px.repeat_interleave(k, 0), input_ids=ids.repeat(b, 1), attention_mask=mask.repeat(b, 1)
    ).logits
    return out.reshape(b, k, *out.shape[-2:])


def ours(model, inputs, **kw) -> torch.Tensor:
    return fw.forward(
        model,
        inputs["pixel_values"],
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        **kw,
    )


@pytest.mark.parametrize("complex_head", [False, True])
def test_matches_stock_forward(model, inputs, complex_head):
    if complex_head:  # rd64-refined's upsampling head
        model = build_tiny(
            tiny_config(image_size=64, vision_layers=5, use_complex_transposed_convolution=True)
        )
    with torch.no_grad():
        expected, got = stock_logits(model, inputs), ours(model, inputs)
    assert got.shape == (3, 3, 64, 64)
    # The same ops in the same order here; another CPU may sum a 64-wide dot product in another order.
    assert_close(got, expected, steps=FORWARD_STEPS)


def test_single_pair_matches_stock_forward(model, inputs):
    # The stock output is (1, S, S) for one pair; ours keeps (B, K, S, S) = (1, 1, S, S).
    one = {k: v[:1] for k, v in inputs.items()}
    with torch.no_grad():
        expected, got = model(**one).logits, ours(model, one)
    assert got.shape == (1, 1, 64, 64) and expected.shape == (1, 64, 64)
    assert_close(got[0], expected, steps=FORWARD_STEPS)


def test_k_prompt_batching_equals_each_pair_alone(model, inputs):
    with torch.no_grad():
        grid = ours(model, inputs)
        for b in range(3):
            for k in range(3):
                alone = fw.forward(
                    model,
                    inputs["pixel_values"][b : b + 1],
                    input_ids=inputs["input_ids"][k : k + 1],
                    attention_mask=inputs["attention_mask"][k : k + 1],
                )
                assert_close(grid[b, k], alone[0, 0], steps=FORWARD_STEPS)


def test_pairs_select_from_the_grid(model, inputs):
    pairs = torch.tensor([[2, 0], [0, 1], [2, 2], [1, 0]])
    with torch.no_grad():
        grid, picked = ours(model, inputs), ours(model, inputs, pairs=pairs)
    assert picked.shape == (4, 64, 64)
    assert_close(picked, grid[pairs[:, 0], pairs[:, 1]], steps=FORWARD_STEPS)


def test_each_image_is_encoded_once_and_truncated(model, inputs):
    layers = model.clip.vision_model.encoder.layers
    seen = {i: [] for i in range(len(layers))}
    for i, layer in enumerate(layers):
        layer.register_forward_hook(lambda m, a, o, i=i: seen[i].append(a[0].shape[0]))
    with torch.no_grad():
        ours(model, inputs)
    assert clip.CLIPSeg().vision_depth(model) == 4 and len(layers) == 5
    assert all(seen[i] == [3] for i in range(4)), seen  # B=3 images once, not B*K=9
    assert seen[4] == []  # the layer after the decoder's deepest tap never runs


def test_truncation_leaves_logits_unchanged(inputs):
    # Same weights for the first 4 vision layers; the 6-layer model has 2 wasted layers on top.
    deep = build_tiny(tiny_config(image_size=64, vision_layers=6))
    with torch.no_grad():
        acts = fw.encode_images(deep, inputs["pixel_values"])
        full = deep.clip.vision_model(inputs["pixel_values"], output_hidden_states=True).hidden_states
    assert len(full) == 7
    for act, i in zip(acts, deep.config.extract_layers, strict=True):
        assert torch.equal(act, full[i + 1])


def test_prompt_embedding_is_eos_pooled_and_projected(model, inputs):
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    eos = model.config.text_config.eos_token_id
    assert eos != 2  # HF's legacy argmax pooling would kick in
    with torch.no_grad():
        emb = fw.encode_prompts(model, ids, mask)
        hidden = model.clip.text_model(input_ids=ids, attention_mask=mask).last_hidden_state
    first_eos = (ids == eos).int().argmax(1)
    expected = model.clip.text_projection(hidden[torch.arange(3), first_eos])
    assert emb.shape == (3, model.config.projection_dim)
    torch.testing.assert_close(emb, expected)


@pytest.mark.parametrize(
    ("strategy", "vision_grad", "text_grad"),
    [("decoder", False, False), ("full", True, True), ("zeroshot", False, False)],
)
def test_encoders_get_gradients_iff_trainable(model, inputs, strategy, vision_grad, text_grad):
    apply_strategy(model, strategy)
    acts = fw.encode_images(model, inputs["pixel_values"])
    emb = fw.encode_prompts(model, inputs["input_ids"], inputs["attention_mask"])
    assert fw.vision_trainable(model) is vision_grad and fw.text_trainable(model) is text_grad
    assert all(a.requires_grad is vision_grad for a in acts)
    assert emb.requires_grad is text_grad


def test_only_vision_or_only_text_trainable(model, inputs):
    model.requires_grad_(False)
    model.clip.text_model.encoder.layers[0].mlp.fc1.weight.requires_grad_(True)
    assert fw.text_trainable(model) and not fw.vision_trainable(model)
    assert not fw.encode_images(model, inputs["pixel_values"])[0].requires_grad
    assert fw.encode_prompts(model, inputs["input_ids"], inputs["attention_mask"]).requires_grad


def test_cached_inputs_give_the_same_logits(model, inputs):
    apply_strategy(model, "decoder")
    with torch.no_grad():
        acts = fw.encode_images(model, inputs["pixel_values"])
        emb = fw.encode_prompts(model, inputs["input_ids"], inputs["attention_mask"])
    cached = fw.forward(model, activations=acts, prompt_emb=emb)
    assert cached.requires_grad  # the decoder still trains on cached features
    torch.testing.assert_close(cached.detach(), ours(model, inputs).detach(), atol=0, rtol=0)


def test_cached_inputs_refused_when_that_encoder_trains(model, inputs):
    apply_strategy(model, "full")
    with torch.no_grad():
        acts = fw.encode_images(model, inputs["pixel_values"])
        emb = fw.encode_prompts(model, inputs["input_ids"], inputs["attention_mask"])
    with pytest.raises(ValueError, match="vision encoder trains"):
        fw.forward(
            model, activations=acts, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        )
    with pytest.raises(ValueError, match="text encoder trains"):
        fw.forward(model, inputs["pixel_values"], emb)
    with torch.no_grad():  # evaluation may use caches whatever trains
        fw.forward(model, activations=acts, prompt_emb=emb)


def test_gradient_checkpointing_gives_the_same_gradients(model, inputs):
    apply_strategy(model, "full")
    model.train()

    def grads():
        model.zero_grad()
        ours(model, inputs).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain = grads()
    fw.set_gradient_checkpointing(model, True)
    recomputed = []
    mlp = model.clip.vision_model.encoder.layers[0].mlp
    mlp_forward = mlp.forward
    mlp.forward = lambda x: (recomputed.append(1), mlp_forward(x))[1]  # (module hooks skip the recompute)
    checkpointed = grads()
    assert len(recomputed) == 2  # forward, then the recompute in backward
    for n, g in plain.items():
        assert_close(checkpointed[n], g, steps=FORWARD_STEPS)  # the same ops, recomputed


def test_preprocess_normalises_gray_to_three_channels():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    slices = torch.full((2, 30, 30), 128, dtype=torch.uint8)
    x = fw.preprocess(slices, size=32, mean=mean, std=std)
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    for c in range(3):
        torch.testing.assert_close(x[:, c], torch.full((2, 32, 32), (128 / 255 - mean[c]) / std[c]))
    with pytest.raises(ValueError, match="B, H, W"):
        fw.preprocess(slices[0], size=32, mean=mean, std=std)


def test_preprocess_keeps_geometry():
    # A bright left half stays a bright left half after resizing.
    img = torch.zeros(1, 40, 40, dtype=torch.uint8)
    img[:, :, :20] = 255
    x = fw.preprocess(img, size=64, mean=(0, 0, 0), std=(1, 1, 1))
    assert x[0, 0, :, :30].min() > 0.99 and x[0, 0, :, 34:].max() < 0.01


# --- the blocked decoder MLP (CPU fast path) ----------------------------------------------------


def _mlp_grads(mlp, x, run):
    for p in [x, *mlp.parameters()]:
        p.grad = None
    y = run(mlp, x)
    y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
    return y.detach(), [None if p.grad is None else p.grad.clone() for p in [x, *mlp.parameters()]]


@pytest.mark.parametrize("frozen", ["none", "weights"])
def test_blocked_mlp_equals_the_eager_mlp(model, frozen):
    mlp = model.decoder.layers[0].mlp  # fc1 -> ReLU -> fc2, as in every CLIPSeg decoder layer
    if frozen == "weights":  # BitFit-like: only biases train, so weight grads must stay None
        mlp.fc1.weight.requires_grad_(False)
        mlp.fc2.weight.requires_grad_(False)
    # 2 x 300 rows: more than two MLP_BLOCKs and not a multiple of it; a (B, N, C) input like decode's.
    x = torch.randn(
        2, 300, mlp.fc1.in_features, generator=torch.Generator().manual_seed(1), requires_grad=True
    )
    assert clip.blocked_mlp_applies(mlp, x)
    y_ref, g_ref = _mlp_grads(mlp, x, lambda m, v: m(v))
    y, g = _mlp_grads(mlp, x, clip.decoder_mlp)
    assert_close(y, y_ref, steps=FORWARD_STEPS)
    for got, want in zip(g, g_ref):
        assert (got is None) == (want is None)
        if want is not None:  # same sums in another order (per block): fp32 rounding only
            assert_close(got, want, steps=GRAD_STEPS)
    assert (g[1] is None) == (frozen == "weights")


def test_decode_takes_the_blocked_mlp_and_matches_hf_layers(model, inputs, monkeypatch):
    apply_strategy(model, "decoder")
    model.train()
    with torch.no_grad():
        stock_logits(model, inputs)  # installs transformers' output-capturing hooks: must not matter
    acts = [a.detach() for a in fw.encode_images(model, inputs["pixel_values"])]
    with torch.no_grad():
        emb = fw.encode_prompts(model, inputs["input_ids"], inputs["attention_mask"])

    def run():
        model.zero_grad(set_to_none=True)
        logits = fw.decode(model, acts, emb)
        logits.square().mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.decoder.named_parameters()}

    calls = []
    apply = ops.BlockedReluMLP.apply
    monkeypatch.setattr(ops.BlockedReluMLP, "apply", lambda *a: calls.append(1) or apply(*a))
    fast, fast_grads = run()
    assert len(calls) == len(model.decoder.layers)
    monkeypatch.setattr(clip, "blocked_mlp_applies", lambda mlp, x: False)  # HF's own MLP
    monkeypatch.setattr(clip, "_has_own_hooks", lambda m: True)  # HF's own layer forward
    slow, slow_grads = run()
    assert len(calls) == len(model.decoder.layers)
    assert_close(fast, slow, steps=FORWARD_STEPS)
    for name, g in slow_grads.items():
        assert_close(fast_grads[name], g, steps=GRAD_STEPS, msg=name)


def test_blocked_mlp_is_not_used_for_wrapped_or_hooked_mlps(model):
    mlp = model.decoder.layers[0].mlp
    x = torch.randn(4, mlp.fc1.in_features)
    assert clip.blocked_mlp_applies(mlp, x)
    assert not clip.blocked_mlp_applies(mlp, x.double())
    handle = mlp.register_forward_hook(lambda m, i, o: o)  # a user's hook must still run
    assert not clip.blocked_mlp_applies(mlp, x)
    handle.remove()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not clip.blocked_mlp_applies(mlp, x)


@pytest.mark.parametrize("relu_between", [True, False])
def test_patch_deconv_chain_equals_the_layers(relu_between):
    torch.manual_seed(0)
    layers = [
        torch.nn.ConvTranspose2d(8, 6, 2, stride=2),
        torch.nn.ReLU(),
        torch.nn.ConvTranspose2d(6, 3, 4, stride=4),
    ]
    if not relu_between:
        del layers[1]
    head = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), *layers, torch.nn.ReLU())
    x = torch.randn(2, 8, 5, 7, requires_grad=True)
    g = torch.randn(2, 3, 40, 56)

    def run(fn):
        for t in [x, *head.parameters()]:
            t.grad = None
        y = fn(x)
        y.backward(g)
        return y.detach(), [t.grad.clone() for t in [x, *head.parameters()]]

    y_ref, g_ref = run(head)
    y, grads = run(lambda v: ops.upsample_head(head, v))
    assert y.shape == (2, 3, 40, 56)
    assert_close(y, y_ref, steps=FORWARD_STEPS)
    for got, want in zip(grads, g_ref):
        assert_close(got, want, steps=GRAD_STEPS)


def test_blocked_mlp_saves_hidden_blocks_only_when_a_backward_follows(model, monkeypatch):
    mlp = model.decoder.layers[0].mlp  # its parameters require grad
    x = torch.randn(600, mlp.fc1.in_features)
    params = (mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)

    class Ctx:  # records what forward keeps for backward
        saved = None

        def save_for_backward(self, *tensors):
            self.saved = [t.shape for t in tensors]

    for keep in (False, True):
        ctx = Ctx()
        with torch.no_grad():
            ops.BlockedReluMLP.forward(ctx, x, *params, keep)
        if keep:  # x with its ones column, both weights, and every hidden block
            assert len(ctx.saved) == 3 + -(-600 // ops.MLP_BLOCK)
            assert ctx.saved[3] == (ops.MLP_BLOCK, mlp.fc1.out_features)
        else:  # inference: nothing kept, one hidden block alive at a time
            assert ctx.saved is None

    keeps = []
    apply = ops.BlockedReluMLP.apply
    monkeypatch.setattr(ops.BlockedReluMLP, "apply", lambda *a: keeps.append(a[-1]) or apply(*a))
    with torch.no_grad():  # evaluate, segment
        clip.decoder_mlp(mlp, x)
    clip.decoder_mlp(mlp, x)  # training
    assert keeps == [False, True]


@pytest.mark.parametrize("strategy", ["full", "decoder", "adapter", "lora", "bitfit"])
def test_bf16_autocast_on_cpu_falls_back_from_the_fp32_fast_paths(model, inputs, strategy, monkeypatch):
    """Under CPU bf16 autocast (Accelerate's --mixed-precision bf16 on CPU) the blocked MLP, whose own
    backward is fp32 only, gives way to HF's MLP; logits follow the stock forward under the same
    autocast; every trainable tensor gets a finite gradient."""
    apply_strategy(model, strategy)
    blocked = []
    apply = ops.BlockedReluMLP.apply
    monkeypatch.setattr(ops.BlockedReluMLP, "apply", lambda *a: blocked.append(1) or apply(*a))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = ours(model, inputs)
        with torch.no_grad():
            stock = stock_logits(model, inputs)
    assert logits.dtype == torch.bfloat16 and not blocked
    # Two bf16 steps (eps = 2^-7) of the logits' scale: each side's last rounding may land one step
    # apart when oneDNN picks another kernel (measured: 0 steps with AVX-512/AMX, 0.81 with AVX2 only,
    # ONEDNN_MAX_CPU_ISA=AVX2). A wrong forward (a skipped decoder layer: 23 steps) is far outside.
    assert_close(logits.float(), stock.float(), dtype=torch.bfloat16, steps=2)
    logits.float().square().mean().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and p.grad.isfinite().all() for _, p in trainable)
