"""Our engine: the training loop of ``clipseg-bench train`` on the setup ``train()`` builds, one step per call."""

from __future__ import annotations

import functools

import torch

from .common import Arch


@functools.lru_cache(maxsize=1)
def cpu_accelerator():
    """One CPU ``Accelerator`` for every setup this process builds (its state is process-wide)."""
    from accelerate import Accelerator

    return Accelerator(cpu=True)


class EngineRun:
    """The training loop of ``clipseg-bench train``, built by ``train()``'s own builder, one step per call.

    The setup comes from ``train.setup.build_training`` and a step is one call of
    ``train.loop.train_epoch`` over a dataset of exactly ``batch`` slices, so it is everything the
    loop does: Accelerate's data loader, targets, forward, loss, backward, clipping, AdamW.
    ``absent_fraction=1`` makes every slice bring all 13 prompts (B x 13 masks per step).

    Args:
        arch: the model (its strategy applied) and prompts.
        data: the prepared dataset; its first ``batch`` training slices are used.
        strategy: the strategy applied to ``arch`` (recorded in the config only).
        batch: B slices per step.
        use_cache: feed cached frozen vision activations (the vision encoder must be frozen).
        compile: ``torch.compile`` the module, as ``train --set compile=true`` does.
    """

    def __init__(
        self, arch: Arch, data, *, strategy: str, batch: int, use_cache: bool, compile: bool = False
    ):
        from clipseg_bench.config import TrainConfig
        from clipseg_bench.model.forward import vision_trainable
        from clipseg_bench.model.load import LoadedModel
        from clipseg_bench.train.setup import build_training

        if use_cache and vision_trainable(arch.model):
            raise ValueError("the feature cache needs a frozen vision encoder")
        # Defaults everywhere (num_workers, grad_clip, loss weights, AdamW) except: all pairs, this
        # batch, a constant learning rate (no warm-up; the schedule never ends), validation off.
        self.cfg = TrainConfig(
            data=str(data.root),
            out=str(data.root / "unused"),
            strategy=strategy,
            batch_size=batch,
            absent_fraction=1.0,
            lr=1e-5,
            warmup_steps=0,
            epochs=10**6,
            feature_cache=use_cache,
            compile=compile,
            val_every=0,
            val_max_slices=1,  # the builder also caches val slices; one is enough here
        )
        loaded = LoadedModel(arch.model, arch.tokenizer, arch.size, arch.mean, arch.std, spec=arch.name)
        rows = data.slices("train", kept_only=True).iloc[:batch]
        self.setup = build_training(self.cfg, cpu_accelerator(), loaded=loaded, train_rows=rows)
        train_cache = self.setup.cache_infos.get("train_kept")
        self.cache_build_s = train_cache.build_s if train_cache else 0.0
        self.steps = 0
        self.last_masks = 0

    @property
    def optimizer(self):
        """The engine's AdamW; a per-pair baseline of the same parameters shares it (and its state)."""
        return self.setup.optimizer

    def step(self) -> None:
        """One training step (one epoch of ``batch`` slices)."""
        from tqdm.auto import tqdm

        from clipseg_bench.train.loop import train_epoch

        with tqdm(disable=True) as pbar:
            _, stats = train_epoch(self.setup, self.steps, 0, pbar)
        self.steps += 1
        self.last_masks = stats["masks"]

    def reset_breakdown(self) -> None:
        from clipseg_bench.train.timing import StepTimer

        self.setup.timer = StepTimer(torch.device("cpu"))

    @property
    def breakdown(self) -> dict[str, float]:
        """Seconds per phase (data, forward, backward, optimizer) since :meth:`reset_breakdown`."""
        return dict(self.setup.timer.totals)
