"""CLIPSeg (Lüddecke & Ecker, CVPR 2022): the only code that knows Hugging Face's CLIPSeg internals.

Why not ``CLIPSegForImageSegmentation.forward``: it runs both CLIP encoders under ``torch.no_grad()``,
so through it "full fine-tuning" trains only the decoder and adapters or LoRA inside the encoders never
get a gradient while the optimizer still "steps". Here (through :mod:`clipseg_bench.model.forward`):

- an encoder runs with gradients iff any of its parameters requires grad, else under ``no_grad``;
- each image is encoded once and decoded for K prompts (B images x K prompts -> B*K masks);
- the vision encoder stops at the deepest layer the decoder reads (``extract_layers``): with text
  prompts the later layers and the pooled output are wasted work;
- precomputed prompt embeddings and vision activations can be passed in, so frozen parts can be
  computed once and cached.

With the same weights the logits equal the stock forward's (tests check atol 1e-5).

``tiny`` is a randomly initialised CLIPSeg of the real architecture with small sizes, built with the
project's own tokenizer (:mod:`clipseg_bench.model.tokenizer`): it needs no network at all and is
the model every test and the demo use. Its weights come from a fixed seed, so ``tiny`` names the same
model in every process: a run that trained adapters on it can rebuild the frozen base.

Shapes: B images, K prompts, P (image, prompt) pairs, N = 1 + (side/patch)^2 vision tokens,
C vision width, D projection width, S input side in px.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from clipseg_bench.model.families import register_family
from clipseg_bench.model.families.base import ModelFamily, Parts, any_trainable, pair_indices, weights_hash
from clipseg_bench.model.ops import BlockedReluMLP, upsample_head

TINY = "tiny"
TINY_SEED = 0  # the tiny model's weights; changing it changes what `--model tiny` means
REFERENCE_ID = "CIDAS/clipseg-rd64-refined"  # the checkpoint the real study uses
# What the rd64 checkpoints' image processor uses (transformers' IMAGENET_DEFAULT_MEAN/STD).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --- configs and random models ------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _tiny_token_ids() -> tuple[int, int, int]:
    from clipseg_bench.model.tokenizer import BOS, EOS, tiny_vocab

    vocab, _ = tiny_vocab()
    return len(vocab), vocab[BOS], vocab[EOS]


def tiny_config(
    *,
    image_size: int = 128,
    vision_layers: int = 4,
    extract_layers: tuple[int, ...] = (1, 2, 3),
    use_complex_transposed_convolution: bool = True,
):
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
    from transformers import CLIPSegConfig

    from clipseg_bench.model.tokenizer import MAX_LENGTH

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


def reference_config(*, tokenizer=None):
    """The architecture of ``CIDAS/clipseg-rd64-refined`` (150.7M parameters), for random-weight
    benchmarks and parameter counts without a download.

    Args:
        tokenizer: the tokenizer the random model will be fed (e.g. the tiny one, since CLIP's BPE
            vocabulary would need a download); its special-token ids go into the text config
            (:func:`use_tokenizer_ids`). Without it the text config keeps CLIP's ids, which only
            CLIP's own tokenizer emits.

    Returns:
        A ``CLIPSegConfig``; the sizes (and the 49,408-token vocabulary) are the published ones either way.
    """
    from transformers import CLIPSegConfig

    config = CLIPSegConfig(vision_config=dict(patch_size=16), use_complex_transposed_convolution=True)
    if tokenizer is not None:
        use_tokenizer_ids(config.text_config, tokenizer)
    return config


def use_tokenizer_ids(text_config, tokenizer) -> None:
    """Give a CLIP text config the bos/eos/pad token ids of ``tokenizer``, in place.

    CLIP's text model pools the hidden state at the first ``eos_token_id`` of its config. With
    CLIP's id (49407) and a tokenizer whose end-of-text token has another id, no position matches,
    the first one (BOS) is pooled, and every prompt gets the same embedding: a random real-size
    model fed the tiny tokenizer's ids would look fine and condition every mask alike.

    Raises:
        ValueError: the tokenizer has ids beyond the config's vocabulary, or its EOS id is 2 (HF
            then falls back to the legacy pooling at the highest token id, not at EOS).
    """
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if len(tokenizer) > text_config.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens, the text config's vocabulary {text_config.vocab_size}"
        )
    if None in ids.values() or ids["eos_token_id"] == 2:
        raise ValueError(f"the tokenizer's special-token ids {ids} cannot drive CLIP's EOS pooling")
    for name, value in ids.items():
        setattr(text_config, name, value)


def reset_decoder_init(model) -> None:
    """Give the decoder PyTorch's default init.

    ``CLIPSegConfig`` has no ``initializer_range``, so HF draws the decoder's Linear and conv
    weights from N(0, 1): logits start with a std of about 47 and a model trained from scratch
    stalls at a liver Dice near 0.06. Only for randomly initialised models; a checkpoint brings its own weights.
    """
    for module in model.decoder.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            module.reset_parameters()


def build_tiny(config=None, *, seed: int = TINY_SEED):
    """A randomly initialised CLIPSeg, the same for the same config and seed in every process.

    Args:
        config: defaults to :func:`tiny_config`.
        seed: seed of the weights; the global RNG is left untouched.
    """
    from transformers import CLIPSegForImageSegmentation

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPSegForImageSegmentation(config or tiny_config())
        reset_decoder_init(model)
    return model.eval()


# --- loading a checkpoint --------------------------------------------------------------------------


def _from_pretrained(spec: str, source: str, local: bool):
    from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

    from clipseg_bench.model.load import load_error

    try:
        model = CLIPSegForImageSegmentation.from_pretrained(source)
        processor = CLIPSegProcessor.from_pretrained(source)
    except (OSError, ValueError) as exc:
        load_error(spec, source, local, exc)
    return model.eval(), processor


# --- the decoder's fast paths (CPU) ----------------------------------------------------------------


def _has_own_hooks(module: nn.Module) -> bool:
    """Forward hooks other than the output-capturing ones transformers installs on its first
    forward (they record outputs only inside HF's own forward, which this module replaces)."""
    hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
    return any(getattr(h, "__module__", "") != "transformers.utils.output_capturing" for h in hooks)


def blocked_mlp_applies(mlp: nn.Module, x: Tensor) -> bool:
    """The blocked MLP (:class:`~clipseg_bench.model.ops.BlockedReluMLP`) is a CPU path for HF's plain
    ``fc1 -> ReLU -> fc2`` MLP.

    On GPUs the caching allocator already makes the large temporaries cheap, and autocast would
    need the custom backward to replay it; wrapped layers (hooks, PEFT) keep HF's own forward.
    """
    fc1, fc2 = getattr(mlp, "fc1", None), getattr(mlp, "fc2", None)
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and isinstance(getattr(mlp, "activation_fn", None), nn.ReLU)
        and type(fc1) is nn.Linear
        and type(fc2) is nn.Linear
        and fc1.bias is not None
        and fc2.bias is not None
        and not _has_own_hooks(mlp)
    )


