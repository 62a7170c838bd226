"""Decoder only: CLIP stays frozen; only CLIPSeg's 1.1M-parameter decoder trains."""

from __future__ import annotations

from torch import nn

from clipseg_bench.strategies.base import Strategy, register, train_decoder


@register
class DecoderOnly(Strategy):
    name = "decoder"
    description = (
        "Decoder only: CLIP's encoders stay frozen (their outputs can be cached); the decoder trains."
    )
    # CLIPSeg's own decoder was trained with 1e-3 (Lüddecke & Ecker 2022).
    lr = 1e-3
    demo_lr = 1e-3
    tuned_rate = "decoder_lr"  # it trains the decoder alone: its rate is the decoder's
    order = 2
    color = "#ff7f0e"

    def apply(self, model: nn.Module, options) -> None:
        train_decoder(model)
