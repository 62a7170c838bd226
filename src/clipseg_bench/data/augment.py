"""Intensity augmentation of uint8 CT slices (our own few lines: no library knows our window)."""

from __future__ import annotations

import torch


def augment_intensity(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random contrast (x0.9-1.1), brightness (+-10) and noise (sd 3) per slice, on uint8 (B, S, S)
    or (B, C, S, S) (one contrast and brightness for all channels of a slice).

    Intensity only: a left/right flip would turn the right kidney into the left one. Draws come
    from ``generator`` alone, so a resumed run augments exactly as an uninterrupted one.
    """
    per_slice = (images.shape[0],) + (1,) * (images.ndim - 1)
    scale = 0.9 + 0.2 * torch.rand(per_slice, generator=generator)
    shift = 20 * torch.rand(per_slice, generator=generator) - 10
    noise = 3 * torch.randn(images.shape, generator=generator)
    out = images.float().cpu() * scale + shift + noise
    return out.round().clamp(0, 255).to(torch.uint8).to(images.device)
