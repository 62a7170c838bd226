"""What a model family is: the one object that knows a text-prompted segmenter's Hugging Face internals.

Everything else in the package (strategies, the trainer, the gradient audit, the feature cache,
evaluation, segment, the benchmark scripts) speaks to a model through its family:

- **loading**: ``load(spec, image_size)`` for the family's tiny spec, a local folder or a hub id,
  ``reference_config()`` (the real checkpoint's architecture, for random-weight benchmarks and
  parameter counts), ``save``;
- **the forward in three stages**: ``encode_images`` (pixel values -> the vision features the
  decoder reads, a list of (B, ...) tensors), ``encode_prompts`` (tokens -> prompt features),
  ``decode`` (vision features x prompt features -> one logit map per (image, prompt) at the input
  side S); a stage whose parameters are all frozen runs without gradients, so its output can be
  computed once (prompts) or cached on disk (vision features, ``stack_features``/``unstack_features``);
- **named parts**: ``parts(model)`` gives the vision encoder, the text encoder and the decoder as
  module lists, ``encoder_layers`` the transformer layers a strategy may adapt, ``unused_parameters``
  what a text-prompted forward never reads. Strategies, the audit and the parameter counts use these
  names, never attribute paths.

A family registers itself with ``@register_family`` in a module of ``model/families/``; adding a
model family is one new file there (see docs/architecture.md).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


@dataclass
class Parts:
    """The named parts of a model, as the modules that hold their parameters.

    Attributes:
        vision: the image encoder (what ``encode_images`` runs).
        text: the prompt encoder (what ``encode_prompts`` runs), projections included.
        decoder: what ``decode`` runs: the part every fine-tuning strategy trains.
    """

    vision: list[nn.Module] = field(default_factory=list)
    text: list[nn.Module] = field(default_factory=list)
    decoder: list[nn.Module] = field(default_factory=list)

    def items(self) -> list[tuple[str, list[nn.Module]]]:
        """(audit name, modules) per part: ``vision_encoder``, ``text_encoder``, ``decoder``."""
        return [("vision_encoder", self.vision), ("text_encoder", self.text), ("decoder", self.decoder)]


def parameters_of(modules: Sequence[nn.Module]) -> list[nn.Parameter]:
    """The parameters of ``modules``, each shared tensor once, in module order."""
    seen: dict[int, nn.Parameter] = {}
    for m in modules:
        for p in m.parameters():
            seen.setdefault(id(p), p)
    return list(seen.values())


def weights_hash(named: Sequence[tuple[str, Tensor]], extra: Any) -> str:
    """A hash of named tensors (each name and its bytes, in the given order) and of ``extra`` (as JSON):
    what a feature cache's key holds of the model."""
    h = hashlib.blake2b(digest_size=12)
    for name, t in named:
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    h.update(json.dumps(extra).encode())
    return h.hexdigest()


def any_trainable(modules: Sequence[nn.Module]) -> bool:
    """True if any parameter of ``modules`` requires grad."""
    return any(p.requires_grad for m in modules for p in m.parameters())


