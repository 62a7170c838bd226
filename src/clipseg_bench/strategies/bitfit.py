"""BitFit (Ben Zaken et al. 2022): only the bias terms of the encoders train, plus the decoder."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from clipseg_bench.model.families import family_of
from clipseg_bench.strategies.base import Strategy, option_field, register, train_decoder


@dataclass
class BitFitOptions:
    train_decoder: bool = option_field(
        True, "Also train the whole decoder (CLIPSeg's decoder starts untuned)."
    )


@register
class BitFit(Strategy):
    name = "bitfit"
    description = (
        "BitFit: every bias term of the CLIP encoders (attention, MLP, layer norms) plus the decoder train."
    )
    # Bias-only tuning wants ~1e-3 (BitFit: Ben Zaken et al. 2022).
    lr = 1e-3
    demo_lr = 1e-3
    order = 5
    color = "#9467bd"
    Options = BitFitOptions

    def apply(self, model: nn.Module, options: BitFitOptions) -> None:
        parts = family_of(model).parts(model)
        for part in [*parts.vision, *parts.text]:
            for name, p in part.named_parameters():
                if name.endswith("bias"):
                    p.requires_grad_(True)
        if options.train_decoder:
            train_decoder(model)
