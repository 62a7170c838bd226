"""The strategy registry: a strategy is a small class that unfreezes or injects, registered by name.

:func:`clipseg_bench.strategies.apply_strategy` does the common part: freeze everything, let the
strategy unfreeze or inject, then freeze again what the forward never reads. The trainer and the
evaluation only see the resulting ``requires_grad`` flags, never a strategy's name.

A strategy's options are a dataclass whose fields carry their help text (PEFT style): unknown
options and bad values become an :class:`~clipseg_bench.errors.InputError`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from clipseg_bench.errors import InputError

_REGISTRY: dict[str, type[Strategy]] = {}


@dataclass(frozen=True)
class ParamCounts:
    """Trainable and total parameters of a model after a strategy (injected modules included)."""

    trainable: int
    total: int


@dataclass
class NoOptions:
    """This strategy has no options."""


class Strategy:
    """Base class of a fine-tuning strategy: what it trains and its defaults, in one file.

    Subclasses set:
        name: the registered name (``--strategy``).
        description: one sentence, used in the README, ``strategies`` and the report.
        lr: the default peak learning rate for a pretrained checkpoint (the real study's).
        demo_lr: the rate of the demo's tiny model (pretrained on phantoms, fine-tuned on another
            style): a 250k-parameter model trained for a few dozen steps wants far higher rates.
        tuned_rate: the TrainConfig field ``benchmark --lr-sweep`` varies: ``lr`` (the strategy's
            own trainables), ``decoder_lr`` when the decoder is all it trains, None when nothing trains.
        order: where the strategy appears in every table and plot (lower first).
        color: its colour in every plot (a matplotlib colour); None takes the next free one.
        Options: optionally a dataclass of options; each field's ``metadata["help"]`` documents it,
            and ``__post_init__`` may raise ``ValueError`` for bad values.
    and implement :meth:`apply`.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    lr: ClassVar[float]
    demo_lr: ClassVar[float | None] = None
    tuned_rate: ClassVar[str | None] = "lr"
    order: ClassVar[float] = float("inf")
    color: ClassVar[str | None] = None
    Options: ClassVar[type] = NoOptions

    def parse_options(self, options: dict[str, Any] | None) -> Any:
        """Validate ``options`` (from ``TrainConfig.strategy_options``) into an ``Options`` instance."""
        options = dict(options or {})
        known = [f.name for f in dataclasses.fields(self.Options)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            hint = f"known: {', '.join(known)}" if known else "it takes no options"
            raise InputError(
                "strategy_options", f"unknown option {unknown[0]!r} for strategy {self.name}; {hint}"
            )
        try:
            return self.Options(**options)
        except (TypeError, ValueError) as exc:
            raise InputError("strategy_options", f"strategy {self.name}: {exc}") from None

    def apply(self, model: nn.Module, options: Any) -> None:
        """Unfreeze parameters and/or inject modules into ``model``, whose parameters are all frozen."""
        raise NotImplementedError


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make a strategy available under ``cls.name``."""
    for attr in ("name", "description"):
        if not isinstance(getattr(cls, attr, None), str):
            raise TypeError(f"strategy {cls.__qualname__} needs a class attribute {attr!r} (str)")
    lr = getattr(cls, "lr", None)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise TypeError(f"strategy {cls.__qualname__} needs a default learning rate 'lr' (a number > 0)")
    other = _REGISTRY.get(cls.name)
    if other is not None and other.__qualname__ != cls.__qualname__:
        raise ValueError(f"strategy name {cls.name!r} is taken by {other.__module__}.{other.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def train_decoder(model: nn.Module) -> None:
    """Unfreeze the model's decoder (its family's ``decoder`` part): what every fine-tuning strategy trains."""
    from clipseg_bench.model.families import family_of

    for module in family_of(model).parts(model).decoder:
        module.requires_grad_(True)


def option_field(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with help text; lists and dicts as defaults are copied per instance."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(
            default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs
        )
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)
