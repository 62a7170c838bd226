"""Bottleneck adapters (Houlsby et al. 2019) inside the CLIP vision and text encoder layers.

Written here because no maintained library provides them for CLIPSeg: PEFT has no Houlsby-style
bottleneck adapter, and AdapterHub's ``adapters`` package lists CLIP among its supported models
but not CLIPSeg.

Each adapter is ``x + up(GELU(down(x)))`` with ``down``: width -> bottleneck and ``up``:
bottleneck -> width. ``up`` starts at zero, so an adapted model computes exactly what the base
model does until training moves it. Adapters sit after the attention block and after the MLP
block of each chosen layer, before the residual addition.

Options (``strategy_options``):
    bottleneck: adapter hidden width; default width // 12: 768 -> 64 -> 768 in the real vision encoder,
        512 -> 42 -> 512 in its text encoder, so the adapter stays small on the tiny model too.
    vision_layers: 0-based vision layers to adapt; default all the decoder reads (0..9 for rd64).
    text_layers: 0-based text layers to adapt; default all.
    positions: where in a layer: ``attention``, ``mlp`` or both (default both).
    train_decoder: also train the decoder (default true).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from clipseg_bench.errors import InputError
from clipseg_bench.model.families import family_of
from clipseg_bench.strategies.base import Strategy, option_field, register, train_decoder

POSITIONS = ("attention", "mlp")  # where in an encoder layer; the model family names the sublayers
REDUCTION = 12  # default width / bottleneck: 768 -> 64 in CLIP-B (Houlsby et al. tried sizes 8, 64 and 256)


class BottleneckAdapter(nn.Module):
    """``x + up(act(down(x)))``, the identity at initialisation (``up`` is zero).

    Args:
        width: feature width of the stream it adapts.
        bottleneck: hidden width.
    """

    def __init__(self, width: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(x)))


class Adapted(nn.Module):
    """Runs a sublayer, then an adapter on its output (the sublayer may return a tuple)."""

    def __init__(self, sublayer: nn.Module, adapter: BottleneckAdapter):
        super().__init__()
        self.sublayer = sublayer
        self.adapter = adapter

    def forward(self, *args, **kwargs):
        out = self.sublayer(*args, **kwargs)
        if isinstance(out, tuple):  # attention returns (hidden_states, attention_weights)
            return (self.adapter(out[0]), *out[1:])
        return self.adapter(out)


@dataclass
class AdapterOptions:
    bottleneck: int | None = option_field(
        None,
        f"Adapter hidden width; None: layer width // {REDUCTION} (768 -> 64 -> 768 in the real vision encoder).",
    )
    vision_layers: list[int] | None = option_field(
        None, "0-based vision layers to adapt; None: every layer the decoder reads; []: none."
    )
    text_layers: list[int] | None = option_field(None, "0-based text layers to adapt; None: all; []: none.")
    positions: list[str] = option_field(
        ["attention", "mlp"], "Adapters after `attention` and/or `mlp` blocks."
    )
    train_decoder: bool = option_field(True, "Also train the decoder.")

    def __post_init__(self):
        if self.bottleneck is not None and (not isinstance(self.bottleneck, int) or self.bottleneck < 1):
            raise ValueError(f"bottleneck must be a positive integer, got {self.bottleneck!r}")
        bad = sorted(set(self.positions) - set(POSITIONS))
        if bad or not self.positions:
            raise ValueError(
                f"positions must be a non-empty subset of {sorted(POSITIONS)}, got {self.positions!r}"
            )


def _chosen(layers: list[nn.Module], wanted: list[int] | None, encoder: str, usable: str) -> list[nn.Module]:
    if wanted is None:
        return layers
    bad = [i for i in wanted if not isinstance(i, int) or not 0 <= i < len(layers)]
    if bad:
        raise InputError("strategy_options", f"adapter {encoder}_layers {bad} out of range: {usable}")
    return [layers[i] for i in sorted(set(wanted))]


@register
class Adapter(Strategy):
    name = "adapter"
    description = (
        "Bottleneck adapters (zero-initialised, after attention and MLP) in the CLIP vision and text layers, "
        "plus the decoder."
    )
    # Freshly initialised bottlenecks train at ~1e-3 (Houlsby et al. 2019).
    lr = 1e-3
    demo_lr = 1e-3
    order = 3
    color = "#2ca02c"
    Options = AdapterOptions

    def apply(self, model: nn.Module, options: AdapterOptions) -> None:
        family = family_of(model)
        vision = family.encoder_layers(model, "vision")
        text = family.encoder_layers(model, "text")
        usable = f"the decoder reads layers 0..{len(vision) - 1}"
        vision = _chosen(vision, options.vision_layers, "vision", usable)
        text = _chosen(text, options.text_layers, "text", f"the text encoder has layers 0..{len(text) - 1}")
        # Vision layers first, then text, positions in the options' order: the adapters' random init
        # is drawn in this order, so it is part of what a seed means.
        for encoder, layers in (("vision", vision), ("text", text)):
            for layer in layers:
                for position in options.positions:
                    attr = family.sublayer(encoder, position)
                    width = family.layer_width(layer)
                    adapter = BottleneckAdapter(width, options.bottleneck or max(1, width // REDUCTION))
                    setattr(layer, attr, Adapted(getattr(layer, attr), adapter))  # new modules are trainable
        if options.train_decoder:
            train_decoder(model)
