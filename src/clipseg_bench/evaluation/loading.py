"""Load what a run folder trained: the base model, its strategy, and the trained weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from clipseg_bench.config import TrainConfig, load_config
from clipseg_bench.errors import InputError
from clipseg_bench.evaluation.predict import Segmenter
from clipseg_bench.organs import Organ, parse_organs, prompts


@dataclass
class TrainedRun:
    cfg: TrainConfig
    loaded: object  # model.load.LoadedModel with the strategy applied and weights loaded
    organs: list[Organ]
    prompts: list[str]

    def segmenter(self, device: torch.device | str = "cpu") -> Segmenter:
        lm = self.loaded
        lm.model.to(device)
        return Segmenter(
            lm.model,
            lm.tokenizer,
            organs=self.organs,
            prompts=self.prompts,
            size=lm.image_size,
            mean=lm.mean,
            std=lm.std,
            device=device,
        )


def build_model(cfg: TrainConfig, weights: Path | None):
    from clipseg_bench.model.checkpoint import load_trained
    from clipseg_bench.model.load import load_model
    from clipseg_bench.strategies import apply_strategy

    torch.manual_seed(cfg.seed)
    loaded = load_model(cfg.model, image_size=cfg.image_size)
    apply_strategy(loaded.model, cfg.strategy, cfg.strategy_options)
    if weights is not None:
        load_trained(loaded.model, weights)
    loaded.model.eval()
    return loaded


def load_run(run: str | Path) -> TrainedRun:
    """Rebuild a finished run's model from RUN/config.yaml and RUN/weights.safetensors."""
    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise InputError(run, "not a run folder (no config.yaml); train one with `clipseg-bench train`")
    weights = run / "weights.safetensors"
    if not weights.is_file():
        raise InputError(run, "run has no weights.safetensors (unfinished?); resume it with `train --resume`")
    cfg = load_config(run / "config.yaml")
    return _trained(cfg, weights)


def zeroshot_run(model: str, *, image_size: int | None = None, prompt_template: str = "name") -> TrainedRun:
    """A model with nothing trained, for `segment --model M --strategy zeroshot`."""
    cfg = TrainConfig(
        data="",
        out="",
        model=model,
        strategy="zeroshot",
        image_size=image_size,
        prompt_template=prompt_template,
    )
    return _trained(cfg, None)


def _trained(cfg: TrainConfig, weights: Path | None) -> TrainedRun:
    organ_list = parse_organs(",".join(cfg.organs) if cfg.organs else None)
    return TrainedRun(cfg, build_model(cfg, weights), organ_list, prompts(cfg.prompt_template, organ_list))
