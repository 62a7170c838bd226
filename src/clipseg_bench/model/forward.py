"""Our forward pass around Hugging Face's CLIPSeg modules: the only place that knows their internals.

Why not ``CLIPSegForImageSegmentation.forward``: it runs both CLIP encoders under
``torch.no_grad()``, so through it "full fine-tuning" trains only the decoder and adapters or
LoRA inside the encoders never get a gradient while the optimizer still "steps". Here:

- an encoder runs with gradients iff any of its parameters requires grad, else under ``no_grad``;
- each image is encoded once and decoded for K prompts (B images x K prompts -> B*K masks);
- the vision encoder stops at the deepest layer the decoder reads (``extract_layers``): with text
  prompts the later layers and the pooled output are wasted work;
- precomputed prompt embeddings and vision activations can be passed in, so frozen parts can be
  computed once and cached.

With the same weights the logits equal the stock forward's (tests check atol 1e-5).

Shapes: B images, K prompts, P (image, prompt) pairs, N = 1 + (side/patch)^2 vision tokens,
C vision width, D projection width, S input side in px.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:  # importing transformers takes seconds; strategies import this module to register
    from transformers import CLIPSegForImageSegmentation

# --- the parts of the model ------------------------------------------------------------------


def vision_encoder(model: CLIPSegForImageSegmentation) -> nn.Module:
    return model.clip.vision_model


def text_encoder_parts(model: CLIPSegForImageSegmentation) -> list[nn.Module]:
    """The text path: the text transformer and the projection into the prompt embedding."""
    return [model.clip.text_model, model.clip.text_projection]


def decoder_module(model: CLIPSegForImageSegmentation) -> nn.Module:
    return model.decoder


def vision_depth(model: CLIPSegForImageSegmentation) -> int:
    """Number of vision layers the decoder needs: up to the deepest of ``extract_layers``."""
    return max(model.config.extract_layers) + 1


def encoder_layers(model: CLIPSegForImageSegmentation, encoder: str) -> list[nn.Module]:
    """The transformer layers a text-prompted forward runs.

    Args:
        encoder: ``"vision"`` (only the layers up to the deepest one the decoder reads) or ``"text"``.
    """
    if encoder == "vision":
        return list(model.clip.vision_model.encoder.layers[: vision_depth(model)])
    if encoder == "text":
        return list(model.clip.text_model.encoder.layers)
    raise ValueError(f"encoder must be 'vision' or 'text', not {encoder!r}")


def unused_parameters(model: CLIPSegForImageSegmentation) -> list[nn.Parameter]:
    """Parameters a text-prompted segmentation forward never reads.

    The vision layers after the deepest one the decoder reads, the layer norm of the vision pooled
    output, CLIP's image projection and its contrastive logit scale. They can never receive a
    gradient, so strategies keep them frozen and do not count them as trained.
    """
    clip = model.clip
    modules = [
        *clip.vision_model.encoder.layers[vision_depth(model) :],
        clip.vision_model.post_layernorm,
        clip.visual_projection,
    ]
    return [p for m in modules for p in m.parameters()] + [clip.logit_scale]


def encoder_trainable(module: nn.Module | Sequence[nn.Module]) -> bool:
    """True if any parameter of the module(s) requires grad."""
    modules = [module] if isinstance(module, nn.Module) else list(module)
    return any(p.requires_grad for m in modules for p in m.parameters())


def vision_trainable(model: CLIPSegForImageSegmentation) -> bool:
    """Whether the vision encoder trains; if not, its activations can be cached."""
    vm = model.clip.vision_model
    return encoder_trainable([vm.embeddings, vm.pre_layrnorm, *encoder_layers(model, "vision")])


def text_trainable(model: CLIPSegForImageSegmentation) -> bool:
    """Whether the text encoder (or its projection) trains; if not, prompt embeddings can be cached."""
    return encoder_trainable(text_encoder_parts(model))


def set_gradient_checkpointing(model: CLIPSegForImageSegmentation, enabled: bool) -> None:
    """Recompute encoder layer activations in backward instead of storing them (saves memory).

    Acts only on layers that run with gradients in training mode; a frozen encoder runs under
    ``no_grad`` and stores nothing anyway. Non-reentrant checkpointing, which also works when the
    layer input does not require grad (frozen embeddings, adapters or LoRA inside the layer).
    """
    fn = functools.partial(checkpoint, use_reentrant=False)
    for layer in encoder_layers(model, "vision") + encoder_layers(model, "text"):
        layer.gradient_checkpointing = enabled
        layer._gradient_checkpointing_func = fn


# --- inputs ----------------------------------------------------------------------------------


def preprocess(images: Tensor, *, size: int, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """CT slices -> normalised 3-channel model input.

    Args:
        images: (B, H, W) uint8 gray slices (already intensity-windowed), copied into R, G and B;
            or (B, 3, H, W) uint8 images whose channels differ (``input_channels`` neighbors /
            windows, :mod:`clipseg_bench.data.channels`). Any device.
        size: square output side in px.
        mean, std: per-channel normalisation of values in [0, 1] (the model's image processor's),
            applied to R, G, B alike in every mode.

    Returns:
        (B, 3, size, size) float32: bilinear resize (antialiased, like PIL's), /255, normalised.
    """
    if images.ndim == 4 and images.shape[1] == 3:
        x = images.to(torch.float32) / 255.0
    elif images.ndim == 3:
        x = images.to(torch.float32).unsqueeze(1) / 255.0
    else:
        raise ValueError(f"expected (B, H, W) or (B, 3, H, W) slices, got shape {tuple(images.shape)}")
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s  # a single gray channel broadcasts to 3 channels


def tokenize(loaded_or_tokenizer: Any, prompts: Sequence[str]) -> dict[str, Tensor]:
    """Tokenize K prompts, padded to the longest.

    Args:
        loaded_or_tokenizer: a ``LoadedModel`` or a tokenizer.
        prompts: K strings.

    Returns:
        ``{"input_ids": (K, L) long, "attention_mask": (K, L) long}``.
    """
    tok = getattr(loaded_or_tokenizer, "tokenizer", loaded_or_tokenizer)
    enc = tok(list(prompts), padding=True, truncation=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


# --- the three stages --------------------------------------------------------------------------


def encode_prompts(model: CLIPSegForImageSegmentation, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Prompt embeddings: the text model's EOS-pooled output through ``text_projection``.

    Args:
        input_ids, attention_mask: (K, L) from :func:`tokenize`.

    Returns:
        (K, D); carries gradients iff the text path has a trainable parameter.
    """
    grad = torch.is_grad_enabled() and text_trainable(model)
    with torch.set_grad_enabled(grad):
        pooled = model.clip.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return model.clip.text_projection(pooled)


def encode_images(model: CLIPSegForImageSegmentation, pixel_values: Tensor) -> list[Tensor]:
    """The vision activations the decoder reads, running only the layers it needs.

    Mirrors ``CLIPSegVisionModel.forward`` (embeddings with interpolated position encoding,
    pre-layernorm, encoder layers) but stops after the deepest of ``extract_layers``.

    Args:
        pixel_values: (B, 3, S, S) from :func:`preprocess`.

    Returns:
        One (B, N, C) tensor per entry of ``config.extract_layers``, in that order; they carry
        gradients iff the vision encoder has a trainable parameter.
    """
    vm = model.clip.vision_model
    extract = list(model.config.extract_layers)
    grad = torch.is_grad_enabled() and vision_trainable(model)
    with torch.set_grad_enabled(grad):
        h = vm.pre_layrnorm(vm.embeddings(pixel_values, interpolate_pos_encoding=True))
        outputs = {}
        for i, layer in enumerate(encoder_layers(model, "vision")):
            h = layer(h, None)  # positional: HF's checkpointing passes only *args to the recompute
            outputs[i] = h
    return [outputs[i] for i in extract]


def _pair_indices(batch: int, prompts: int, pairs: Tensor | None, device) -> tuple[Tensor, Tensor]:
    if pairs is None:  # every image with every prompt, image-major: row b*K + k
        return (
            torch.arange(batch, device=device).repeat_interleave(prompts),
            torch.arange(prompts, device=device).repeat(batch),
        )
    pairs = pairs.to(device=device, dtype=torch.long)
    if pairs.ndim != 2 or pairs.shape[1] != 2:
        raise ValueError(f"pairs must be (P, 2) (image index, prompt index), got {tuple(pairs.shape)}")
    return pairs[:, 0], pairs[:, 1]


def _is_patch_deconv(m: nn.Module) -> bool:
    return (
        isinstance(m, nn.ConvTranspose2d)
        and m.kernel_size == m.stride
        and m.padding == (0, 0)
        and m.output_padding == (0, 0)
        and m.dilation == (1, 1)
        and m.groups == 1
    )


MLP_BLOCK = 256  # rows per block: a (256, 2048) fp32 hidden block is 2 MiB and stays in cache


class _BlockedReluMLP(torch.autograd.Function):
    """``fc2(relu(fc1(x)))`` computed in row blocks that stay in cache.

    Written here because no library op fuses this: the decoder's MLP widens 64 -> 2048, so for
    16 masks at 352 px its hidden tensor is 7760 x 2048 fp32 = 64 MiB per layer. Eagerly, PyTorch
    streams several such tensors through memory per layer (fc1's output after a copy of its
    broadcast bias, the ReLU output, the ReLU gradient), and tensors above glibc's 32 MiB mmap
    limit are page-faulted in afresh every step. Here each 256-row block of the hidden tensor
    (2 MiB) is produced, activated and consumed while in cache; the blocks are kept for backward,
    as autograd keeps the ReLU output (same memory), but as separate 2 MiB tensors that the heap
    reuses. fc1's bias rides in the matmul as a row of ``W1^T`` against a column of ones in ``x``,
    so it costs no pass over the hidden block and its gradient falls out of the weight-gradient
    matmul. It roughly halves the MLP's time on CPU (measured in benchmarks/README.md).
    Gradients equal the eager MLP's up to float summation order (tests/model/test_forward.py).
    """

    @staticmethod
    def forward(ctx, x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, keep: bool) -> Tensor:
        # keep: a backward will follow (grad mode was on at the call; inside forward it is off)
        x1 = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)  # (T, C+1)
        w1b = torch.cat([w1.t(), b1[None]], dim=0)  # (C+1, H)
        y = x.new_empty(x.shape[0], w2.shape[0])
        hidden = []
        for s in range(0, x.shape[0], MLP_BLOCK):
            h = torch.mm(x1[s : s + MLP_BLOCK], w1b).clamp_min_(0)
            torch.addmm(b2, h, w2.t(), out=y[s : s + MLP_BLOCK])
            if keep:  # at inference only one block is alive at a time
                hidden.append(h)
        if keep:
            ctx.save_for_backward(x1, w1, w2, *hidden)
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x1, w1, w2, *hidden = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2, _ = ctx.needs_input_grad
        grad_y = grad_y.contiguous()
        gx = x1.new_empty(x1.shape[0], x1.shape[1] - 1) if need_x else None
        gw1b = x1.new_zeros(x1.shape[1], w1.shape[0]) if (need_w1 or need_b1) else None  # [W1^T; b1] grads
        gw2 = torch.zeros_like(w2) if need_w2 else None
        for s, h in zip(range(0, x1.shape[0], MLP_BLOCK), hidden):
            xb, gyb = x1[s : s + MLP_BLOCK], grad_y[s : s + MLP_BLOCK]
            if need_w2:
                gw2.addmm_(gyb.t(), h)
            if gx is None and gw1b is None:
                continue
            g_hidden = torch.ops.aten.threshold_backward(gyb @ w2, h, 0)
            if gw1b is not None:
                gw1b.addmm_(xb.t(), g_hidden)
            if gx is not None:
                torch.mm(g_hidden, w1, out=gx[s : s + MLP_BLOCK])
        gw1 = gw1b[:-1].t() if need_w1 else None
        gb1 = gw1b[-1] if need_b1 else None
        gb2 = grad_y.sum(0) if need_b2 else None
        return gx, gw1, gb1, gw2, gb2, None


