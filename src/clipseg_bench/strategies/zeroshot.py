"""Zero-shot: the model as loaded, nothing trained. The evaluation baseline."""

from __future__ import annotations

from torch import nn

from clipseg_bench.strategies.base import Strategy, register


@register
class ZeroShot(Strategy):
    name = "zeroshot"
    description = "No training: the pretrained model as it is, the baseline every strategy must beat."
    # Nothing trains; a rate is still recorded so every run's config is complete.
    lr = 1e-3
    tuned_rate = None  # nothing trains: nothing to tune
    order = 0
    color = "#7f7f7f"

    def apply(self, model: nn.Module, options) -> None:
        pass  # everything stays frozen
