"""Model families, one module each, found automatically (like strategies).

A family (:class:`~clipseg_bench.model.families.base.ModelFamily`) is the only code that knows one
Hugging Face model's internals. :func:`family_of` gives the family of a built model (by its config's
``model_type``), :func:`family_for_spec` the family a ``--model`` value names.
"""

from __future__ import annotations

import importlib
import pkgutil

from torch import nn

from clipseg_bench.errors import InputError
from clipseg_bench.model.families.base import ModelFamily, Parts

__all__ = ["ModelFamily", "Parts", "available_families", "family", "family_of", "register_family"]

_FAMILIES: dict[str, ModelFamily] = {}
_BY_TYPE: dict[str, ModelFamily] = {}  # model_type -> family, filled on registration
_discovered = False


def register_family(cls: type[ModelFamily]) -> type[ModelFamily]:
    """Class decorator: make a model family available under ``cls.name``."""
    for attr in ("name", "model_types", "tiny_spec"):
        if getattr(cls, attr, None) is None:
            raise TypeError(f"model family {cls.__qualname__} needs a class attribute {attr!r}")
    instance = cls()
    _FAMILIES[cls.name] = instance
    _BY_TYPE.update(dict.fromkeys(cls.model_types, instance))
    return cls


def _discover() -> None:
    # Once per process: family_of runs at every forward stage, and a folder scan each time would show.
    global _discovered
    if _discovered:
        return
    _discovered = True
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def available_families() -> list[str]:
    """Names of all registered model families, sorted."""
    _discover()
    return sorted(_FAMILIES)


def family(name: str) -> ModelFamily:
    """The family registered as ``name``."""
    _discover()
    if name not in _FAMILIES:
        raise InputError("model", f"unknown model family {name!r}; available: {', '.join(sorted(_FAMILIES))}")
    return _FAMILIES[name]


def family_for_type(model_type: str | None, *, spec: str = "") -> ModelFamily:
    """The family that loads Hugging Face ``model_type``.

    Raises:
        InputError: no family loads it (naming ``spec``, the model the user gave).
    """
    _discover()
    if model_type in _BY_TYPE:
        return _BY_TYPE[model_type]
    known = ", ".join(t for f in _FAMILIES.values() for t in f.model_types)
    raise InputError(spec or "model", f"is a {model_type!r} model; this tool runs {known}")


def family_of(model: nn.Module) -> ModelFamily:
    """The family of a built model (its config's ``model_type``)."""
    config = getattr(model, "config", None)
    return family_for_type(getattr(config, "model_type", None), spec=type(model).__name__)


def tiny_family(spec: str) -> ModelFamily | None:
    """The family whose tiny spec ``spec`` is (``tiny``: CLIPSeg, ``sam3-tiny``...), else None."""
    _discover()
    return next((f for f in _FAMILIES.values() if f.tiny_spec == spec), None)
