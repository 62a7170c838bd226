"""SAM 3 (Carion et al. 2025, "SAM 3: Segment Anything with Concepts"): the only code that knows
transformers' ``Sam3Model`` internals.

A text prompt in, one logit map per (image, prompt) out, in the three stages of
:mod:`clipseg_bench.model.forward`:

- ``encode_images``: the ViT backbone's output (B, N, C), N = (S/14)^2 tokens. That is what the
  feature cache stores: the FPN neck (run in ``decode``, once per image, before images are paired
  with prompts) turns it into 5.2x more numbers (three 256-wide maps at 4x, 2x and 1x the token
  grid against one 1024-wide one: 27.9M against 5.3M values per 1008 px image, 55.7 against 10.6 MB
  in fp16), and the neck costs about 5% of the ViT (0.42 against 8.96 s at 336 px on 2 CPU cores,
  benchmarks/README.md). The neck's sine position encodings are the same for every image and are
  rebuilt, never cached;
- ``encode_prompts``: every token of the CLIP text encoder's last layer through ``text_projection``
  (SAM 3 reads all tokens, not a pooled one) and the padding mask: :class:`Sam3Prompts`;
- ``decode``: per (image, prompt) pair, what ``Sam3Model.forward`` runs after its two encoders
  (DETR encoder on the 1x FPN level fused with the prompt tokens, DETR decoder with the presence
  token, dot-product scoring, mask decoder), as far as the chosen output reads it, then one logit map
  per pair (:func:`organ_logits`, :data:`MASK_OUTPUT`: the semantic head, which needs neither the
  DETR decoder nor the instance branch) upsampled to the input side S.

With the same weights ``decode`` equals the stock forward run on each pair (tests/model/test_sam3.py).

Named parts: vision = ViT backbone + FPN neck; text = CLIP text encoder + ``text_projection``;
decoder = DETR encoder, DETR decoder, dot-product scoring and mask decoder (decoder-only trains
what of them the chosen output reads: with ``semantic`` the DETR encoder and the mask decoder's
pixel decoder, prompt cross-attention and semantic head). The geometry encoder encodes box prompts: a text-prompted forward never runs it, so it
belongs to no part and is listed in ``unused_parameters`` with the other tensors a text-prompted
mask never depends on (see there).

``sam3-tiny`` is a randomly initialised ``Sam3Model`` of the real architecture with small sizes
(0.27M parameters, 112 px), built with the project's own CLIP BPE tokenizer
(:mod:`clipseg_bench.model.tokenizer`), from a fixed seed: the same model in every process, no network.

Shapes: B images, K prompts, P (image, prompt) pairs, L prompt tokens, Q DETR queries, N ViT
tokens, C widths, S input side in px, s = 4 S / 14 the mask decoder's side.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipseg_bench.model.families import register_family
from clipseg_bench.model.families.base import ModelFamily, Parts, any_trainable, pair_indices, weights_hash

TINY = "sam3-tiny"
TINY_SEED = 0  # the tiny model's weights; changing it changes what `--model sam3-tiny` means
TINY_SIZE = 112  # 8 x 8 ViT tokens, 32 x 32 masks
REFERENCE_ID = "facebook/sam3"  # the checkpoint (gated: users download it and pass the folder)
# Sam3ImageProcessor's defaults (transformers' IMAGENET_STANDARD_MEAN/STD) and its 1008 px input.
SAM3_MEAN = (0.5, 0.5, 0.5)
SAM3_STD = (0.5, 0.5, 0.5)
SAM3_SIZE = 1008
TEXT_LENGTH = 32  # Sam3Processor pads and truncates prompts to 32 tokens: the text model's positions
PROCESSOR_FILE = "preprocessor_config.json"

# How SAM 3's outputs become one logit map per (image, prompt): benchmarks/README.md
# (`sam3_mask_choice.py`) measured the four and chose this one; the loss trains the same output.
MASK_OUTPUTS = ("semantic", "semantic_presence", "instance_max", "instance_union")
MASK_OUTPUT = "semantic"
# What each mode reads of SAM 3's outputs (decode computes only that).
OUTPUTS = ("semantic_seg", "presence_logits", "pred_masks", "pred_logits")
READS = {
    "semantic": ("semantic_seg",),
    "semantic_presence": ("semantic_seg", "presence_logits"),
    "instance_max": ("pred_masks", "pred_logits", "presence_logits"),
    "instance_union": ("pred_masks", "pred_logits", "presence_logits"),
}
LOG_HALF = math.log(0.5)
MAX_PROB_GAP = 1e-6  # 1 - p is kept >= this (logit <= 13.8), so a log of it stays finite
MIN_LOG_MISS = -1e-30  # log(1 - p_union) is kept <= this (logit >= -69): finite at p = 0


class Sam3Prompts(NamedTuple):
    """Prompt features of K prompts, what ``decode`` reads.

    Attributes:
        features: (K, L, C) every token of the text encoder's last layer, projected to the DETR width.
        mask: (K, L) bool, True at real tokens, False at padding.
    """

    features: Tensor
    mask: Tensor


# --- configs and random models ----------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _tiny_token_ids() -> tuple[int, int, int]:
    from clipseg_bench.model.tokenizer import BOS, EOS, tiny_vocab

    vocab, _ = tiny_vocab()
    return len(vocab), vocab[BOS], vocab[EOS]


def tiny_config(*, image_size: int = TINY_SIZE, vision_layers: int = 2, queries: int = 10):
    """A small SAM 3 of the real architecture (about 0.27M parameters).

    ViT: 32 wide, ``vision_layers`` layers, 2 heads, MLP 64, patch 14, windows of 4 x 4 tokens and
    global attention in every second layer (the real model: windows of 24, global in every 8th),
    position embeddings for 56 px (one window, tiled over the image as the real 336 px ones are).
    FPN, DETR encoder/decoder (one layer each, ``queries`` queries), mask decoder and the unused
    geometry encoder: 32 wide. CLIP text: 32 wide, 2 layers, our tiny vocabulary and its BOS/EOS ids
    (SAM 3 reads every token, so EOS pooling does not matter here, but the ids stay consistent),
    32 positions like the real model.

    Args:
        image_size: input side (px), a multiple of 14.
        vision_layers: ViT depth (layers 1, 3, ... attend globally).
        queries: DETR object queries (the real model: 200).
    """
    from transformers import Sam3Config

    vocab_size, bos, eos = _tiny_token_ids()
    width = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64)
    return Sam3Config(
        vision_config=dict(
            backbone_config=dict(
                model_type="sam3_vit_model",  # needed: the sub-config is resolved by model_type
                num_hidden_layers=vision_layers,
                image_size=image_size,
                patch_size=14,
                window_size=4,
                global_attn_indexes=list(range(1, vision_layers, 2)),
                pretrain_image_size=56,
                **width,
            ),
            fpn_hidden_size=32,
            backbone_feature_sizes=_feature_sizes(image_size, 14),
        ),
        text_config=dict(
            num_hidden_layers=2,
            vocab_size=vocab_size,
            projection_dim=32,
            max_position_embeddings=TEXT_LENGTH,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=eos,
            **width,
        ),
        geometry_encoder_config=dict(num_layers=1, **width),
        detr_encoder_config=dict(num_layers=1, **width),
        detr_decoder_config=dict(num_layers=1, num_queries=queries, **width),
        mask_decoder_config=dict(hidden_size=32, num_attention_heads=2),
    )


def _feature_sizes(image_size: int, patch: int) -> list[list[int]]:
    grid = image_size // patch
    return [[4 * grid] * 2, [2 * grid] * 2, [grid] * 2]


def reference_config():
    """The architecture of ``facebook/sam3`` (``Sam3Config``'s defaults, documented as that
    checkpoint's): ViT-L-like backbone 1024 wide, 32 layers, 1008 px; CLIP text 1024 wide, 24 layers;
    DETR encoder and decoder 6 layers, 256 wide, 200 queries. 840.4M parameters, for random-weight
    benchmarks and parameter counts without a download."""
    from transformers import Sam3Config

    return Sam3Config()


def build(config=None, *, seed: int = TINY_SEED):
    """A randomly initialised ``Sam3Model``, the same for the same config and seed in every process.

    Args:
        config: defaults to :func:`tiny_config`.
        seed: seed of the weights (transformers' init: normal(0, 0.02) Linear weights); the global
            RNG is left untouched.
    """
    from transformers import Sam3Model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Sam3Model(config or tiny_config())
    return model.eval()


def set_image_size(model, image_size: int) -> None:
    """Make ``model`` take ``image_size`` px inputs.

    Only the global-attention ViT layers depend on the side: their rotary positions (buffers, not
    weights) span the token grid. They are recomputed the way ``Sam3ViTLayer`` computes them at
    construction, so the model is what transformers builds with that ``image_size`` in its config.
    """
    vision = model.config.vision_config
    backbone = model.vision_encoder.backbone
    if backbone.config.image_size == image_size:
        return
    for config in {id(c): c for c in (vision.backbone_config, backbone.config)}.values():
        config.image_size = image_size
    vision.backbone_feature_sizes = _feature_sizes(image_size, backbone.config.patch_size)
    for layer in backbone.layers:
        if layer.window_size == 0:
            positions = layer.precompute_positions(layer.config, 0)
            layer.position_ids = positions.to(layer.position_ids.device)


# --- loading a checkpoint --------------------------------------------------------------------------


def _from_pretrained(spec: str, source: str, local: bool):
    """(model, tokenizer, preprocessing dict) of a folder or hub id.

    ``Sam3ImageProcessor`` needs torchvision, which this project does not install, so its settings
    are read as the dict transformers would build it from.
    """
    from transformers import AutoTokenizer, Sam3Model
    from transformers.image_processing_base import ImageProcessingMixin

    from clipseg_bench.model.load import load_error

    try:
        model = Sam3Model.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
        processor, _ = ImageProcessingMixin.get_image_processor_dict(source)
    except (OSError, ValueError) as exc:
        load_error(spec, source, local, exc)
    # Prompts longer than the text model's positions would index past its position embedding.
    positions = model.config.text_config.max_position_embeddings
    tokenizer.model_max_length = min(int(tokenizer.model_max_length), positions)
    return model.eval(), tokenizer, processor


def _processor_dict(image_size: int, mean, std) -> dict:
    """What ``Sam3ImageProcessor.save_pretrained`` writes for this preprocessing (its defaults otherwise)."""
    mask_side = 4 * image_size // 14  # the mask decoder's side: 288 at 1008 px
    return {
        "image_processor_type": "Sam3ImageProcessor",
        "processor_class": "Sam3Processor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"height": image_size, "width": image_size},
        "mask_size": {"height": mask_side, "width": mask_side},
        "resample": 2,  # PIL bilinear
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(mean),
        "image_std": list(std),
    }


# --- turning SAM 3's outputs into one map per (image, prompt) ----------------------------------------


def log1mexp(x: Tensor, *, gap: float) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Mächler 2012, "Accurately computing
    log(1 - exp(-|a|))"); torch has no such op. ``x`` is capped at ``-gap`` so the result stays
    finite, and each branch only sees inputs where it is finite, so gradients never turn NaN."""
    near_zero = x > LOG_HALF
    small = torch.log(-torch.expm1(x.clamp(max=-gap)))
    large = torch.log1p(-torch.exp(x.clamp(max=LOG_HALF)))
    return torch.where(near_zero, small, large)


def instance_log_probs(outputs: Mapping[str, Tensor]) -> Tensor:
    """log P(pixel in instance q) = log sigmoid(mask) + log sigmoid(score) + log sigmoid(presence),
    (P, Q, s, s): each query's mask weighted by its score and the image-level presence, as
    ``Sam3ImageProcessor.post_process_instance_segmentation`` weighs them (scores x presence)."""
    masks = F.logsigmoid(outputs["pred_masks"].float())
    scores = F.logsigmoid(outputs["pred_logits"].float()) + F.logsigmoid(outputs["presence_logits"].float())
    return masks + scores[:, :, None, None]


def _logit(log_p: Tensor) -> Tensor:
    """logit(p) = log p - log(1 - p) from log p, finite up to p = 1 - :data:`MAX_PROB_GAP`."""
    log_p = log_p.clamp(max=-MAX_PROB_GAP)
    return log_p - log1mexp(log_p, gap=MAX_PROB_GAP)


def organ_logits(outputs: Mapping[str, Tensor], mode: str, side: int) -> Tensor:
    """One logit map per pair from SAM 3's outputs, upsampled to ``side``: (P, side, side) float32.

    Args:
        outputs: per pair ``semantic_seg`` (P, 1, s, s), ``pred_masks`` (P, Q, s, s), ``pred_logits``
            (P, Q), ``presence_logits`` (P, 1) (a ``Sam3ImageSegmentationOutput`` or
            :func:`decode_outputs`' dict; each mode reads what it names).
        mode: ``semantic``: the semantic head's logits; ``semantic_presence``: the semantic
            probability times sigmoid(presence), the image-level "is it there at all";
            ``instance_max``: at each pixel the most probable instance; ``instance_union``: the soft
            union 1 - prod_q (1 - p_q) of the instances; instance probabilities p_q from
            :func:`instance_log_probs`.
        side: output side (px); bilinear like the image processor's post-processing, on logits.
    """
    if mode == "semantic":
        logits = outputs["semantic_seg"][:, 0].float()
    elif mode == "semantic_presence":
        presence = F.logsigmoid(outputs["presence_logits"].float())[:, :, None]  # (P, 1, 1)
        logits = _logit(F.logsigmoid(outputs["semantic_seg"][:, 0].float()) + presence)
    elif mode == "instance_max":
        logits = _logit(instance_log_probs(outputs).amax(1))
    elif mode == "instance_union":
        log_p = instance_log_probs(outputs).clamp(max=-MAX_PROB_GAP)
        log_miss = log1mexp(log_p, gap=MAX_PROB_GAP).sum(1).clamp(max=MIN_LOG_MISS)  # log(1 - p_union)
        logits = log1mexp(log_miss, gap=-MIN_LOG_MISS) - log_miss
    else:
        raise ValueError(f"mask output must be one of {MASK_OUTPUTS}, not {mode!r}")
    if logits.shape[-1] != side:
        logits = F.interpolate(logits[:, None], size=(side, side), mode="bilinear", align_corners=False)[:, 0]
    return logits


# --- the forward after the encoders ---------------------------------------------------------------


def fpn_levels(model, hidden: Tensor) -> list[Tensor]:
    """The FPN levels ``Sam3Model.forward`` reads, from the ViT output: (B, N, C) -> each (B, C', h, w).

    ``Sam3VisionNeck`` without its last level: the forward drops it (``fpn_hidden_states[:-1]``)."""
    batch, tokens, width = hidden.shape
    grid = math.isqrt(tokens)
    spatial = hidden.view(batch, grid, grid, width).permute(0, 3, 1, 2)
    return [layer(spatial) for layer in model.vision_encoder.neck.fpn_layers[:-1]]


def decode_outputs(
    model, features: Sequence[Tensor], prompts: Sam3Prompts, *, pairs=None, want=OUTPUTS
) -> dict[str, Tensor]:
    """SAM 3's outputs per (image, prompt) pair: ``Sam3Model.forward`` after its two encoders.

    The FPN neck runs once per image; the DETR encoder, DETR decoder, scoring and mask decoder run on
    the P pairs as one batch (each pair's image levels and prompt tokens gathered by index). Only what
    ``want`` needs runs: ``semantic_seg`` needs neither the DETR decoder nor the mask decoder's
    instance branch, ``presence_logits`` needs the DETR decoder.

    Args:
        features: ``[ViT output (B, N, C)]`` from ``encode_images`` or the cache.
        prompts: from ``encode_prompts``.
        pairs: None for all B x K combinations, image-major, or (P, 2) (image index, prompt index).
        want: names of the outputs to compute, of :data:`OUTPUTS` (a mode's: :data:`READS`).

    Returns:
        Those of ``semantic_seg`` (P, 1, s, s), ``presence_logits`` (P, 1), ``pred_masks``
        (P, Q, s, s) and ``pred_logits`` (P, Q) that ``want`` names (the instance pair comes with all four).
    """
    levels = fpn_levels(model, features[0])
    img, prm = pair_indices(levels[0].shape[0], prompts.features.shape[0], pairs, levels[0].device)
    levels = [level[img] for level in levels]
    text, mask = prompts.features[prm], prompts.mask[prm]
    last = levels[-1]
    position = model.vision_encoder.neck.position_encoding(last.shape, last.device, last.dtype)
    encoded = model.detr_encoder(
        vision_features=[last], text_features=text, vision_pos_embeds=[position], text_mask=mask
    )
    out = {}
    instances = bool({"pred_masks", "pred_logits"} & set(want))
    if not instances:
        out["semantic_seg"] = _semantic_only(
            model.mask_decoder, levels, encoded.last_hidden_state, text, mask
        )
        if "presence_logits" not in want:
            return out
    decoded = model.detr_decoder(
        vision_features=encoded.last_hidden_state,
        text_features=encoded.text_features,
        vision_pos_encoding=encoded.pos_embeds_flattened,
        text_mask=mask,
        spatial_shapes=encoded.spatial_shapes,
    )
    out["presence_logits"] = decoded.presence_logits[-1]
    if not instances:
        return out
    queries = decoded.intermediate_hidden_states[-1]
    scores = model.dot_product_scoring(
        decoder_hidden_states=queries[None], text_features=encoded.text_features, text_mask=mask
    )
    masks = model.mask_decoder(
        decoder_queries=queries,
        backbone_features=levels,
        encoder_hidden_states=encoded.last_hidden_state,
        prompt_features=text,
        prompt_mask=mask,
    )
    out.update(semantic_seg=masks.semantic_seg, pred_masks=masks.pred_masks, pred_logits=scores[0, ..., 0])
    return out


def _semantic_only(mask_decoder, levels: list[Tensor], encoded: Tensor, text: Tensor, mask: Tensor) -> Tensor:
    """``Sam3MaskDecoder.forward``'s semantic branch alone: prompt cross-attention on the encoded
    image tokens, pixel decoder, semantic projection (its instance branch needs the DETR decoder)."""
    from transformers.masking_utils import create_bidirectional_mask

    normed = mask_decoder.prompt_cross_attn_norm(encoded)
    cross_mask = create_bidirectional_mask(
        config=mask_decoder.config, inputs_embeds=normed, encoder_hidden_states=text, attention_mask=mask
    )
    attended, _ = mask_decoder.prompt_cross_attn(
        query=normed, key=text, value=text, attention_mask=cross_mask
    )
    encoded = encoded + mask_decoder.prompt_cross_attn_dropout(attended)
    pixels = mask_decoder._embed_pixels(backbone_features=levels, encoder_hidden_states=encoded)
    return mask_decoder.semantic_projection(pixels)


# --- the family ------------------------------------------------------------------------------------


@register_family
class Sam3(ModelFamily):
    name = "sam3"
    # "sam3_video" configs hold the image model under detector_config, which Sam3Model reads.
    model_types = ("sam3", "sam3_video")
    tiny_spec = TINY
    # Linear layers of the encoder layers: the ViT's attention (q/k/v/o_proj) and MLP (fc1/fc2), the
    # CLIP text layers' attention (q/k/v/out_proj) and MLP (fc1/fc2).
    linears = ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "fc1", "fc2")
    lora_targets = ("q_proj", "v_proj")
    positions = {"attention": "attention", "mlp": "mlp"}  # Sam3ViTLayer's sublayers
    text_positions = {"attention": "self_attn", "mlp": "mlp"}  # CLIPEncoderLayer's
    mask_output = MASK_OUTPUT

    # --- loading ---------------------------------------------------------------------------------

    def load(self, spec: str, *, image_size: int | None = None):
        from clipseg_bench.model.load import LoadedModel, check_size, model_source, processor_side
        from clipseg_bench.model.tokenizer import build_tiny_tokenizer

        if spec == TINY:
            model, tokenizer = build(), build_tiny_tokenizer(max_length=TEXT_LENGTH)
            side, mean, std = TINY_SIZE, SAM3_MEAN, SAM3_STD
        else:
            source, local, _ = model_source(spec)
            model, tokenizer, processor = _from_pretrained(spec, source, local)
            side = processor_side(processor.get("size", SAM3_SIZE))
            mean = tuple(float(x) for x in processor.get("image_mean", SAM3_MEAN))
            std = tuple(float(x) for x in processor.get("image_std", SAM3_STD))
        side = check_size(image_size or side, self.patch_size(model), spec)
        set_image_size(model, side)
        return LoadedModel(
            model=model, tokenizer=tokenizer, image_size=side, mean=mean, std=std, spec=spec, family=self
        )

    def reference_config(self, *, tokenizer=None):
        # Sam3Model.get_text_features projects every token (no end-of-text pooling): a tokenizer
        # other than the checkpoint's needs no special-token ids in the config.
        return reference_config()

    def build(self, config, *, seed: int = TINY_SEED):
        return build(config, seed=seed)

    def save(self, loaded, folder) -> None:
        """Model, tokenizer and the image processor's settings (as ``Sam3ImageProcessor`` writes them)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        loaded.model.save_pretrained(folder)
        loaded.tokenizer.save_pretrained(folder)
        doc = _processor_dict(loaded.image_size, loaded.mean, loaded.std)
        (folder / PROCESSOR_FILE).write_text(json.dumps(doc, indent=2) + "\n")

    def patch_size(self, model) -> int:
        return int(model.config.vision_config.backbone_config.patch_size)

    # --- named parts -------------------------------------------------------------------------------

    def parts(self, model) -> Parts:
        return Parts(
            vision=[model.vision_encoder.backbone, model.vision_encoder.neck],
            text=[model.text_encoder.text_model, model.text_projection],
            decoder=[model.detr_encoder, model.detr_decoder, model.dot_product_scoring, model.mask_decoder],
        )

    def encoder_layers(self, model, encoder: str) -> list[nn.Module]:
        if encoder == "vision":
            return list(model.vision_encoder.backbone.layers)
        if encoder == "text":
            return list(model.text_encoder.text_model.encoder.layers)
        raise ValueError(f"encoder must be 'vision' or 'text', not {encoder!r}")

    def layer_width(self, layer: nn.Module) -> int:
        return int(layer.layer_norm1.normalized_shape[0])  # Sam3ViTLayer and CLIPEncoderLayer alike

    def sublayer(self, encoder: str, position: str) -> str:
        return (self.text_positions if encoder == "text" else self.positions)[position]

    def unused_parameters(self, model) -> list[nn.Parameter]:
        """What a text-prompted mask never depends on, or can never train:

        - the geometry encoder (it encodes box prompts; never run without boxes);
        - the FPN neck's last level (``Sam3Model.forward`` drops it: ``fpn_hidden_states[:-1]``);
        - the CLIP text encoder's own ``text_projection`` of its pooled output (SAM 3 projects every
          token with ``model.text_projection`` instead);
        - the DETR decoder's ``box_head``: its box refinements are detached before the next layer
          reads them, so no mask loss reaches it (SAM 3 trains it with box losses);
        - the pixel decoder's upsampling stages beyond the levels it gets: with three FPN levels it
          runs two of its ``num_upsampling_stages`` = 3 (conv + group norm) stages (found by the
          gradient audit: the third never got a gradient);
        - by :attr:`mask_output` (what it reads, :data:`READS`): with an instance mode the semantic
          head (``semantic_projection``); without instances the scoring, the mask decoder's instance
          branch (``mask_embedder``, ``instance_projection``) and the DETR decoder's final norm of
          the queries, and with ``semantic`` (no presence either) the whole DETR decoder.
        """
        modules = [
            model.geometry_encoder,
            model.vision_encoder.neck.fpn_layers[-1],
            model.text_encoder.text_projection,
            model.detr_decoder.box_head,
        ]
        mask_decoder = model.mask_decoder
        stages = len(model.vision_encoder.neck.fpn_layers) - 2  # levels read, minus the one it starts from
        modules += [
            *mask_decoder.pixel_decoder.conv_layers[stages:],
            *mask_decoder.pixel_decoder.norms[stages:],
        ]
        reads = READS[self.mask_output]
        if "pred_masks" in reads:
            modules.append(mask_decoder.semantic_projection)
        else:  # no instances: no scores, no query masks, no final norm of the queries
            modules += [
                model.dot_product_scoring,
                mask_decoder.mask_embedder,
                mask_decoder.instance_projection,
            ]
            without_presence = "presence_logits" not in reads
            modules.append(model.detr_decoder if without_presence else model.detr_decoder.output_layer_norm)
        return list({id(p): p for m in modules for p in m.parameters()}.values())

    def vision_trainable(self, model) -> bool:
        """Whether the ViT trains (what ``encode_images`` runs and the cache stores); the neck runs
        in ``decode``, so a trainable neck alone leaves the cache valid."""
        return any_trainable([model.vision_encoder.backbone])

    def vision_fingerprint(self, model) -> str:
        """A hash of the ViT's weights and input side: all the cached ViT output depends on."""
        backbone = model.vision_encoder.backbone
        return weights_hash(sorted(backbone.state_dict().items()), [self.name, backbone.config.image_size])

    def release_vision(self, model) -> None:
        """Drop the ViT's weights once its outputs are cached (the neck stays: ``decode`` runs it)."""
        model.vision_encoder.backbone.to("meta")

    # --- the forward -------------------------------------------------------------------------------

    def encode_images(self, model, pixel_values: Tensor) -> list[Tensor]:
        """``[ViT output (B, N, C)]``: ``Sam3ViTModel.forward`` (what ``get_vision_features`` runs
        before its neck)."""
        return [model.vision_encoder.backbone(pixel_values).last_hidden_state]

    def encode_prompts(self, model, input_ids: Tensor, attention_mask: Tensor) -> Sam3Prompts:
        """Every token of the CLIP text encoder's last layer through ``text_projection``, and the mask:
        ``Sam3Model.get_text_features`` without the pooled projection it computes and never reads."""
        hidden = model.text_encoder.text_model(input_ids=input_ids, attention_mask=attention_mask)
        return Sam3Prompts(model.text_projection(hidden.last_hidden_state), attention_mask.bool())

    def decode(self, model, features: Sequence[Tensor], prompts: Sam3Prompts, *, pairs=None) -> Tensor:
        """Logits (B, K, S, S) for every image and prompt, or (P, S, S) for ``pairs`` (P, 2).

        :func:`decode_outputs`, then :func:`organ_logits` with :attr:`mask_output` at the input side
        S = 14 x the ViT's token grid.
        """
        outputs = decode_outputs(model, features, prompts, pairs=pairs, want=READS[self.mask_output])
        logits = organ_logits(outputs, self.mask_output, self.input_side(model))
        if pairs is None:
            logits = logits.view(features[0].shape[0], prompts.features.shape[0], *logits.shape[-2:])
        return logits

    def input_side(self, model) -> int:
        return int(model.vision_encoder.backbone.config.image_size)

    def stock_logits(self, model, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``Sam3Model.forward`` on every (image, prompt) pair, mapped by :func:`organ_logits`: (B, K, S, S)."""
        b, k = pixel_values.shape[0], input_ids.shape[0]
        out = model(
            pixel_values=pixel_values.repeat_interleave(k, 0),
            input_ids=input_ids.repeat(b, 1),
            attention_mask=attention_mask.repeat(b, 1),
        )
        logits = organ_logits(out, self.mask_output, pixel_values.shape[-1])
        return logits.view(b, k, *logits.shape[-2:])
