"""A run's model rebuilt from its folder: the base model, its strategy, the trained weights, its
organs and prompts, and how it preprocesses its input (what ``evaluate`` and ``segment`` run)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clipseg_bench.config import TrainConfig
from clipseg_bench.errors import InputError
from clipseg_bench.organs import Organ, parse_organs, prompts
from clipseg_bench.run_folder import Preprocessing, RunFolder


@dataclass
class TrainedModel:
    """A model as a run trained it (or as loaded, for zero-shot), with everything needed to use it.

    Attributes:
        cfg: the run's config.
        loaded: the :class:`~clipseg_bench.model.load.LoadedModel`, strategy applied, weights loaded.
        organs, prompts: the K organs it segments and their prompt texts, in output order.
        preprocessing: how its input is made (window, channels, HU windows: run.json).
    """

    cfg: TrainConfig
    loaded: object
    organs: list[Organ]
    prompts: list[str]
    preprocessing: Preprocessing

    def segmenter(self, device: torch.device | str = "cpu"):
        """A :class:`~clipseg_bench.evaluation.predict.Segmenter` of this model on ``device``, under the
        run's autocast as it resolves there (``auto``: bf16 on CUDA, fp32 on CPU), TF32 as the run says."""
        from clipseg_bench.evaluation.predict import Segmenter
        from clipseg_bench.model.precision import use_tf32

        self.loaded.model.to(device)
        use_tf32(device, self.cfg.tf32)
        return Segmenter.of(
            self.loaded,
            organs=self.organs,
            prompts=self.prompts,
            device=device,
            precision=self.precision(device),
        )

    def precision(self, device: torch.device | str) -> str:
        """The autocast this run's model runs under on ``device`` (its ``mixed_precision`` resolved)."""
        from clipseg_bench.model.precision import resolve_precision

        return resolve_precision(self.cfg.mixed_precision, device)

    def keep_organs(self, keys: list[str]) -> None:
        """Segment only these organs (in the run's order).

        Raises:
            InputError: an organ the run was not trained on (naming the ``organs`` field).
        """
        trained = {o.key for o in self.organs}
        untrained = [k for k in keys if k not in trained]
        if untrained:
            raise InputError(
                "organs",
                f"the run was not trained on {','.join(untrained)}; "
                f"it segments {','.join(o.key for o in self.organs)}",
            )
        keep = [i for i, o in enumerate(self.organs) if o.key in set(keys)]
        self.organs = [self.organs[i] for i in keep]
        self.prompts = [self.prompts[i] for i in keep]


def _build(cfg: TrainConfig, weights, preprocessing: Preprocessing | None) -> TrainedModel:
    from clipseg_bench.model.load import load_model
    from clipseg_bench.model.weights import load_weights
    from clipseg_bench.strategies import apply_strategy

    torch.manual_seed(cfg.seed)
    loaded = load_model(cfg.model, image_size=cfg.image_size)
    apply_strategy(loaded.model, cfg.strategy, cfg.strategy_options)
    if weights is not None:
        load_weights(loaded.model, weights)
    loaded.model.eval()
    organ_list = parse_organs(",".join(cfg.organs) if cfg.organs else None)
    if preprocessing is None:  # zero-shot: the default window, the model's own preprocessing
        from clipseg_bench.data.volumes import DEFAULT_WINDOW, parse_window

        preprocessing = Preprocessing(window=parse_window(DEFAULT_WINDOW), input_channels=cfg.input_channels)
    return TrainedModel(cfg, loaded, organ_list, prompts(cfg.prompt_template, organ_list), preprocessing)


def load_run_model(run: str | RunFolder) -> TrainedModel:
    """Rebuild a finished run's model from RUN/config.yaml, RUN/run.json and RUN/weights.safetensors.

    Raises:
        InputError: not a run folder, or a run without weights (unfinished).
    """
    folder = run if isinstance(run, RunFolder) else RunFolder(run)
    cfg = folder.config()
    if not folder.weights_path.is_file():
        raise InputError(
            folder.path, "run has no weights.safetensors (unfinished?); resume it with `train --resume`"
        )
    return _build(cfg, folder.weights_path, folder.preprocessing())


def zeroshot_model(
    model: str, *, image_size: int | None = None, prompt_template: str = "name"
) -> TrainedModel:
    """A model with nothing trained, for `segment --model M --strategy zeroshot`."""
    cfg = TrainConfig(
        data="",
        out="",
        model=model,
        strategy="zeroshot",
        image_size=image_size,
        prompt_template=prompt_template,
    )
    return _build(cfg, None, None)
