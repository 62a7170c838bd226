"""The SAM 3 family: our three-stage forward against transformers' own, the per-organ mask, loading,
image sizes, named parts and the feature cache, all on the tiny SAM 3 (no network)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipseg_bench.errors import InputError
from clipseg_bench.model import forward as fw
from clipseg_bench.model.families import family_of
from clipseg_bench.model.families.sam3 import (
    MASK_OUTPUT,
    MASK_OUTPUTS,
    SAM3_MEAN,
    SAM3_STD,
    TEXT_LENGTH,
    TINY_SIZE,
    Sam3,
    build,
    decode_outputs,
    organ_logits,
    reference_config,
    tiny_config,
)
from clipseg_bench.model.load import load_model, save_model
from clipseg_bench.model.tokenizer import BOS, EOS

# Our decode and the stock forward run the same modules on the same numbers, batched differently
# (the neck once per image against once per pair, the pairs gathered by index): a BLAS kernel may
# block a product differently for another batch shape, one rounding of eps x |value| per operation.
# STEPS bounds how many such roundings add up on the way to a logit: the tiny model's deepest path
# (2 ViT + 2 text layers, DETR encoder and decoder, mask decoder) has about 20 matmul/norm stages;
# 64 leaves 3x. Measured on this machine: 0.0 (bit-identical) in every mode.
STEPS = 64
EPS = torch.finfo(torch.float32).eps


def close(ours: torch.Tensor, reference: torch.Tensor) -> None:
    atol = EPS * reference.abs().max().item() * STEPS
    torch.testing.assert_close(ours, reference, atol=atol, rtol=0)


def run(model, inputs, **kw) -> torch.Tensor:
    return fw.forward(
        model,
        inputs["pixel_values"],
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        **kw,
    )


@pytest.fixture(scope="module")
def tiny112():
    """The tiny SAM 3 at its own 112 px (2 x 2 attention windows of 4 x 4 tokens), with inputs."""
    loaded = load_model("sam3-tiny")
    g = torch.Generator().manual_seed(1)
    slices = torch.randint(0, 256, (2, 80, 80), dtype=torch.uint8, generator=g)
    pixels = fw.preprocess(slices, size=loaded.image_size, mean=loaded.mean, std=loaded.std)
    tokens = fw.tokenize(
        loaded, ["liver", "right kidney", "a computerized tomography of a inferior vena cava"]
    )
    return loaded, {"pixel_values": pixels, **tokens}


# --- our forward against the stock one -------------------------------------------------------------


@pytest.mark.parametrize("mode", MASK_OUTPUTS)
def test_shared_encoding_equals_the_stock_forward_per_pair(tiny112, mode, monkeypatch):
    """Each image encoded once for K prompts, each prompt once for B images, equals Sam3Model.forward
    run on each (image, prompt) pair, in every mask mode (the family's own included)."""
    loaded, inputs = tiny112
    fam = loaded.family
    monkeypatch.setattr(fam, "mask_output", mode)
    with torch.no_grad():
        ours = run(loaded.model, inputs)
        stock = fam.stock_logits(
            loaded.model, inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]
        )
    assert ours.shape == (2, 3, 112, 112)
    close(ours, stock)
    assert ours.std() > 0 and not torch.equal(ours[:, 0], ours[:, 1])  # prompts make a difference


def test_pairs_and_cached_features_give_the_same_logits(tiny112):
    loaded, inputs = tiny112
    model = loaded.model
    with torch.no_grad():
        full = run(model, inputs)
        pairs = torch.tensor([[1, 2], [0, 0], [1, 0]])
        close(run(model, inputs, pairs=pairs), full[pairs[:, 0], pairs[:, 1]])
        stacked = fw.stack_features(model, fw.encode_images(model, inputs["pixel_values"]))
        assert stacked.shape == (2, 1, 64, 32)  # one cache row per image: the ViT's 8 x 8 tokens
        rows = [stacked[i : i + 1].clone() for i in range(2)]  # rows come back one by one
        again = fw.forward(
            model,
            activations=fw.unstack_features(model, torch.cat(rows)),
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
        )
    assert torch.equal(again, full)


def test_prompt_padding_does_not_change_the_masks(tiny112, sam3_tokenizer):
    """SAM 3's processor pads prompts to 32 tokens, ours to the longest: the padding is masked out."""
    loaded, inputs = tiny112
    long = sam3_tokenizer(
        ["liver", "right kidney", "a computerized tomography of a inferior vena cava"],
        padding="max_length",
        max_length=TEXT_LENGTH,
        return_tensors="pt",
    )
    assert long["input_ids"].shape[1] == TEXT_LENGTH > inputs["input_ids"].shape[1]
    with torch.no_grad():
        close(run(loaded.model, {**inputs, **long}), run(loaded.model, inputs))


