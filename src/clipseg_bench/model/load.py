"""Load a CLIPSeg model with its tokenizer and preprocessing: a hub id, a local folder, or `tiny`.

``tiny`` is a randomly initialised CLIPSeg of the real architecture with small sizes, built with
the project's own tokenizer (:mod:`clipseg_bench.model.tokenizer`): it needs no network at all and
is the model every test and the demo use. Its weights come from a fixed seed, so ``tiny`` names
the same model in every process: a run that trained adapters on it can rebuild the frozen base.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor, PretrainedConfig
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

from clipseg_bench.errors import InputError
from clipseg_bench.model.tokenizer import BOS, EOS, MAX_LENGTH, build_tiny_tokenizer, tiny_vocab

TINY = "tiny"
TINY_SEED = 0  # the tiny model's weights; changing it changes what `--model tiny` means
REFERENCE_ID = "CIDAS/clipseg-rd64-refined"  # the checkpoint the real study uses


@dataclass
class LoadedModel:
    """A CLIPSeg model and everything needed to feed it.

    Attributes:
        model: the Hugging Face model (strategies may inject adapters or LoRA into it later).
        tokenizer: its ``CLIPTokenizer``.
        image_size: side (px) of the square input the model is fed.
        mean, std: per-channel normalisation of pixel values in [0, 1].
        spec: what the user passed as ``--model``.
    """

    model: CLIPSegForImageSegmentation
    tokenizer: Any
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    spec: str


@functools.lru_cache(maxsize=1)
def _tiny_token_ids() -> tuple[int, int, int]:
    vocab, _ = tiny_vocab()
    return len(vocab), vocab[BOS], vocab[EOS]


def tiny_config(
    *,
    image_size: int = 128,
    vision_layers: int = 4,
    extract_layers: tuple[int, ...] = (1, 2, 3),
    use_complex_transposed_convolution: bool = True,
) -> CLIPSegConfig:
    """The small CLIPSeg configuration that still learns (about 0.25M parameters).

    Vision: 64 wide, ``vision_layers`` layers, 4 heads, MLP 128, patch 16. Text: 32 wide, 2 layers,
    our tiny vocabulary, EOS pooling (``eos_token_id`` is not 2, so HF does not fall back to its
    legacy argmax pooling). Projection 32, ``reduce_dim`` 16, decoder MLP 64.

    Args:
        image_size: native input side (px) of the position embeddings; a multiple of 16.
        vision_layers: depth of the vision encoder (tests use 5 to have a layer the decoder never reads).
        extract_layers: 0-based vision layers whose outputs the decoder reads.
        use_complex_transposed_convolution: the rd64-refined upsampling head instead of one
            transposed convolution.
    """
    vocab_size, bos, eos = _tiny_token_ids()
    return CLIPSegConfig(
        vision_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=vision_layers,
            num_attention_heads=4,
            patch_size=16,
            image_size=image_size,
        ),
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=vocab_size,
            max_position_embeddings=MAX_LENGTH,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=eos,
        ),
        projection_dim=32,
        reduce_dim=16,
        extract_layers=list(extract_layers),
        decoder_intermediate_size=64,
        use_complex_transposed_convolution=use_complex_transposed_convolution,
    )


def reference_config() -> CLIPSegConfig:
    """The architecture of ``CIDAS/clipseg-rd64-refined`` (150.7M parameters), for random-weight
    benchmarks and parameter counts without a download."""
    return CLIPSegConfig(vision_config=dict(patch_size=16), use_complex_transposed_convolution=True)


def reset_decoder_init(model: CLIPSegForImageSegmentation) -> None:
    """Give the decoder PyTorch's default init.

    ``CLIPSegConfig`` has no ``initializer_range``, so HF draws the decoder's Linear and conv
    weights from N(0, 1): logits start with a std of about 47 and a model trained from scratch
    stalls at a liver Dice near 0.06. Only for randomly initialised models; a checkpoint brings its own weights.
    """
    for module in model.decoder.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            module.reset_parameters()


def build_tiny(config: CLIPSegConfig | None = None, *, seed: int = TINY_SEED) -> CLIPSegForImageSegmentation:
    """A randomly initialised CLIPSeg, the same for the same config and seed in every process.

    Args:
        config: defaults to :func:`tiny_config`.
        seed: seed of the weights; the global RNG is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPSegForImageSegmentation(config or tiny_config())
        reset_decoder_init(model)
    return model.eval()