def _has_own_hooks(module: nn.Module) -> bool:
    """Forward hooks other than the output-capturing ones transformers installs on its first
    forward (they record outputs only inside HF's own forward, which this module replaces)."""
    hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
    return any(getattr(h, "__module__", "") != "transformers.utils.output_capturing" for h in hooks)


def _blocked_mlp_applies(mlp: nn.Module, x: Tensor) -> bool:
    """The blocked MLP is a CPU path for HF's plain ``fc1 -> ReLU -> fc2`` MLP.

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
    if not _blocked_mlp_applies(mlp, x):
        return mlp(x)
    shape = x.shape
    params = (mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)
    keep = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
    y = _BlockedReluMLP.apply(x.reshape(-1, shape[-1]), *params, keep)
    return y.view(*shape[:-1], -1)


def decoder_layer(layer: nn.Module, x: Tensor) -> Tensor:
    """``CLIPSegDecoderLayer.forward`` (post-norm: attention, add, norm, MLP, add, norm) with the
    MLP through :func:`decoder_mlp`; a layer with hooks runs HF's own forward."""
    if _has_own_hooks(layer):
        return layer(x, attention_mask=None)
    h, _ = layer.self_attn(hidden_states=x, attention_mask=None)
    h = layer.layer_norm1(x + h)
    return layer.layer_norm2(h + decoder_mlp(layer.mlp, h))


