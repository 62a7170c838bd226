"""Decoder only: CLIP stays frozen; only CLIPSeg's 1.1M-parameter decoder trains."""

from __future__ import annotations

from torch import nn

from clipseg_bench.model.families import family_of
from clipseg_bench.strategies.base import Strategy, register


@register
class DecoderOnly(Strategy):
    name = "decoder"
    description = (
        "Decoder only: CLIP's encoders stay frozen (their outputs can be cached); the decoder trains."
    )

    def apply(self, model: nn.Module, options) -> None:
        for module in family_of(model).parts(model).decoder:
            module.requires_grad_(True)
