"""Segmentation losses on (slice, organ) pairs."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_dice_loss(logits: torch.Tensor, targets: torch.Tensor, *, smooth: float = 1.0) -> torch.Tensor:
    """Mean over pairs of 1 - soft Dice.

    Args:
        logits: (P, H, W) raw scores; targets: (P, H, W) in {0, 1}.
        smooth: added to numerator and denominator, so an empty target with an empty prediction
            costs ~0 and an empty target with any prediction is pushed towards empty.
    """
    p = torch.sigmoid(logits.float()).flatten(1)
    t = targets.float().flatten(1)
    inter = (p * t).sum(1)
    return (1 - (2 * inter + smooth) / (p.sum(1) + t.sum(1) + smooth)).mean()


def segmentation_loss(
    logits: torch.Tensor, targets: torch.Tensor, *, bce_weight: float = 1.0, dice_weight: float = 1.0
) -> torch.Tensor:
    """bce_weight * BCE + dice_weight * soft Dice, both averaged over pairs. Shapes (P, H, W)."""
    bce = F.binary_cross_entropy_with_logits(logits.float(), targets.float())
    return bce_weight * bce + dice_weight * soft_dice_loss(logits, targets)