def decoder_mlp(mlp: nn.Module, x: Tensor) -> Tensor:
    """``mlp(x)`` for a decoder layer's MLP; (..., C) in and out."""
    if not blocked_mlp_applies(mlp, x):
        return mlp(x)
    shape = x.shape
    params = (mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)
    keep = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
    y = BlockedReluMLP.apply(x.reshape(-1, shape[-1]), *params, keep)
    return y.view(*shape[:-1], -1)


def decoder_layer(layer: nn.Module, x: Tensor) -> Tensor:
    """``CLIPSegDecoderLayer.forward`` (post-norm: attention, add, norm, MLP, add, norm) with the
    MLP through :func:`decoder_mlp`; a layer with hooks runs HF's own forward."""
    if _has_own_hooks(layer):
        return layer(x, attention_mask=None)
    h, _ = layer.self_attn(hidden_states=x, attention_mask=None)
    h = layer.layer_norm1(x + h)
    return layer.layer_norm2(h + decoder_mlp(layer.mlp, h))


# --- the family ------------------------------------------------------------------------------------


@register_family
class CLIPSeg(ModelFamily):
    name = "clipseg"
    model_types = ("clipseg",)
    tiny_spec = TINY
    # The Linear layers of a CLIP encoder layer (attention q/k/v/out, MLP fc1/fc2).
    linears = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
    lora_targets = ("q_proj", "v_proj")
    positions = {"attention": "self_attn", "mlp": "mlp"}  # adapter position -> sublayer attribute

    # --- loading ---------------------------------------------------------------------------------

    def load(self, spec: str, *, image_size: int | None = None):
        from clipseg_bench.model.load import LoadedModel, check_size, model_source, processor_side
        from clipseg_bench.model.tokenizer import build_tiny_tokenizer

        if spec == TINY:
            loaded = LoadedModel(
                model=build_tiny(),
                tokenizer=build_tiny_tokenizer(),
                image_size=128,
                mean=IMAGENET_MEAN,
                std=IMAGENET_STD,
                spec=spec,
                family=self,
            )
        else:
            source, local, _ = model_source(spec)
            model, processor = _from_pretrained(spec, source, local)
            ip = processor.image_processor
            loaded = LoadedModel(
                model=model,
                tokenizer=processor.tokenizer,
                image_size=processor_side(ip.size),
                mean=tuple(float(x) for x in ip.image_mean),
                std=tuple(float(x) for x in ip.image_std),
                spec=spec,
                family=self,
            )
        loaded.image_size = check_size(image_size or loaded.image_size, self.patch_size(loaded.model), spec)
        return loaded

    def reference_config(self, *, tokenizer=None):
        return reference_config(tokenizer=tokenizer)

    def build(self, config, *, seed: int = TINY_SEED):
        return build_tiny(config, seed=seed)

    def save(self, loaded, folder) -> None:
        from transformers import CLIPSegProcessor
        from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        loaded.model.save_pretrained(folder)
        image_processor = ViTImageProcessorPil(
            size={"height": loaded.image_size, "width": loaded.image_size},
            image_mean=list(loaded.mean),
            image_std=list(loaded.std),
        )
        CLIPSegProcessor(image_processor=image_processor, tokenizer=loaded.tokenizer).save_pretrained(folder)

    def patch_size(self, model) -> int:
        return int(model.config.vision_config.patch_size)

    # --- named parts -------------------------------------------------------------------------------

    def parts(self, model) -> Parts:
        clip = model.clip
        return Parts(
            vision=[clip.vision_model], text=[clip.text_model, clip.text_projection], decoder=[model.decoder]
        )

    def vision_depth(self, model) -> int:
        """Number of vision layers the decoder needs: up to the deepest of ``extract_layers``."""
        return max(model.config.extract_layers) + 1

    def encoder_layers(self, model, encoder: str) -> list[nn.Module]:
        if encoder == "vision":
            return list(model.clip.vision_model.encoder.layers[: self.vision_depth(model)])
        if encoder == "text":
            return list(model.clip.text_model.encoder.layers)
        raise ValueError(f"encoder must be 'vision' or 'text', not {encoder!r}")

    def layer_width(self, layer: nn.Module) -> int:
        return int(layer.embed_dim)

    def unused_parameters(self, model) -> list[nn.Parameter]:
        """The vision layers after the deepest one the decoder reads, the layer norm of the vision
        pooled output, CLIP's image projection and its contrastive logit scale: a text-prompted
        segmentation forward never reads them."""
        clip = model.clip
        modules = [
            *clip.vision_model.encoder.layers[self.vision_depth(model) :],
            clip.vision_model.post_layernorm,
            clip.visual_projection,
        ]
        return [p for m in modules for p in m.parameters()] + [clip.logit_scale]

    def vision_trainable(self, model) -> bool:
        vm = model.clip.vision_model
        return any_trainable([vm.embeddings, vm.pre_layrnorm, *self.encoder_layers(model, "vision")])

    def vision_fingerprint(self, model) -> str:
        """A hash of the vision encoder weights and the decoder's extract_layers."""
        named = sorted(model.clip.vision_model.state_dict().items())
        return weights_hash(named, list(model.config.extract_layers))

    # --- the forward -------------------------------------------------------------------------------

    def encode_prompts(self, model, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Prompt embeddings: the text model's EOS-pooled output through ``text_projection``, (K, D)."""
        pooled = model.clip.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return model.clip.text_projection(pooled)

    def encode_images(self, model, pixel_values: Tensor) -> list[Tensor]:
        """The vision activations the decoder reads, running only the layers it needs.

        Mirrors ``CLIPSegVisionModel.forward`` (embeddings with interpolated position encoding,
        pre-layernorm, encoder layers) but stops after the deepest of ``extract_layers``.

        Returns:
            One (B, N, C) tensor per entry of ``config.extract_layers``, in that order.
        """
        vm = model.clip.vision_model
        h = vm.pre_layrnorm(vm.embeddings(pixel_values, interpolate_pos_encoding=True))
        outputs = {}
        for i, layer in enumerate(self.encoder_layers(model, "vision")):
            h = layer(h, None)  # positional: HF's checkpointing passes only *args to the recompute
            outputs[i] = h
        return [outputs[i] for i in model.config.extract_layers]

    def decode(
        self, model, features: Sequence[Tensor], prompts: Tensor, *, pairs: Tensor | None = None
    ) -> Tensor:
        """Decode masks for (image, prompt) pairs; each image's activations are reduced once.

        Same computation as ``CLIPSegDecoder.forward``, except that the per-layer ``reduces``
        projections (C -> reduce_dim) run once per image before images are repeated across prompts,
        which keeps the repeated tensors reduce_dim wide instead of C wide, and that on CPU each
        layer's MLP runs block by block (:func:`decoder_mlp`).

        Args:
            features: from :meth:`encode_images` (or a cache), each (B, N, C).
            prompts: (K, D) from :meth:`encode_prompts` (or a cache).
            pairs: None for all B x K combinations, or (P, 2) long rows (image index, prompt index).

        Returns:
            Logits (B, K, S, S) when ``pairs`` is None, else (P, S, S).
        """
        dec = model.decoder
        batch = features[0].shape[0]
        img, prm = pair_indices(batch, prompts.shape[0], pairs, prompts.device)
        cond = prompts[prm]  # (P, D)
        output = None
        for i, (act, layer, reduce) in enumerate(zip(features[::-1], dec.layers, dec.reduces)):
            reduced = reduce(act)[img]  # (P, N, reduce_dim)
            output = reduced if output is None else reduced + output
            if i == dec.conditional_layer:  # FiLM conditioning on the prompt
                output = dec.film_mul(cond) * output.permute(1, 0, 2) + dec.film_add(cond)
                output = output.permute(1, 0, 2)
            output = decoder_layer(layer, output)
        output = output[:, 1:, :].transpose(1, 2)  # drop CLS: (P, reduce_dim, N-1)
        side = int(math.sqrt(output.shape[2]))
        logits = upsample_head(
            dec.transposed_convolution, output.reshape(len(img), output.shape[1], side, side)
        )
        logits = logits.squeeze(1)
        if pairs is None:
            logits = logits.view(batch, prompts.shape[0], *logits.shape[-2:])
        return logits

    def stock_logits(self, model, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``CLIPSegForImageSegmentation.forward`` on every (image, prompt) pair, as (B, K, S, S)."""
        b, k = pixel_values.shape[0], input_ids.shape[0]
        out = model(
            pixel_values=pixel_values.repeat_interleave(k, 0),
            input_ids=input_ids.repeat(b, 1),
            attention_mask=attention_mask.repeat(b, 1),
        ).logits
        return out.reshape(b, k, *out.shape[-2:])