# --- the per-organ mask -----------------------------------------------------------------------------


def _outputs(p: int = 4, q: int = 5, side: int = 6, scale: float = 3.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    draw = lambda *s: scale * torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return {
        "semantic_seg": draw(p, 1, side, side),
        "pred_masks": draw(p, q, side, side),
        "pred_logits": draw(p, q),
        "presence_logits": draw(p, 1),
    }


def test_instance_modes_are_the_logits_of_max_and_soft_union_of_weighted_instances():
    out = _outputs()
    p = (
        torch.sigmoid(out["pred_masks"])
        * torch.sigmoid(out["pred_logits"])[:, :, None, None]
        * torch.sigmoid(out["presence_logits"])[:, :, None, None]
    )  # float64, the definition
    f32 = {k: v.float() for k, v in out.items()}
    # float32 log-space results against the float64 definition: a few eps of the logit scale.
    tol = dict(atol=32 * EPS * 10, rtol=0)
    torch.testing.assert_close(organ_logits(f32, "instance_max", 6).double(), torch.logit(p.amax(1)), **tol)
    union = 1 - (1 - p).prod(1)
    torch.testing.assert_close(organ_logits(f32, "instance_union", 6).double(), torch.logit(union), **tol)
    torch.testing.assert_close(organ_logits(f32, "semantic", 6), f32["semantic_seg"][:, 0])


def test_mask_logits_stay_finite_with_finite_gradients_at_the_extremes():
    out = {k: v.float().requires_grad_() for k, v in _outputs(scale=60.0).items()}
    for mode in ("instance_max", "instance_union"):
        logits = organ_logits(out, mode, 12)
        assert logits.shape == (4, 12, 12) and torch.isfinite(logits).all()
        (grad,) = torch.autograd.grad(logits.sum(), out["pred_masks"])
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_the_mask_output_is_upsampled_bilinearly_to_the_input_side():
    out = {k: v.float() for k, v in _outputs().items()}
    up = organ_logits(out, "semantic", 24)
    want = F.interpolate(out["semantic_seg"], size=(24, 24), mode="bilinear", align_corners=False)[:, 0]
    assert torch.equal(up, want)
    with pytest.raises(ValueError, match="mask output must be one of"):
        organ_logits(out, "union", 6)


def test_the_family_decodes_its_chosen_output(tiny112):
    loaded, inputs = tiny112
    model, fam = loaded.model, loaded.family
    assert fam.mask_output == MASK_OUTPUT in MASK_OUTPUTS
    with torch.no_grad():
        features = fw.encode_images(model, inputs["pixel_values"])
        prompts = fw.encode_prompts(model, inputs["input_ids"], inputs["attention_mask"])
        raw = decode_outputs(model, features, prompts)  # every output, pairs image-major
        want = organ_logits(raw, MASK_OUTPUT, 112).view(2, 3, 112, 112)
        assert torch.equal(fw.decode(model, features, prompts), want)


# --- named parts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MASK_OUTPUTS)
def test_unused_parameters_are_exactly_those_no_mask_loss_reaches(sam3_model, sam3_inputs, mode, monkeypatch):
    fam = family_of(sam3_model)
    monkeypatch.setattr(fam, "mask_output", mode)
    sam3_model.requires_grad_(True).train()
    run(sam3_model, sam3_inputs).square().mean().backward()
    unreached = {n for n, p in sam3_model.named_parameters() if p.grad is None}
    unused = {id(p) for p in fam.unused_parameters(sam3_model)}
    assert unreached == {n for n, p in sam3_model.named_parameters() if id(p) in unused}
    assert any(n.startswith("geometry_encoder.") for n in unreached)
    assert ("mask_decoder.semantic_projection.weight" in unreached) == mode.startswith("instance")
    assert ("detr_decoder.presence_head.layer1.weight" in unreached) == (mode == "semantic")


def test_parts_cover_what_the_forward_trains(sam3_model):
    fam = family_of(sam3_model)
    parts = fam.parts(sam3_model)
    owned = {id(p) for _, modules in parts.items() for m in modules for p in m.parameters()}
    unused = {id(p) for p in fam.unused_parameters(sam3_model)}
    outside = [n for n, p in sam3_model.named_parameters() if id(p) not in owned | unused]
    assert outside == []  # every parameter a mask depends on belongs to a part
    assert fam.encoder_layers(sam3_model, "vision") == list(sam3_model.vision_encoder.backbone.layers)
    assert [fam.layer_width(x) for x in fam.encoder_layers(sam3_model, "text")] == [32, 32]
    assert (
        fam.sublayer("vision", "attention") == "attention"
        and fam.sublayer("text", "attention") == "self_attn"
    )
    for encoder in ("vision", "text"):
        layer = fam.encoder_layers(sam3_model, encoder)[0]
        for position in ("attention", "mlp"):
            assert isinstance(getattr(layer, fam.sublayer(encoder, position)), torch.nn.Module)
        linears = {n.rsplit(".", 1)[-1] for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        assert linears <= set(fam.linears)
    with pytest.raises(ValueError, match="encoder must be"):
        fam.encoder_layers(sam3_model, "audio")


def test_gradient_checkpointing_gives_the_same_gradients(sam3_base, sam3_inputs):
    grads, calls = [], []
    for enabled in (False, True):
        model = copy.deepcopy(sam3_base).requires_grad_(True).train()
        fw.set_gradient_checkpointing(model, enabled)
        fam = family_of(model)
        mlps = [layer.mlp for enc in ("vision", "text") for layer in fam.encoder_layers(model, enc)]
        seen = []
        for mlp in mlps:  # wrapped, not hooked: module hooks do not fire in the recompute
            mlp.forward = lambda x, f=mlp.forward, seen=seen: (seen.append(1), f(x))[1]
        torch.manual_seed(0)  # the DETR layers' dropout (0.1) draws in training mode
        run(model, sam3_inputs).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        calls.append(len(seen) / len(mlps))
    assert calls == [1, 2]  # with checkpointing every ViT and text layer runs again in backward
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


# --- loading and sizes ------------------------------------------------------------------------------


def test_tiny_is_the_same_model_in_every_call_and_leaves_the_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, b = load_model("sam3-tiny"), load_model("sam3-tiny")
    assert torch.equal(torch.get_rng_state(), state)
    pa, pb = dict(a.model.named_parameters()), dict(b.model.named_parameters())
    assert pa.keys() == pb.keys() and all(torch.equal(pa[n], pb[n]) for n in pa)
    assert (a.image_size, a.mean, a.std) == (TINY_SIZE, SAM3_MEAN, SAM3_STD)
    assert isinstance(a.family, Sam3) and not a.model.training


def test_tiny_text_config_matches_its_tokenizer():
    loaded = load_model("sam3-tiny")
    tc, tok = loaded.model.config.text_config, loaded.tokenizer
    assert tc.vocab_size == len(tok)
    assert (tc.bos_token_id, tc.eos_token_id) == tuple(tok.convert_tokens_to_ids([BOS, EOS]))
    assert tc.eos_token_id != 2  # not HF's legacy pooling trigger
    assert tok.model_max_length == tc.max_position_embeddings == TEXT_LENGTH
    ids = fw.tokenize(tok, ["word " * 50])["input_ids"]
    assert ids.shape[1] == TEXT_LENGTH  # truncated to the positions the text model has


def test_another_image_size_is_the_model_built_at_that_size(sam3_inputs):
    loaded = load_model("sam3-tiny", image_size=56)
    built = build(tiny_config(image_size=56))
    assert loaded.image_size == 56 and loaded.model.config.vision_config.backbone_config.image_size == 56
    for a, b in zip(loaded.model.vision_encoder.backbone.layers, built.vision_encoder.backbone.layers):
        assert torch.equal(a.position_ids, b.position_ids)
    with torch.no_grad():
        assert torch.equal(run(loaded.model, sam3_inputs), run(built, sam3_inputs))
    with pytest.raises(InputError, match="multiple of 14"):
        load_model("sam3-tiny", image_size=64)


def test_saved_model_loads_back_as_a_folder(tmp_path, sam3_inputs):
    loaded = load_model("sam3-tiny", image_size=56)
    save_model(loaded, tmp_path / "m")
    again = load_model(str(tmp_path / "m"))
    assert isinstance(again.family, Sam3)
    assert (again.image_size, again.mean, again.std) == (56, SAM3_MEAN, SAM3_STD)
    assert again.tokenizer.model_max_length == TEXT_LENGTH
    texts = ["liver", "gallbladder", "a computerized tomography of a left adrenal gland"]
    assert torch.equal(fw.tokenize(again, texts)["input_ids"], fw.tokenize(loaded, texts)["input_ids"])
    with torch.no_grad():
        assert torch.equal(run(again.model, sam3_inputs), run(loaded.model, sam3_inputs))


def test_reference_config_is_the_published_architecture():
    from transformers import Sam3Model

    config = reference_config()
    with torch.device("meta"):
        model = Sam3Model(config)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 840.4
    backbone = config.vision_config.backbone_config
    assert (backbone.image_size, backbone.patch_size, backbone.hidden_size, backbone.num_hidden_layers) == (
        1008,
        14,
        1024,
        32,
    )
    assert Sam3().patch_size(model) == 14


# --- the feature cache ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_feature_cache_round_trip(prepared_dir, sam3_model, dtype):
    """Cached ViT outputs decode to the live model's masks: exactly at fp32; at fp16 within the
    rounding of the cached values (2^-11 relative) carried through the decoder."""
    from clipseg_bench.data.dataset import PreparedData, resize_slices
    from clipseg_bench.model.feature_cache import build_feature_cache
    from clipseg_bench.strategies import apply_strategy

    data = PreparedData(prepared_dir)
    rows = data.slices("val").iloc[:3]
    apply_strategy(sam3_model, "decoder")
    args = dict(data=data, size=56, mean=SAM3_MEAN, std=SAM3_STD, show_progress=False, dtype=dtype)
    cache, _ = build_feature_cache(sam3_model, rows=rows, name=f"val3_{dtype}", **args)
    assert cache.shape == (3, 1, 16, 32) and cache.dtype == np.dtype(
        {"fp32": "float32", "fp16": "float16"}[dtype]
    )
    images = torch.from_numpy(np.concatenate([data.inputs(c, [z]) for c, z in zip(rows["case"], rows["z"])]))
    pixels = fw.preprocess(resize_slices(images, 56), size=56, mean=SAM3_MEAN, std=SAM3_STD)
    tokens = fw.tokenize(load_model("sam3-tiny").tokenizer, ["liver", "spleen"])
    with torch.no_grad():
        live = fw.forward(sam3_model, pixels, **tokens)
        family_of(sam3_model).release_vision(sam3_model)  # what training does once the cache exists
        features = [f.float() for f in fw.unstack_features(sam3_model, torch.from_numpy(np.array(cache)))]
        cached = fw.forward(sam3_model, activations=features, **tokens)
    assert sam3_model.vision_encoder.backbone.layers[0].mlp.fc1.weight.is_meta
    if dtype == "fp32":
        assert torch.equal(cached, live)
    else:
        # fp16 keeps 11 significant bits; the decoder is a smooth map, so the logits move by about
        # that relative error times their scale, times the few dozen operations that compound it.
        torch.testing.assert_close(cached, live, atol=2**-11 * live.abs().max().item() * 32, rtol=0)
        assert not torch.equal(cached, live)


def test_cache_size_per_slice_at_real_size_is_the_vit_output():
    """What benchmarks/README.md states: 72 x 72 tokens x 1024 at 1008 px, 10.6 MB per slice in fp16."""
    backbone = reference_config().vision_config.backbone_config
    tokens = (backbone.image_size // backbone.patch_size) ** 2
    assert tokens * backbone.hidden_size * 2 / 1e6 == pytest.approx(10.6, abs=0.05)
    assert math.isqrt(tokens) == 72


def test_a_sam3_video_folder_loads_its_image_model(tmp_path, sam3_inputs):
    """The facebook/sam3 layout: a ``sam3_video`` config holding the image model under
    ``detector_config``, weights prefixed ``detector_model.`` beside the tracker's."""
    from safetensors.torch import load_file, save_file
    from transformers import Sam3VideoConfig

    loaded = load_model("sam3-tiny", image_size=56)
    folder = tmp_path / "sam3"
    save_model(loaded, folder)
    weights = load_file(folder / "model.safetensors")
    (folder / "config.json").unlink()
    Sam3VideoConfig(detector_config=loaded.model.config.to_dict()).save_pretrained(folder)
    save_file(
        {**{f"detector_model.{k}": v for k, v in weights.items()}, "tracker_model.unused": torch.zeros(2)},
        folder / "model.safetensors",
    )
    again = load_model(str(folder))
    assert isinstance(again.family, Sam3) and again.image_size == 56
    with torch.no_grad():
        assert torch.equal(run(again.model, sam3_inputs), run(loaded.model, sam3_inputs))
