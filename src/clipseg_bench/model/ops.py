"""Fast forms of two decoder operations, written here because no library op does them.

Both are plain PyTorch on tensors and ``nn`` layers; they know nothing of any Hugging Face model, so a
model family (:mod:`clipseg_bench.model.families`) decides where they apply.

- :class:`BlockedReluMLP`: ``fc2(relu(fc1(x)))`` in row blocks that stay in cache (CPU, fp32);
- :func:`patch_deconv_chain` / :func:`upsample_head`: kernel == stride transposed convolutions as
  matmuls (benchmarks/README.md measures both).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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


class BlockedReluMLP(torch.autograd.Function):
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
