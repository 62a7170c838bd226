"""Fine-tuning strategies, one small module each, found automatically.

Every module in this package except ``base`` is imported on first use, and its ``@register``
classes become available by name, so adding a strategy means adding one file. Listed with their
parameter counts by ``clipseg-bench strategies --model M``.
"""

from __future__ import annotations

import copy
import importlib
import pkgutil
from typing import Any

from torch import nn

from clipseg_bench.errors import FieldError
from clipseg_bench.strategies.base import _REGISTRY, ParamCounts, Strategy, register

__all__ = [
    "ParamCounts",
    "Strategy",
    "apply_strategy",
    "available",
    "color",
    "count_parameters",
    "display_order",
    "get",
    "parameter_table",
    "register",
]


def _discover() -> None:
    # Scanning the package folder is cheap and import_module caches, so do it on every lookup:
    # a module added to the package is picked up without any list to edit.
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def available() -> list[str]:
    """Names of all registered strategies, sorted."""
    _discover()
    return sorted(_REGISTRY)


def display_order(names) -> list[str]:
    """Strategy names in the order tables and plots show them: registered strategies by their own
    ``order``, then names this install does not know (runs of another version), alphabetically.
    ``display_order(available())`` is the benchmark's default strategy list."""
    _discover()
    known = sorted((n for n in set(names) if n in _REGISTRY), key=lambda n: (_REGISTRY[n].order, n))
    return known + sorted(set(names) - set(_REGISTRY))


def color(name: str) -> str | None:
    """A registered strategy's plot colour (its file's ``color``), None for others."""
    _discover()
    cls = _REGISTRY.get(name)
    return cls.color if cls is not None else None


def get(name: str) -> Strategy:
    """The strategy registered as ``name``. Raises InputError for an unknown name."""
    _discover()
    if name not in _REGISTRY:
        raise FieldError("strategy", f"unknown strategy {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]()


def count_parameters(model: nn.Module) -> ParamCounts:
    """Trainable and total parameter counts (each shared tensor counted once)."""
    params = {id(p): p for p in model.parameters()}.values()
    return ParamCounts(
        trainable=sum(p.numel() for p in params if p.requires_grad),
        total=sum(p.numel() for p in params),
    )


def apply_strategy(model: nn.Module, name: str, options: dict[str, Any] | None = None) -> ParamCounts:
    """Freeze every parameter, apply strategy ``name``, then refreeze what the forward never reads.

    Args:
        model: a model of a registered family; changed in place (modules may be injected).
        name: a registered strategy.
        options: the strategy's options (``TrainConfig.strategy_options``); validated first.

    Returns:
        Trainable and total parameters afterwards (injected modules included).
    """
    from clipseg_bench.model.families import family_of

    strategy = get(name)
    opts = strategy.parse_options(options)
    was_training = model.training
    model.requires_grad_(False)
    strategy.apply(model, opts)
    model.train(was_training)  # injected modules are created in training mode (LoRA dropout would stay on)
    # Parameters outside the text-prompted forward (vision layers after the deepest one the decoder
    # reads, CLIP's projections and logit scale) could never get a gradient: never count them as trained.
    for p in family_of(model).unused_parameters(model):
        p.requires_grad_(False)
    return count_parameters(model)


def parameter_table(model_spec: str) -> list[dict]:
    """Parameter counts of every strategy (default options) on one model.

    Returns:
        ``[{"strategy", "trainable_params", "total_params"}]``, strategies sorted by name.
    """
    from clipseg_bench.model.load import load_model

    base = load_model(model_spec).model
    rows = []
    for name in available():
        counts = apply_strategy(copy.deepcopy(base), name)
        rows.append({"strategy": name, "trainable_params": counts.trainable, "total_params": counts.total})
    return rows
