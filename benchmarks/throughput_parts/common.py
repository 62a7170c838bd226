"""What every measurement shares: the random models and their prompts, the phantom dataset, timing
side by side, and the table's rows."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

# --- timing ----------------------------------------------------------------------------------


def time_once(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_side_by_side(
    fns: dict[str, Callable[[], object]], *, reps: int, warmup: dict[str, Callable[[], object]] | None = None
) -> dict[str, list[float]]:
    """Wall times of several functions, interleaved so that load changes hit all of them alike.

    Args:
        fns: name -> function to time (it must do the whole unit of work, synchronously on CPU).
        reps: timed calls of each.
        warmup: functions called once, untimed, before; default: each of ``fns`` once.

    Returns:
        name -> list of ``reps`` wall times in seconds.
    """
    for fn in (fns if warmup is None else warmup).values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(time_once(fn))
    return times


# --- the model and the data ------------------------------------------------------------------


@dataclass
class Arch:
    """A randomly initialised CLIPSeg with its tokenizer and the 13 organ prompts, tokenized."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    size: int
    mean: tuple
    std: tuple
    tokens: dict[str, torch.Tensor]


def build_arch(name: str) -> Arch:
    """``real``: the architecture of CIDAS/clipseg-rd64-refined (150.7M parameters) at its 352 px
    input, its text config pooling at the tiny tokenizer's end-of-text token; ``tiny``: the project's
    tiny model at 128 px. Both random, same weights in every process."""
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from clipseg_bench.model.families.clipseg import build_tiny, reference_config
    from clipseg_bench.model.forward import tokenize
    from clipseg_bench.model.tokenizer import build_tiny_tokenizer
    from clipseg_bench.organs import prompts

    tokenizer = build_tiny_tokenizer()
    if name == "real":
        # 352: the rd64-refined image processor's side
        model, size = build_tiny(reference_config(tokenizer=tokenizer)), 352
    elif name == "tiny":
        model, size = build_tiny(), 128
    else:
        raise ValueError(f"unknown architecture {name!r}")
    tokens = tokenize(tokenizer, prompts("name"))
    return Arch(name, model, tokenizer, size, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, tokens)


def check_prompts(arch: Arch) -> dict:
    """The 13 organ prompts must get 13 different embeddings
    (:func:`~clipseg_bench.model.forward.prompt_separation`); the check's record.

    Raises:
        RunFailed: two prompts embed alike (e.g. a text config pooling at an end-of-text id the
            tokenizer never emits): every mask would then be conditioned on the same prompt.
    """
    from clipseg_bench.errors import RunFailed
    from clipseg_bench.model.forward import prompt_separation

    check = prompt_separation(arch.model, arch.tokens["input_ids"], arch.tokens["attention_mask"])
    if not check["distinct"]:
        raise RunFailed(
            None,
            f"{arch.name} architecture: the {check['prompts']} organ prompts embed alike (the closest two "
            f"differ by {check['separation']:.3g}); its text config must pool at the tokenizer's end-of-text id",
        )
    return check


def with_strategy(arch: Arch, strategy: str) -> Arch:
    """A copy of ``arch`` whose model has ``strategy`` applied (adapters and LoRA inject modules)."""
    from clipseg_bench.strategies import apply_strategy

    model = copy.deepcopy(arch.model)
    apply_strategy(model, strategy)
    return replace(arch, model=model)


def make_prepared(root: Path, *, size: int = 256) -> Path:
    """A small PREPARED folder from two phantom CTs (one train, one val case) in ``root``.

    256 px is the largest phantom side; real CT slices (512 px) cost the loader a little more to resize.
    """
    from clipseg_bench.data.phantom import write_phantoms
    from clipseg_bench.data.prepare import prepare

    write_phantoms(root / "phantoms", cases=2, seed=0, style="A", size=size)
    return prepare(
        images=root / "phantoms" / "images",
        labels=root / "phantoms" / "labels",
        out=root / "prepared",
        val_fraction=0.5,
        seed=0,
        png=False,
    )


def row(
    arch: str,
    strategy: str,
    mode: str,
    masks: int | None,
    seconds: float,
    *,
    ratio: float | None = None,
    note: str = "",
) -> dict:
    """One table row: ``masks`` (slice, organ) masks took ``seconds`` (one step, or one volume)."""
    rate = masks / seconds if masks and seconds > 0 else None
    return {
        "arch": arch,
        "strategy": strategy,
        "mode": mode,
        "masks": masks,
        "time_s": seconds,
        "masks_per_s": rate,
        "ratio": ratio,
        "note": note,
    }
