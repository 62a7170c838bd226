"""LoRA (Hu et al. 2022) on the encoders' attention projections, through the ``peft`` library.

Injected in place with ``peft.inject_adapter_in_model`` rather than wrapping the model in a
``PeftModel``: the model keeps its own class and module paths, so our forward still reaches the
model family's parts, and checkpoints name parameters the same way.

Targets are listed as full module names inside the encoder layers a text-prompted forward runs
(the model family's ``encoder_layers``), so LoRA can never land on a decoder's own
``q_proj``/``v_proj`` (a bare ``target_modules=["q_proj", "v_proj"]`` would: CLIPSeg's decoder and
SAM 3's DETR layers have them) or on vision layers the decoder never reads.

The option ``targets`` is checked twice: when the options are parsed, against the Linear names of
every model family (the model is not known yet), and when LoRA is applied, against the model's own
family (:attr:`~clipseg_bench.model.families.base.ModelFamily.linears`): each target must name a
Linear in at least one of the chosen encoders (SAM 3's ViT calls its attention output ``o_proj``,
its CLIP text encoder ``out_proj``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from clipseg_bench.errors import InputError
from clipseg_bench.model.families import available_families, family, family_of
from clipseg_bench.strategies.base import Strategy, option_field, register, train_decoder


def known_linears() -> tuple[str, ...]:
    """The Linear layer names of every model family's encoder layers, each once, in family order."""
    return tuple(dict.fromkeys(n for name in available_families() for n in family(name).linears))


LINEARS = known_linears()  # what `targets` may name before the model (hence its family) is known
ENCODERS = ("vision", "text")


@dataclass
class LoraOptions:
    rank: int = option_field(8, "LoRA rank r.")
    alpha: float = option_field(16.0, "LoRA alpha; the update is scaled by alpha / rank.")
    dropout: float = option_field(0.05, "Dropout on the LoRA branch input.")
    targets: list[str] = option_field(
        ["q_proj", "v_proj"], f"Linear layers to adapt, of {', '.join(LINEARS)}."
    )
    encoders: list[str] = option_field(["vision", "text"], "Encoders to adapt: vision and/or text.")
    train_decoder: bool = option_field(True, "Also train the decoder.")

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")
        if not 0 <= float(self.dropout) < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        for value, allowed, what in (
            (self.targets, LINEARS, "targets"),
            (self.encoders, ENCODERS, "encoders"),
        ):
            if not value or set(value) - set(allowed):
                raise ValueError(f"{what} must be a non-empty subset of {list(allowed)}, got {value!r}")


def target_names(model: nn.Module, options: LoraOptions) -> list[str]:
    """Full module names of the Linear layers LoRA adapts."""
    family = family_of(model)
    layers = [layer for enc in options.encoders for layer in family.encoder_layers(model, enc)]
    inside = {id(m) for layer in layers for m in layer.modules()}
    return [
        n for n, m in model.named_modules() if id(m) in inside and n.rsplit(".", 1)[-1] in options.targets
    ]


def checked_targets(model: nn.Module, options: LoraOptions) -> list[str]:
    """:func:`target_names`, after checking each target against the model's own family.

    Raises:
        InputError: a target that is not a Linear of this family's encoder layers, or that names
            none in the chosen encoders.
    """
    fam = family_of(model)
    foreign = [t for t in options.targets if t not in fam.linears]
    if foreign:
        raise InputError(
            "strategy_options",
            f"lora targets {foreign} are not Linear layers of a {fam.name} encoder layer "
            f"(it has {', '.join(fam.linears)})",
        )
    names = target_names(model, options)
    missing = [t for t in options.targets if not any(n.rsplit(".", 1)[-1] == t for n in names)]
    if missing:
        raise InputError(
            "strategy_options",
            f"lora target {missing[0]!r} is in none of the encoders {options.encoders} of this {fam.name} model",
        )
    return names


@register
class Lora(Strategy):
    name = "lora"
    description = "LoRA (via peft) on q and v of the CLIP vision and text attention, plus the decoder."
    # LoRA on attention: ~1e-4..3e-4 (Hu et al. 2022).
    lr = 2e-4
    demo_lr = 1e-3
    order = 4
    color = "#d62728"
    Options = LoraOptions

    def apply(self, model: nn.Module, options: LoraOptions) -> None:
        from peft import LoraConfig, inject_adapter_in_model  # heavy; only when LoRA is used

        config = LoraConfig(
            r=options.rank,
            lora_alpha=options.alpha,
            lora_dropout=float(options.dropout),
            target_modules=checked_targets(model, options),
            bias="none",
        )
        inject_adapter_in_model(config, model)  # in place; marks only the LoRA weights trainable
        if options.train_decoder:
            train_decoder(model)