def patch_deconv_chain(
    convs: Sequence[nn.ConvTranspose2d], relu_between: Sequence[bool], x: Tensor
) -> Tensor:
    """Consecutive kernel == stride ConvTranspose2d layers (optionally a ReLU between two) as matmuls.

    With kernel == stride each input pixel paints its own k x k output block, so a layer is a
    (C -> k*k*O) matmul, which on CPU is far faster than PyTorch's ConvTranspose2d for the
    decoder's many-mask batches (benchmarks/README.md). Along a chain the activations stay one row per output
    pixel, in the order (image, y, x, ky1, kx1, ky2, kx2, ...), channels last: the small weight
    matrices are permuted instead of the activations, and only the final output is rearranged
    into an image (for rd64-refined's head that skips three copies of a (P, 32, 88, 88) tensor).
    Results agree with the layers to float rounding; gradients reach the same weights and biases.

    Args:
        convs: the layers, each consuming the previous one's channels.
        relu_between: for each pair of neighbours, whether a ReLU sits between them.
        x: (P, C, H, W).

    Returns:
        (P, O, H * prod(kh), W * prod(kw)), as the layers applied one by one.
    """
    p, c, h, w = x.shape
    y = x.permute(0, 2, 3, 1).reshape(-1, c)  # one row per input pixel
    for conv, relu in zip(convs, [False, *relu_between]):
        if relu:
            y = F.relu(y)
        o, (kh, kw) = conv.out_channels, conv.kernel_size
        weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.in_channels, kh * kw * o)  # columns (ky, kx, o)
        y = y @ weight if conv.bias is None else torch.addmm(conv.bias.repeat(kh * kw), y, weight)
        y = y.view(-1, o)  # one row per output pixel, its k x k offsets appended to the row order
    kernels = [conv.kernel_size for conv in convs]
    n = len(kernels)
    y = y.view(p, h, w, *[k for kh_kw in kernels for k in kh_kw], convs[-1].out_channels)
    # dims: 0 image, 1 y, 2 x, then (ky_i, kx_i) at 3 + 2i, 4 + 2i, channels last
    order = [0, 3 + 2 * n, 1, *[3 + 2 * i for i in range(n)], 2, *[4 + 2 * i for i in range(n)]]
    out_h = h * math.prod(k[0] for k in kernels)
    out_w = w * math.prod(k[1] for k in kernels)
    return y.permute(*order).reshape(p, convs[-1].out_channels, out_h, out_w)