def _check_size(image_size: int, patch: int, spec: str) -> int:
    if image_size < patch or image_size % patch:
        raise InputError(
            "--image-size",
            f"{image_size} px does not fit model {spec}: the side must be a multiple of {patch}",
        )
    return int(image_size)


def _looks_like_path(spec: str) -> bool:
    # A hub id is `name` or `org/name`; anything else the user typed is meant as a folder.
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec


def _model_source(spec: str) -> tuple[str, bool]:
    """(where to load ``spec`` from, whether it is a local folder), checked by reading its config only."""
    path = Path(spec).expanduser()
    local = path.exists() or _looks_like_path(spec)
    if local and not (path / "config.json").is_file():
        raise InputError(path, "not a model folder (expected config.json written by save_pretrained)")
    source = str(path) if local else spec
    try:
        model_type = PretrainedConfig.get_config_dict(source)[0].get("model_type")
    except (OSError, ValueError) as exc:
        _load_error(spec, source, local, exc)
    if model_type != "clipseg":
        raise InputError(spec, f"is a {model_type!r} model, not CLIPSeg")
    return source, local


def _load_error(spec: str, source: str, local: bool, exc: Exception):
    if local or not isinstance(exc, OSError):  # missing or broken files
        raise InputError(source, f"cannot load the model ({str(exc).splitlines()[0]})") from None
    raise InputError(  # no network (OSError)
        spec,
        f"cannot load this model: no such folder, and the Hugging Face hub gave nothing "
        f"({str(exc).splitlines()[0]}). Without network, download it elsewhere "
        f"(`hf download {spec} --local-dir DIR`), copy DIR here and pass --model DIR",
    ) from None


def check_model(spec: str) -> None:
    """Check that ``--model`` names a CLIPSeg we can load (``tiny``, a folder, a cached hub id),
    reading its config only, not its weights.

    Raises:
        InputError: as :func:`load_model` would.
    """
    if spec != TINY:
        _model_source(spec)


def _from_pretrained(spec: str) -> tuple[CLIPSegForImageSegmentation, CLIPSegProcessor]:
    source, local = _model_source(spec)
    try:
        model = CLIPSegForImageSegmentation.from_pretrained(source)
        processor = CLIPSegProcessor.from_pretrained(source)
    except (OSError, ValueError) as exc:
        _load_error(spec, source, local, exc)
    return model.eval(), processor


def _processor_size(image_processor) -> int:
    size = image_processor.size
    size = dict(size) if not isinstance(size, int) else {"height": size, "width": size}
    side = size.get("height") or size.get("shortest_edge")
    if side is None or size.get("width", side) != side:
        raise InputError(None, f"the model's image processor resizes to {size}, not to a square")
    return int(side)


def load_model(spec: str, *, image_size: int | None = None) -> LoadedModel:
    """Load ``--model``: ``tiny``, a local ``save_pretrained`` folder, or a Hugging Face hub id.

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
    if spec == TINY:
        loaded = LoadedModel(
            model=build_tiny(),
            tokenizer=build_tiny_tokenizer(),
            image_size=128,
            mean=tuple(IMAGENET_DEFAULT_MEAN),  # what the rd64 checkpoints' image processor uses
            std=tuple(IMAGENET_DEFAULT_STD),
            spec=spec,
        )
    else:
        model, processor = _from_pretrained(spec)
        ip = processor.image_processor
        loaded = LoadedModel(
            model=model,
            tokenizer=processor.tokenizer,
            image_size=_processor_size(ip),
            mean=tuple(float(x) for x in ip.image_mean),
            std=tuple(float(x) for x in ip.image_std),
            spec=spec,
        )
    patch = loaded.model.config.vision_config.patch_size
    loaded.image_size = _check_size(image_size or loaded.image_size, patch, spec)
    return loaded


def save_model(loaded: LoadedModel, folder: str | Path) -> None:
    """Save model, tokenizer and preprocessing so that ``load_model(folder)`` gives it back.

    For a base model (for example the demo's pretrained tiny model), not for one with injected
    adapters: fine-tuned runs save only their trained parameters (:mod:`.checkpoint`).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    loaded.model.save_pretrained(folder)
    image_processor = ViTImageProcessorPil(
        size={"height": loaded.image_size, "width": loaded.image_size},
        image_mean=list(loaded.mean),
        image_std=list(loaded.std),
    )
    CLIPSegProcessor(image_processor=image_processor, tokenizer=loaded.tokenizer).save_pretrained(folder)
