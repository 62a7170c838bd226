"""Full fine-tuning: every parameter of the vision encoder, text encoder and decoder trains."""

from __future__ import annotations

from torch import nn

from clipseg_bench.strategies.base import Strategy, register


@register
class Full(Strategy):
    name = "full"
    description = "Full fine-tuning: all CLIP vision and text encoder weights and the decoder train."
    # Full fine-tuning of CLIP-sized encoders wants ~1e-5: larger rates wreck the pretrained features.
    lr = 1e-5
    demo_lr = 3e-4
    order = 1
    color = "#1f77b4"

    def apply(self, model: nn.Module, options) -> None:
        # apply_strategy refreezes the few parameters no text-prompted forward reads (vision layers
        # after the decoder's deepest tap, CLIP's contrastive projections), which get no gradient.
        model.requires_grad_(True)