def upsample_head(head: nn.Module, x: Tensor) -> Tensor:
    """Run the decoder's upsampling head (a ConvTranspose2d, or CLIPSeg's 'complex' Sequential).

    Runs of kernel == stride transposed convolutions, with or without a ReLU between them, go
    through :func:`patch_deconv_chain`; everything else runs as the module itself.
    """
    modules = list(head) if isinstance(head, nn.Sequential) else [head]
    i = 0
    while i < len(modules):
        if not _is_patch_deconv(modules[i]):
            x = modules[i](x)
            i += 1
            continue
        convs, between = [modules[i]], []
        i += 1
        while True:  # extend the chain by a next deconvolution, directly or after one ReLU
            relu = i < len(modules) and type(modules[i]) is nn.ReLU
            j = i + 1 if relu else i  # the candidate next deconvolution
            if j < len(modules) and _is_patch_deconv(modules[j]):
                convs.append(modules[j])
                between.append(relu)
                i = j + 1
            else:
                break
        x = patch_deconv_chain(convs, between, x)
    return x


def decode(
    model: CLIPSegForImageSegmentation,
    activations: Sequence[Tensor],
    prompt_emb: Tensor,
    *,
    pairs: Tensor | None = None,
) -> Tensor:
    """Decode masks for (image, prompt) pairs; each image's activations are reduced once.

    Same computation as ``CLIPSegDecoder.forward``, except that the per-layer ``reduces``
    projections (C -> reduce_dim) run once per image before images are repeated across prompts,
    which keeps the repeated tensors reduce_dim wide instead of C wide, and that on CPU each
    layer's MLP runs block by block (:func:`decoder_mlp`).

    Args:
        activations: from :func:`encode_images` (or a cache), each (B, N, C).
        prompt_emb: (K, D) from :func:`encode_prompts` (or a cache).
        pairs: None for all B x K combinations, or (P, 2) long rows (image index, prompt index).

    Returns:
        Logits (B, K, S, S) when ``pairs`` is None, else (P, S, S).
    """
    dec = model.decoder
    batch = activations[0].shape[0]
    img, prm = _pair_indices(batch, prompt_emb.shape[0], pairs, prompt_emb.device)
    cond = prompt_emb[prm]  # (P, D)
    output = None
    for i, (act, layer, reduce) in enumerate(zip(activations[::-1], dec.layers, dec.reduces)):
        reduced = reduce(act)[img]  # (P, N, reduce_dim)
        output = reduced if output is None else reduced + output
        if i == dec.conditional_layer:  # FiLM conditioning on the prompt
            output = dec.film_mul(cond) * output.permute(1, 0, 2) + dec.film_add(cond)
            output = output.permute(1, 0, 2)
        output = decoder_layer(layer, output)
    output = output[:, 1:, :].transpose(1, 2)  # drop CLS: (P, reduce_dim, N-1)
    side = int(math.sqrt(output.shape[2]))
    logits = upsample_head(dec.transposed_convolution, output.reshape(len(img), output.shape[1], side, side))
    logits = logits.squeeze(1)
    if pairs is None:
        logits = logits.view(batch, prompt_emb.shape[0], *logits.shape[-2:])
    return logits


