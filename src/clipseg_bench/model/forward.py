"""Images and prompts in, logits out, for any model family: the three stages and what decides their gradients.

The stages are the family's (:mod:`clipseg_bench.model.families`): ``encode_images``,
``encode_prompts``, ``decode``. What this module adds is the rule that makes every strategy train
what it says: an encoder runs with gradients iff any of its parameters requires grad (else under
``no_grad``), and a cached input for an encoder that trains is refused, because it would silently
bypass the trainable parameters (Hugging Face's CLIPSeg forward runs both encoders under
``no_grad``: through it "full fine-tuning" trains only the decoder). Each image is encoded once for
all K prompts.

Shapes: B images, K prompts, P (image, prompt) pairs, S input side in px.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipseg_bench.model.families import family_of
from clipseg_bench.model.families.base import prompt_tensors

# --- inputs ----------------------------------------------------------------------------------


def preprocess(images: Tensor, *, size: int, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """CT slices -> normalised 3-channel model input.

    Args:
        images: (B, H, W) uint8 gray slices (already intensity-windowed), copied into R, G and B;
            or (B, 3, H, W) uint8 images whose channels differ (``input_channels`` neighbors /
            windows, :mod:`clipseg_bench.data.channels`). Any device.
        size: square output side in px.
        mean, std: per-channel normalisation of values in [0, 1] (the model's image processor's),
            applied to R, G, B alike in every mode.

    Returns:
        (B, 3, size, size) float32: bilinear resize (antialiased, like PIL's), /255, normalised.
    """
    if images.ndim == 4 and images.shape[1] == 3:
        x = images.to(torch.float32) / 255.0
    elif images.ndim == 3:
        x = images.to(torch.float32).unsqueeze(1) / 255.0
    else:
        raise ValueError(f"expected (B, H, W) or (B, 3, H, W) slices, got shape {tuple(images.shape)}")
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s  # a single gray channel broadcasts to 3 channels


def tokenize(loaded_or_tokenizer: Any, prompts: Sequence[str]) -> dict[str, Tensor]:
    """Tokenize K prompts, padded to the longest.

    Args:
        loaded_or_tokenizer: a ``LoadedModel`` or a tokenizer.
        prompts: K strings.

    Returns:
        ``{"input_ids": (K, L) long, "attention_mask": (K, L) long}``.
    """
    tok = getattr(loaded_or_tokenizer, "tokenizer", loaded_or_tokenizer)
    enc = tok(list(prompts), padding=True, truncation=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


# --- what trains ------------------------------------------------------------------------------


def vision_trainable(model: nn.Module) -> bool:
    """Whether the image encoder trains; if not, its outputs can be cached."""
    return family_of(model).vision_trainable(model)


def text_trainable(model: nn.Module) -> bool:
    """Whether the prompt encoder trains; if not, prompt features can be computed once."""
    return family_of(model).text_trainable(model)


def set_gradient_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Recompute encoder activations in backward instead of storing them (the family's layers)."""
    family_of(model).set_gradient_checkpointing(model, enabled)


# --- the three stages ---------------------------------------------------------------------------


def encode_prompts(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Any:
    """Prompt features of K prompts ((K, D) for CLIPSeg); with gradients iff the text path trains."""
    grad = torch.is_grad_enabled() and text_trainable(model)
    with torch.set_grad_enabled(grad):
        return family_of(model).encode_prompts(model, input_ids, attention_mask)


def encode_images(model: nn.Module, pixel_values: Tensor) -> list[Tensor]:
    """The vision features the decoder reads, each (B, ...); with gradients iff the vision encoder trains."""
    grad = torch.is_grad_enabled() and vision_trainable(model)
    with torch.set_grad_enabled(grad):
        return family_of(model).encode_images(model, pixel_values)


def decode(model: nn.Module, activations: Sequence[Tensor], prompt_emb: Any, *, pairs: Tensor | None = None):
    """Logits for (image, prompt) pairs: (B, K, S, S), or (P, S, S) for ``pairs`` (P, 2) of
    (image index, prompt index)."""
    return family_of(model).decode(model, activations, prompt_emb, pairs=pairs)


def stack_features(model: nn.Module, features: Sequence[Tensor]) -> Tensor:
    """Vision features as one (B, ...) tensor: a feature-cache row per image."""
    return family_of(model).stack_features(features)


def unstack_features(model: nn.Module, stacked: Tensor) -> list[Tensor]:
    """The inverse of :func:`stack_features`."""
    return family_of(model).unstack_features(stacked)


def forward(
    model: nn.Module,
    pixel_values: Tensor | None = None,
    prompt_emb: Any = None,
    *,
    input_ids: Tensor | None = None,
    attention_mask: Tensor | None = None,
    activations: Sequence[Tensor] | None = None,
    pairs: Tensor | None = None,
) -> Tensor:
    """Images and prompts in, logits out: :func:`encode_images`, :func:`encode_prompts`, :func:`decode`.

    Args:
        pixel_values: (B, 3, S, S), or pass cached ``activations`` instead.
        prompt_emb: prompt features, or pass ``input_ids`` and ``attention_mask`` (K, L) instead.
        pairs: see :func:`decode`.

    Returns:
        (B, K, S, S) logits, or (P, S, S) with ``pairs``.

    Raises:
        ValueError: cached inputs given for an encoder that trains. They would silently bypass the
            trainable parameters: the very trap this module exists to avoid.
    """
    grad = torch.is_grad_enabled()
    if activations is None:
        if pixel_values is None:
            raise ValueError("pass pixel_values or precomputed activations")
        activations = encode_images(model, pixel_values)
    elif grad and vision_trainable(model) and not any(a.requires_grad for a in activations):
        raise ValueError("cached vision activations given, but the vision encoder trains; pass pixel_values")
    if prompt_emb is None:
        if input_ids is None:
            raise ValueError("pass prompt_emb or input_ids")
        prompt_emb = encode_prompts(model, input_ids, attention_mask)
    elif grad and text_trainable(model) and not any(t.requires_grad for t in prompt_tensors(prompt_emb)):
        raise ValueError("cached prompt embeddings given, but the text encoder trains; pass input_ids")
    return decode(model, activations, prompt_emb, pairs=pairs)


PROMPT_SEPARATION_STEPS = (
    64  # rounding steps (float32, at the features' scale) below which two prompts coincide
)


def prompt_separation(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> dict:
    """Whether K different prompts get different features: the check behind "every organ prompt
    conditions its own mask".

    With a text config whose end-of-text id the tokenizer never emits, CLIP pools the first token
    (BOS) and every prompt embeds alike (see
    :func:`clipseg_bench.model.families.clipseg.use_tokenizer_ids`); nothing else fails.

    Args:
        model: any family's model.
        input_ids, attention_mask: (K, L) tokenized prompts, K >= 2, all different texts.

    Returns:
        ``{"prompts": K, "separation": min over pairs i < j of max |f_i - f_j| (over every
        element of the family's prompt features, each (K, ...)), "scale": max |f|, "tolerance",
        "distinct": separation > tolerance}``. The tolerance is :data:`PROMPT_SEPARATION_STEPS`
        float32 steps at the scale: what a reordered reduction could make of identical rows,
        while different prompts differ by a sizeable share of the scale.
    """
    with torch.no_grad():
        feats = [
            f.detach().float().flatten(1)
            for f in prompt_tensors(encode_prompts(model, input_ids, attention_mask))
        ]
    k = feats[0].shape[0]
    dist = torch.stack([(f[:, None] - f[None]).abs().amax(-1) for f in feats]).amax(0)  # (K, K)
    separation = float(dist[~torch.eye(k, dtype=torch.bool, device=dist.device)].min())
    scale = max(float(f.abs().max()) for f in feats)
    tolerance = PROMPT_SEPARATION_STEPS * torch.finfo(torch.float32).eps * scale
    return {
        "prompts": k,
        "separation": separation,
        "scale": scale,
        "tolerance": tolerance,
        "distinct": separation > tolerance,
    }