class ModelFamily:
    """Base class of a model family. Subclasses set the class attributes and implement the methods.

    Attributes:
        name: the family's name (run.json ``model_family``, report column ``model``).
        model_types: the Hugging Face ``config.model_type`` values the family loads.
        tiny_spec: the ``--model`` value that builds the family's tiny random model offline.
        linears: names of the Linear layers inside an encoder layer (LoRA's possible targets).
        lora_targets: the default LoRA targets, a subset of ``linears``.
        positions: adapter positions -> the attribute of an encoder layer holding that sublayer.
    """

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    tiny_spec: ClassVar[str]
    linears: ClassVar[tuple[str, ...]] = ()
    lora_targets: ClassVar[tuple[str, ...]] = ()
    positions: ClassVar[dict[str, str]] = {}

    # --- loading --------------------------------------------------------------------------------

    def load(self, spec: str, *, image_size: int | None = None):
        """A :class:`~clipseg_bench.model.load.LoadedModel` for ``spec`` (the tiny spec, a folder, a hub id)."""
        raise NotImplementedError

    def reference_config(self, *, tokenizer: Any = None) -> Any:
        """The real checkpoint's architecture (random weights, no download); with ``tokenizer``, its
        special-token ids (a random model fed another tokenizer than the checkpoint's must pool at
        that tokenizer's end-of-text token)."""
        raise NotImplementedError

    def build(self, config: Any, *, seed: int = 0) -> nn.Module:
        """A randomly initialised model of ``config``, the same for the same seed in every process."""
        raise NotImplementedError

    def save(self, loaded, folder) -> None:
        """Save a base model so that ``load(folder)`` gives it back."""
        raise NotImplementedError

    def patch_size(self, model: nn.Module) -> int:
        """The input side must be a multiple of this."""
        raise NotImplementedError

    # --- named parts ---------------------------------------------------------------------------

    def parts(self, model: nn.Module) -> Parts:
        raise NotImplementedError

    def encoder_layers(self, model: nn.Module, encoder: str) -> list[nn.Module]:
        """The transformer layers of ``encoder`` (``vision`` or ``text``) a text-prompted forward runs."""
        raise NotImplementedError

    def layer_width(self, layer: nn.Module) -> int:
        """The feature width of an encoder layer's residual stream (what an adapter adapts)."""
        raise NotImplementedError

    def sublayer(self, encoder: str, position: str) -> str:
        """The attribute of an ``encoder`` (``vision``/``text``) layer that holds the sublayer at adapter
        ``position`` (``attention``/``mlp``); :attr:`positions` unless the encoders name them differently."""
        return self.positions[position]

    def unused_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """Parameters a text-prompted segmentation forward never reads (never trained, never counted)."""
        return []

    def set_gradient_checkpointing(self, model: nn.Module, enabled: bool) -> None:
        """Recompute encoder layer activations in backward instead of storing them (saves memory).

        Acts on the :meth:`encoder_layers` (transformers' ``GradientCheckpointingLayer``), and only
        when they run with gradients in training mode; a frozen encoder runs under ``no_grad`` and
        stores nothing anyway. Non-reentrant checkpointing, which also works when the layer input
        does not require grad (frozen embeddings, adapters or LoRA inside the layer).
        """
        fn = functools.partial(checkpoint, use_reentrant=False)
        for layer in self.encoder_layers(model, "vision") + self.encoder_layers(model, "text"):
            layer.gradient_checkpointing = enabled
            layer._gradient_checkpointing_func = fn

    def vision_trainable(self, model: nn.Module) -> bool:
        """Whether the image encoder trains; if not, its features can be cached."""
        return any_trainable(self.parts(model).vision)

    def text_trainable(self, model: nn.Module) -> bool:
        """Whether the prompt encoder trains; if not, prompt features can be computed once."""
        return any_trainable(self.parts(model).text)

    def vision_fingerprint(self, model: nn.Module) -> str:
        """A hash of everything the cached vision features depend on in the model."""
        named = [
            (f"{i}.{n}", t)
            for i, m in enumerate(self.parts(model).vision)
            for n, t in sorted(m.state_dict().items())
        ]
        return weights_hash(named, self.name)

    def release_vision(self, model: nn.Module) -> None:
        """Drop the image encoder's weights (to the meta device) once its outputs are cached."""
        for module in self.parts(model).vision:
            module.to("meta")

    # --- the forward -----------------------------------------------------------------------------

    def encode_images(self, model: nn.Module, pixel_values: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def encode_prompts(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Any:
        raise NotImplementedError

    def decode(self, model: nn.Module, features: Sequence[Tensor], prompts: Any, *, pairs=None) -> Tensor:
        raise NotImplementedError

    def stack_features(self, features: Sequence[Tensor]) -> Tensor:
        """Vision features -> one (B, ...) tensor, the layout the feature cache stores a row in."""
        return torch.stack(list(features), dim=1)

    def unstack_features(self, stacked: Tensor) -> list[Tensor]:
        """The inverse of :meth:`stack_features`."""
        return list(stacked.unbind(1))

    def stock_logits(self, model: nn.Module, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor):
        """The library's own forward on every (image, prompt) pair, (B, K, S', S'): what ours must equal."""
        raise NotImplementedError


def prompt_tensors(prompts: Any) -> list[Tensor]:
    """The tensors of prompt features, whatever container a family returns them in."""
    if isinstance(prompts, Tensor):
        return [prompts]
    if isinstance(prompts, (tuple, list)):
        return [t for p in prompts for t in prompt_tensors(p)]
    if isinstance(prompts, dict):
        return [t for p in prompts.values() for t in prompt_tensors(p)]
    return []


def pair_indices(batch: int, prompts: int, pairs: Tensor | None, device) -> tuple[Tensor, Tensor]:
    """(image index, prompt index) per decoded mask: every combination image-major, or ``pairs``."""
    if pairs is None:  # every image with every prompt, image-major: row b*K + k
        return (
            torch.arange(batch, device=device).repeat_interleave(prompts),
            torch.arange(prompts, device=device).repeat(batch),
        )
    pairs = pairs.to(device=device, dtype=torch.long)
    if pairs.ndim != 2 or pairs.shape[1] != 2:
        raise ValueError(f"pairs must be (P, 2) (image index, prompt index), got {tuple(pairs.shape)}")
    return pairs[:, 0], pairs[:, 1]