def forward(
    model: CLIPSegForImageSegmentation,
    pixel_values: Tensor | None = None,
    prompt_emb: Tensor | None = None,
    *,
    input_ids: Tensor | None = None,
    attention_mask: Tensor | None = None,
    activations: Sequence[Tensor] | None = None,
    pairs: Tensor | None = None,
) -> Tensor:
    """Images and prompts in, logits out: :func:`encode_images`, :func:`encode_prompts`, :func:`decode`.

    Args:
        pixel_values: (B, 3, S, S), or pass cached ``activations`` instead.
        prompt_emb: (K, D), or pass ``input_ids`` and ``attention_mask`` (K, L) instead.
        pairs: see :func:`decode`.

    Returns:
        (B, K, S, S) logits, or (P, S, S) with ``pairs``.

    Raises:
        ValueError: cached inputs given for an encoder that trains. They would silently bypass the
            trainable parameters: the very trap this module exists to avoid.
    """
    grad = torch.is_grad_enabled()
    if activations is None:
        if pixel_values is None:
            raise ValueError("pass pixel_values or precomputed activations")
        activations = encode_images(model, pixel_values)
    elif grad and vision_trainable(model) and not any(a.requires_grad for a in activations):
        raise ValueError("cached vision activations given, but the vision encoder trains; pass pixel_values")
    if prompt_emb is None:
        if input_ids is None:
            raise ValueError("pass prompt_emb or input_ids")
        prompt_emb = encode_prompts(model, input_ids, attention_mask)
    elif grad and text_trainable(model) and not prompt_emb.requires_grad:
        raise ValueError("cached prompt embeddings given, but the text encoder trains; pass input_ids")
    return decode(model, activations, prompt_emb, pairs=pairs)
