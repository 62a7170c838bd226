"""Load a text-prompted segmentation model with its tokenizer and preprocessing: ``--model``.

``--model`` is a family's tiny spec (``tiny`` for CLIPSeg), a local ``save_pretrained`` folder or a
Hugging Face hub id; the folder's or hub entry's ``config.json`` (``model_type``) picks the family
(:mod:`clipseg_bench.model.families`), which does the loading.
"""

from __future__ import annotations

import os
import socket
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from clipseg_bench.errors import FieldError, InputError
from clipseg_bench.model.families import family_for_type, tiny_family

HUB_PROBE_S = 3.0  # how long to wait for the hub to answer a connection before going offline
_hub = {"checked": False, "unreachable": None}  # per process: the hub is probed once


@dataclass
class LoadedModel:
    """A model and everything needed to feed it.

    Attributes:
        model: the Hugging Face model (strategies may inject adapters or LoRA into it later).
        tokenizer: its tokenizer.
        image_size: side (px) of the square input the model is fed.
        mean, std: per-channel normalisation of pixel values in [0, 1].
        spec: what the user passed as ``--model``.
        family: the model's :class:`~clipseg_bench.model.families.base.ModelFamily`.
    """

    model: Any
    tokenizer: Any
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    spec: str
    family: Any = None

    def __post_init__(self):
        if self.family is None:  # built by hand (benchmarks): the model's own family
            from clipseg_bench.model.families import family_of

            self.family = family_of(self.model)


def check_size(image_size: int, patch: int, spec: str) -> int:
    """``image_size`` if it is a positive multiple of ``patch``, else an InputError naming the field."""
    if image_size < patch or image_size % patch:
        raise FieldError(
            "image_size",
            f"{image_size} px does not fit model {spec}: the side must be a multiple of {patch}",
        )
    return int(image_size)


def processor_side(size) -> int:
    """The square side (px) an image processor's ``size`` resizes to.

    Args:
        size: the processor's ``size``: an int, or a dict with ``height``/``width`` or ``shortest_edge``.

    Raises:
        InputError: the processor does not resize to a square.
    """
    size = dict(size) if not isinstance(size, int) else {"height": size, "width": size}
    side = size.get("height") or size.get("shortest_edge")
    if side is None or size.get("width", side) != side:
        raise InputError(None, f"the model's image processor resizes to {size}, not to a square")
    return int(side)


def _looks_like_path(spec: str) -> bool:
    # A hub id is `name` or `org/name`; anything else the user typed is meant as a folder.
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec


def model_source(spec: str) -> tuple[str, bool, str | None]:
    """(where to load ``spec`` from, whether it is a local folder, its ``model_type``), read from
    its config only."""
    from transformers import PretrainedConfig

    path = Path(spec).expanduser()
    local = path.exists() or _looks_like_path(spec)
    if local and not (path / "config.json").is_file():
        raise InputError(path, "not a model folder (expected config.json written by save_pretrained)")
    source = str(path) if local else spec
    if not local:
        offline_unless_hub_reachable()
    try:
        model_type = PretrainedConfig.get_config_dict(source)[0].get("model_type")
    except (OSError, ValueError) as exc:
        load_error(spec, source, local, exc)
    return source, local, model_type


def offline_unless_hub_reachable() -> None:
    """Use only the local cache, as ``HF_HUB_OFFLINE=1`` would, when the hub cannot be reached.

    Without network, huggingface_hub retries each request with back-off (about 30 s and a dozen
    lines of retries for one model) before failing. One TCP connection to the hub (or to the
    HTTPS proxy the environment names), with a short timeout, tells first; if it fails, offline mode
    is switched on for this process and the ones it starts, so a cached model loads at once and an
    uncached one fails with one line (:func:`load_error`).
    """
    from huggingface_hub import constants

    if _hub["checked"] or constants.is_offline_mode():
        return
    _hub["checked"] = True
    endpoint = urlsplit(constants.ENDPOINT)
    proxy = urllib.request.getproxies().get(endpoint.scheme)
    if proxy and not urllib.request.proxy_bypass(endpoint.hostname or ""):
        endpoint = urlsplit(proxy if "//" in proxy else f"http://{proxy}")
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=HUB_PROBE_S).close()
    except OSError as exc:
        _hub["unreachable"] = f"{endpoint.hostname}:{port}: {exc.strerror or exc}"
        constants.HF_HUB_OFFLINE = True
        os.environ["HF_HUB_OFFLINE"] = "1"


def load_error(spec: str, source: str, local: bool, exc: Exception):
    """Raise the one-line InputError for a model that cannot be loaded (files or network)."""
    if local or not isinstance(exc, OSError):  # missing or broken files
        raise InputError(source, f"cannot load the model ({str(exc).splitlines()[0]})") from None
    why = (
        f"the Hugging Face hub cannot be reached ({_hub['unreachable']}) and it is not in the local cache"
        if _hub["unreachable"]
        else f"the Hugging Face hub gave nothing ({str(exc).splitlines()[0]})"
    )
    raise InputError(  # no network (OSError)
        spec,
        f"cannot load this model: no such folder, and {why}. Without network, download it elsewhere "
        f"(`hf download {spec} --local-dir DIR`), copy DIR here and pass --model DIR",
    ) from None


def model_family(spec: str):
    """The family ``--model`` names, reading configs only (never weights).

    Raises:
        InputError: a folder that is not a model, a hub id that cannot be reached, or a model of
            a type no family loads.
    """
    fam = tiny_family(spec)
    if fam is not None:
        return fam
    _, _, model_type = model_source(spec)
    return family_for_type(model_type, spec=spec)


def check_model(spec: str) -> None:
    """Check that ``--model`` names a model we can load (a tiny spec, a folder, a cached hub id),
    reading its config only, not its weights.

    Raises:
        InputError: as :func:`load_model` would.
    """
    model_family(spec)


def load_model(spec: str, *, image_size: int | None = None) -> LoadedModel:
    """Load ``--model``: a family's tiny spec, a local ``save_pretrained`` folder, or a hub id.

    Args:
        spec: ``tiny``, a folder, or a hub id such as ``CIDAS/clipseg-rd64-refined`` (must already be
            in the local cache when there is no network).
        image_size: square input side in px (a multiple of the patch size); None takes the model's
            own (128 for tiny, the image processor's 352 for CLIPSeg checkpoints). Other sizes work
            by interpolating the position embeddings, as CLIPSeg itself does at 352.

    Returns:
        The model in eval mode with its tokenizer and preprocessing.

    Raises:
        InputError: unknown folder, a hub id that cannot be reached, or a bad image size.
    """
    from safetensors import SafetensorError

    family = model_family(spec)
    try:
        return family.load(spec, image_size=image_size)
    except SafetensorError as exc:  # a truncated or corrupt model.safetensors
        raise InputError(
            spec,
            f"cannot load the model: a weights file is corrupt or truncated ({str(exc).splitlines()[0]}); "
            "download or save the model again",
        ) from None


def save_model(loaded: LoadedModel, folder: str | Path) -> None:
    """Save model, tokenizer and preprocessing so that ``load_model(folder)`` gives it back.

    For a base model (for example the demo's pretrained tiny model), not for one with injected
    adapters: fine-tuned runs save only their trained parameters (:mod:`.weights`).
    """
    loaded.family.save(loaded, folder)
