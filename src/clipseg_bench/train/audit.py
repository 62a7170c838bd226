"""The gradient audit of every run: did autograd reach what the run trains, and did nothing frozen move?

CLIPSeg's stock forward runs its encoders under ``no_grad``, so a fine-tuning run can "train" an
encoder, its adapters or its LoRA while autograd never reaches them and the optimizer steps nothing.
This module makes every run prove the opposite:

- after the first backward of a process, each trainable tensor must have a gradient
  (``grad is not None``; a gradient of zeros, like LoRA's A while B is still zero, counts as reached),
  else the run stops with :class:`~clipseg_bench.errors.GradientAuditError` naming the tensors;
- at the end, every frozen tensor must hold the bytes it held at the start.

Counts are kept per part of the model, and written to run.json as ``gradient_audit``. Parts come
from parameter names: ``vision_encoder``, ``text_encoder``, ``decoder`` (by the modules
:mod:`clipseg_bench.model.families` names), ``other`` for the rest of CLIP, and, for tensors a strategy
inserted, the name of the inserted module (``adapter``, ``lora`` from ``lora_A``/``lora_B``...),
found by comparing the names with those of the stock architecture, never by strategy name.
No library audits gradients like this (PEFT prints trainable counts only), so it is our own code.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from clipseg_bench.errors import GradientAuditError
from clipseg_bench.model.families import family_of

NAMED_IN_MESSAGE = 5  # unreached or changed tensors named in the error; the rest are counted


def _stock_names(model: nn.Module) -> set[str]:
    """Module and parameter names of the stock architecture (built on the meta device: no memory)."""
    with torch.device("meta"):
        stock = type(model)(model.config)
    return {n for n, _ in stock.named_modules()} | {n for n, _ in stock.named_parameters()}


def _inserted_part(name: str, stock: set[str]) -> str | None:
    """The part of a tensor a strategy inserted, or None for a tensor of the stock architecture.

    Walks the name's components along the stock tree. A component the stock model lacks at that
    place is either a wrapper around a stock module (what follows it continues the stock path:
    peft's ``base_layer``, an adapter's ``sublayer``) and is skipped, or the root of an inserted
    module, whose leading word names the part (``lora_A`` -> ``lora``, ``adapter`` -> ``adapter``).
    """
    comps = name.split(".")
    path: list[str] = []
    for i, comp in enumerate(comps):
        if ".".join([*path, comp]) in stock:
            path.append(comp)
            continue
        if i + 1 < len(comps) and ".".join([*path, comps[i + 1]]) in stock:
            continue  # a wrapper: its contents are the stock module's
        word = re.match(r"[A-Za-z]+", comp)
        return word.group(0).lower() if word else comp
    return None


def parameter_parts(model: nn.Module) -> dict[str, str]:
    """Parameter name -> part (see the module docstring), for every parameter of the model."""
    stock = _stock_names(model)
    owners = {}
    for part, modules in family_of(model).parts(model).items():
        owners.update({id(p): part for m in modules for p in m.parameters()})
    return {
        name: _inserted_part(name, stock) or owners.get(id(p), "other")
        for name, p in model.named_parameters()
    }


def _fingerprint(t: torch.Tensor) -> bytes:
    """A hash of a tensor's bytes: equal iff unchanged (up to a 2^-128 collision)."""
    data = t.detach().to("cpu").contiguous().reshape(-1)  # 1-D: a 0-d tensor cannot be viewed as bytes
    return hashlib.blake2b(data.view(torch.uint8).numpy(), digest_size=16).digest()


@dataclass
class GradientAudit:
    """The audit of one run (one process): see the module docstring.

    Attributes:
        parts: parameter name -> part.
        trainable: names of the parameters that require grad, in model order.
        frozen: fingerprints of the frozen parameters when the audit started.
        reached: names of the trainable parameters that had a gradient after the first backward;
            None until that check ran (zero-shot never runs it).
        frozen_changed, frozen_checked: names of the frozen parameters found changed, and how many
            were compared, by :meth:`check_frozen` (a released tensor, on the meta device, is not).
    """

    parts: dict[str, str]
    trainable: list[str]
    frozen: dict[str, bytes]
    reached: set[str] | None = None
    frozen_changed: list[str] = field(default_factory=list)
    frozen_checked: int | None = None

    @classmethod
    def start(cls, model: nn.Module) -> GradientAudit:
        """Take the parts, the trainable names and the frozen fingerprints of ``model`` now."""
        params = dict(model.named_parameters())
        trainable = [n for n, p in params.items() if p.requires_grad]
        return cls(
            parts=parameter_parts(model),
            trainable=trainable,
            frozen={n: _fingerprint(p) for n, p in params.items() if not p.requires_grad},
            reached=None if trainable else set(),  # nothing trains (zero-shot): nothing to reach
        )

    @property
    def reach_checked(self) -> bool:
        return self.reached is not None

    def check_reached(self, model: nn.Module) -> None:
        """After the first backward: every trainable tensor must have a gradient.

        Raises:
            GradientAuditError: naming the first unreached tensors (the run then ends ``failed``).
        """
        params = dict(model.named_parameters())
        self.reached = {n for n in self.trainable if params[n].grad is not None}
        missing = [n for n in self.trainable if n not in self.reached]
        if missing:
            raise GradientAuditError(
                f"{len(missing)} of {len(self.trainable)} trainable tensors got no gradient in the first "
                f"step, so training would never change them: {_listed(missing)}"
            )

    def check_frozen(self, model: nn.Module) -> None:
        """At the end: every frozen tensor must be unchanged.

        Raises:
            GradientAuditError: naming the first changed tensors.
        """
        params = dict(model.named_parameters())
        live = {n: params[n] for n in self.frozen if params[n].device.type != "meta"}
        self.frozen_checked = len(live)
        self.frozen_changed = [n for n, p in live.items() if _fingerprint(p) != self.frozen[n]]
        if self.frozen_changed:
            raise GradientAuditError(
                f"{len(self.frozen_changed)} frozen tensors changed during training: "
                f"{_listed(self.frozen_changed)}"
            )

    def record(self) -> dict:
        """run.json's ``gradient_audit``: per part, ``trainable``, ``reached``, ``frozen`` and
        ``frozen_changed`` tensor counts; ``reached`` is null until the first backward was checked,
        ``frozen_changed`` until the end."""
        count = Counter(self.parts[n] for n in self.trainable)
        reached = Counter(self.parts[n] for n in self.reached or ())
        frozen = Counter(self.parts[n] for n in self.frozen)
        changed = Counter(self.parts[n] for n in self.frozen_changed)
        return {
            part: {
                "trainable": count[part],
                "reached": reached[part] if self.reach_checked else None,
                "frozen": frozen[part],
                "frozen_changed": changed[part] if self.frozen_checked is not None else None,
            }
            for part in dict.fromkeys(self.parts.values())
        }


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:NAMED_IN_MESSAGE])
    return shown + (f" and {len(names) - NAMED_IN_MESSAGE} more" if len(names) > NAMED_IN_MESSAGE else "")
