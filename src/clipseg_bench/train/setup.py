"""Building a training run: data, model and strategy, frozen parts computed once, loader, optimizer.

:func:`build_training` turns a validated config into a :class:`TrainingSetup`, the one object the
loop (:mod:`clipseg_bench.train.loop`) and the efficiency benchmark (``benchmarks/throughput.py``)
both run. It never looks at the strategy's name: what trains follows from ``requires_grad``, and
whether the image encoder can be skipped (cached features) from the vision encoder being frozen.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from clipseg_bench.config import TrainConfig, resolve_lr
from clipseg_bench.data.channels import WINDOWS, needs_hu
from clipseg_bench.data.dataset import PreparedData, SliceDataset
from clipseg_bench.data.sampling import EpochSampler, train_case_subset
from clipseg_bench.errors import InputError, RunFailed
from clipseg_bench.evaluation.predict import Segmenter
from clipseg_bench.evaluation.validation import even_sample, sample_record
from clipseg_bench.model.families import family_of
from clipseg_bench.model.families.base import parameters_of
from clipseg_bench.model.feature_cache import (
    BUILD_BATCH,
    CachedRows,
    CacheInfo,
    build_feature_cache,
    cache_key,
    cache_root,
    fold_suffix,
)
from clipseg_bench.model.forward import (
    encode_prompts,
    set_gradient_checkpointing,
    text_trainable,
    tokenize,
    vision_trainable,
)
from clipseg_bench.model.load import LoadedModel, load_model
from clipseg_bench.model.precision import precision_record, resolve_precision, use_tf32
from clipseg_bench.model.prompted import PromptedModule
from clipseg_bench.organs import Organ, parse_organs, prompts
from clipseg_bench.provenance import available_memory, size_text
from clipseg_bench.run_folder import Preprocessing
from clipseg_bench.strategies import ParamCounts, apply_strategy, count_parameters
from clipseg_bench.train.allocator import return_free_memory
from clipseg_bench.train.audit import GradientAudit
from clipseg_bench.train.resident import ResidentData, load_resident, resident_bytes, wants_resident
from clipseg_bench.train.timing import StepTimer


@dataclass(kw_only=True)
class TrainingSetup:
    """Everything a training run is made of, built once by :func:`build_training`.

    Attributes:
        cfg: the run's validated config.
        accelerator: the ``accelerate.Accelerator`` (device, precision, processes).
        data: the prepared dataset.
        loaded: the model with its strategy applied, tokenizer and preprocessing.
        organs: the K prompted organs, in output order (their prompt texts: ``segmenter.prompts``).
        counts: trainable and total parameters.
        module: the :class:`~clipseg_bench.model.prompted.PromptedModule`, as prepared by Accelerate.
        optimizer, scheduler: None when nothing trains (zero-shot).
        loader, sampler: the training slices; the sampler's order is a function of (seed, epoch).
        prompt_emb: (K, D) prompt embeddings when the text encoder is frozen (computed once), else None.
        train_rows: the manifest rows the loader trains on; ``features`` row i belongs to row i.
        val_rows: the val slices validation scores (all kept ones, or ``val_max_slices`` of them
            spread by :func:`~clipseg_bench.evaluation.validation.even_sample`); empty when the
            data has no val case. ``val_features`` row i belongs to row i.
        train_check: positions in ``train_rows`` of the slices the final train Dice scores.
        features, val_features: cached vision activations of ``train_rows`` / ``val_rows`` when the
            vision encoder is frozen (:class:`~clipseg_bench.model.feature_cache.CachedRows`), else None.
        resident: the training rows' features and labels held on the device (decoder-only, when
            ``feature_cache_on_device`` says so), else None: the loader then serves only indices.
        cache_infos: what the feature cache build did, per row set.
        preprocessing: how the run turns slices into model input (run.json ``preprocessing``).
        segmenter: predicts with the model as it is now (validation).
        timer: time per phase.
        audit: the gradient audit (:mod:`clipseg_bench.train.audit`), started on the built model.
        total_steps, n_epochs: the schedule's length.
        precision: the resolved autocast (``no``, ``bf16``, ``fp16``); tf32: whether TF32 is on.
        pair_chunk: the decoder's pair chunk in use (:func:`resolve_pair_chunk`; 0: all at once).
        sync_hooks: called with each :class:`~clipseg_bench.train.tally.Reading` where the loop reads
            what the device accumulated (every ``log_every`` steps and at each epoch end): the place
            for checks that must not make the host wait for the device at every step.
    """

    cfg: TrainConfig
    accelerator: Any
    data: PreparedData
    loaded: LoadedModel
    organs: list[Organ]
    counts: ParamCounts
    module: nn.Module
    optimizer: torch.optim.Optimizer | None
    scheduler: Any
    loader: DataLoader
    sampler: EpochSampler
    prompt_emb: torch.Tensor | None
    train_rows: pd.DataFrame
    val_rows: pd.DataFrame
    train_check: np.ndarray
    features: CachedRows | np.ndarray | None
    val_features: CachedRows | np.ndarray | None
    cache_infos: dict[str, CacheInfo]
    preprocessing: Preprocessing
    segmenter: Segmenter
    timer: StepTimer
    audit: GradientAudit
    total_steps: int
    n_epochs: int
    precision: str = "no"
    tf32: bool = False
    pair_chunk: int = 0
    resident: ResidentData | None = None
    sync_hooks: list[Callable] = field(default_factory=list)

    @property
    def model(self) -> nn.Module:
        """The underlying CLIPSegForImageSegmentation (not wrapped by Accelerate)."""
        return self.loaded.model

    @property
    def organ_ids(self) -> list[int]:
        return [o.id for o in self.organs]

    @functools.cached_property
    def organ_index(self) -> torch.Tensor:
        """The organ ids as a uint8 tensor on the device (:func:`~clipseg_bench.data.dataset.organ_targets`
        compares label maps with it; made once, not copied to the device at every step)."""
        return torch.tensor(self.organ_ids, dtype=torch.uint8, device=self.accelerator.device)

    def compute_record(self) -> dict:
        """run.json's ``compute``: how the device computes (the autocast, TF32, the attention kernel,
        the decoder's pair chunk)."""
        return {
            **precision_record(self.model, precision=self.precision, tf32=self.tf32),
            "pair_chunk": self.pair_chunk,
        }

    @property
    def has_val(self) -> bool:
        """Whether the data has val slices to validate on (a quick run may have none)."""
        return len(self.val_rows) > 0

    def validation_record(self) -> dict:
        """run.json's ``validation``: the cap, and which slices validation and the final train Dice score."""
        return {
            "max_slices": self.cfg.val_max_slices,
            "val": sample_record(self.val_rows, of=self._val_pool()),
            "train": sample_record(self.train_rows.iloc[self.train_check], of=len(self.train_rows)),
        }

    def _val_pool(self) -> int:
        """How many kept slices the val sample is drawn from (the tune cases' for a sweep run)."""
        if self.cfg.tune_cases:
            kept = self.data.slices("train", kept_only=True, fold=self.cfg.fold)
            return int(kept["case"].isin(self.cfg.tune_cases).sum())
        return len(self.data.slices("val", kept_only=True, fold=self.cfg.fold))

    @property
    def train_cases(self) -> list[str]:
        """The ids of the cases whose slices the run trains on, sorted."""
        return sorted(set(self.train_rows["case"]))

    @property
    def val_cases(self) -> list[str]:
        """The ids of the val split's (or fold's) cases, what ``evaluate`` scores, sorted."""
        if self.cfg.tune_cases:
            return sorted(self.cfg.tune_cases)
        return self.data.cases("val", self.cfg.fold)

    @property
    def trains(self) -> bool:
        """Whether any parameter trains (False for zero-shot)."""
        return self.optimizer is not None

    def cache_summary(self) -> dict:
        """The feature cache's cost for run.json: build time and size, and whether it was reused."""
        infos = list(self.cache_infos.values())
        if not infos:
            return {"cache_build_s": 0.0, "cache_size_mb": 0.0}
        return {
            "cache_build_s": sum(i.build_s for i in infos),
            "cache_size_mb": sum(i.size_mb for i in infos),
            "cache_reused": all(i.reused for i in infos),
        }


def make_accelerator(cfg: TrainConfig):
    """The run's Accelerator with its autocast resolved (``auto``: bf16 on CUDA, none on CPU) and, on
    CUDA, TF32 as ``cfg.tf32`` says; ``cpu=True`` is what lets it see a torchrun/gloo launch without a GPU."""
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    acc = Accelerator(
        mixed_precision=resolve_precision(cfg.mixed_precision, "cuda" if cuda else "cpu"), cpu=not cuda
    )
    use_tf32(acc.device, cfg.tf32)
    return acc


DEFAULT_CPU_PAIR_CHUNK = 16  # pairs decoded at a time on CPU (benchmarks/README.md: memory, not speed)


def resolve_pair_chunk(cfg: TrainConfig, device: torch.device) -> int:
    """The decoder's pair chunk: the config's, else 16 on CPU and all pairs at once (0) on CUDA."""
    if cfg.pair_chunk is not None:
        return cfg.pair_chunk
    return 0 if torch.device(device).type == "cuda" else DEFAULT_CPU_PAIR_CHUNK


def worker_count(cfg: TrainConfig, device: torch.device, num_processes: int = 1) -> int:
    """DataLoader workers: the config's, else 4 per process on CUDA (at most the cores per process) and
    0 on CPU, where the training step itself uses every core."""
    if cfg.num_workers is not None:
        return cfg.num_workers
    if torch.device(device).type != "cuda":
        return 0
    return max(0, min(4, (os.cpu_count() or 1) // max(num_processes, 1) - 1))


def make_optimizer(params, *, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (or parameter groups, each with its own ``lr``); fused:
    one kernel for all tensors, not a Python loop."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


def release_frozen_vision(setup: TrainingSetup) -> None:
    """Drop the frozen vision encoder's weights once its outputs are cached (344 MB for rd64).

    Nothing reads them again in this process: training and validation decode cached activations.
    Moving them to the meta device makes any accidental use fail loudly instead of silently. Only
    single-process: DDP broadcasts every buffer, frozen ones included. Call it after
    ``acc.prepare`` (which moves the model), i.e. on a built setup.
    """
    if setup.features is None or setup.accelerator.num_processes != 1:
        return
    setup.loaded.family.release_vision(setup.model)
    return_free_memory()  # weights freed inside glibc's heap would otherwise stay resident


def build_data(cfg: TrainConfig) -> PreparedData:
    """The prepared dataset, checked for the run's input channels and fold (its test cases unread)."""
    data = PreparedData(cfg.data, seal_val=cfg.tune_cases is not None, fold=cfg.fold)
    data.check_channels(cfg.input_channels)
    data.check_fold(cfg.fold)
    return data


def step_memory(image_size: int, batch: int) -> int:
    """Bytes a run at ``image_size`` px with ``batch`` slices per step holds at least at one time,
    whatever the model and whether its vision features are cached.

    Computed live, a step holds the batch's float32 pixel values (3 channels) and at least one
    float32 logit map per slice (every kept slice has an organ to segment), all at the full side.
    With cached features a step holds only the logits, but building the cache holds the pixel values
    of :data:`BUILD_BATCH` slices. The smaller of the two is certain; encoder activations, the other
    prompts' masks and gradients come on top.
    """
    pixels, mask = 3 * 4 * image_size**2, 4 * image_size**2
    live = batch * (pixels + mask)
    cached = max(min(BUILD_BATCH, batch) * pixels, batch * mask)
    return min(live, cached)


def check_memory(cfg: TrainConfig, n_slices: int, device) -> None:
    """Refuse an image size and batch that cannot fit in memory, before anything is allocated.

    Args:
        n_slices: the training slices (a batch is at most all of them).
        device: where the steps run (its free memory on a GPU, else the machine's available memory).

    Raises:
        RunFailed: naming the estimate (:func:`step_memory`) and the memory available.
    """
    if cfg.image_size is None:  # the model's own side (352 px at most for the families we have)
        return
    batch = min(cfg.batch_size, n_slices)  # the loader's batches are at most every slice
    need = step_memory(cfg.image_size, batch)
    available, kind = available_memory(device)
    if available is not None and need > available:
        raise RunFailed(
            None,
            f"not enough memory: image_size {cfg.image_size} px with batch_size {cfg.batch_size} needs at "
            f"least {size_text(need)} (the float32 pixels and masks of {batch} slices at "
            f"{cfg.image_size}x{cfg.image_size} px), and this machine has {size_text(available)} of {kind}; "
            "lower --image-size or --batch-size",
        )


def build_model(cfg: TrainConfig, acc, loaded: LoadedModel | None = None) -> tuple[LoadedModel, ParamCounts]:
    """The model with its strategy applied, on the run's device, and its parameter counts.

    Args:
        loaded: a model with its strategy already applied, instead of loading ``cfg.model`` and
            applying ``cfg.strategy`` (the efficiency benchmark builds random real-size models).
    """
    if loaded is None:
        loaded = load_model(cfg.model, image_size=cfg.image_size)
        apply_strategy(loaded.model, cfg.strategy, cfg.strategy_options)
    counts = count_parameters(loaded.model)
    if cfg.gradient_checkpointing:
        set_gradient_checkpointing(loaded.model, True)
    loaded.model.to(acc.device)
    return loaded, counts


@dataclass(kw_only=True)
class Prompts:
    """The run's organ prompts: organs in output order, their texts and tokens, and their features
    when the text encoder is frozen (computed once, not every step; None when it trains)."""

    organs: list[Organ]
    texts: list[str]
    tokens: dict[str, torch.Tensor]
    features: Any


def build_prompts(cfg: TrainConfig, loaded: LoadedModel, device) -> Prompts:
    """The organ prompts of the run, tokenized on ``device``, encoded once if the text encoder is frozen."""
    organ_list = parse_organs(",".join(cfg.organs) if cfg.organs else None)
    texts = prompts(cfg.prompt_template, organ_list)
    tokens = {k: v.to(device) for k, v in tokenize(loaded.tokenizer, texts).items()}
    features = None
    if not text_trainable(loaded.model):
        with torch.no_grad():
            features = encode_prompts(loaded.model, tokens["input_ids"], tokens["attention_mask"])
    return Prompts(organs=organ_list, texts=texts, tokens=tokens, features=features)


def build_rows(
    cfg: TrainConfig, data: PreparedData, train_rows: pd.DataFrame | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The manifest rows the run trains on and the val sample validation scores.

    Args:
        train_rows: train on these rows instead of the split's kept slices (or the ``train_cases``
            subset of them).

    Raises:
        InputError: nothing to train on, or more ``train_cases`` than the folder has.
    """
    val_rows = data.slices("val", kept_only=True, fold=cfg.fold) if not cfg.tune_cases else None
    if train_rows is None:
        train_rows = data.slices("train", kept_only=True, fold=cfg.fold)
        if cfg.tune_cases:  # a sweep run: the tune cases leave training and take the val split's place
            train_rows, val_rows = _split_tune(cfg, data, train_rows)
        if cfg.train_cases is not None:  # the data-efficiency axis: a nested subset of the cases
            try:
                keep = train_case_subset(data.cases("train", cfg.fold), cfg.train_cases, seed=cfg.seed)
            except InputError as exc:  # the count is fine as a number; it is this folder that is short
                raise InputError(data.root, f"train_cases: {exc.problem}") from None
            train_rows = train_rows[train_rows["case"].isin(keep)]
    if len(train_rows) == 0:  # before the feature cache, which cannot cache nothing
        raise InputError(
            data.root, "no slice to train on: the train split has no case, or none of its slices was kept"
        )
    if val_rows is None:
        val_rows = data.slices("val", kept_only=True, fold=cfg.fold)
    val_rows = val_rows.iloc[even_sample(val_rows, cfg.val_max_slices)].reset_index(drop=True)
    return train_rows.reset_index(drop=True), val_rows


def _split_tune(
    cfg: TrainConfig, data: PreparedData, rows: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training rows without the tune cases, the tune cases' kept rows) of a sweep run.

    Raises:
        InputError: a tune case that is not a training case, or no training case left.
    """
    train = set(data.cases("train", cfg.fold))
    stray = sorted(set(cfg.tune_cases) - train)
    if stray:
        raise InputError(data.root, f"tune_cases: {stray[0]!r} is not a training case (of the fold)")
    if not train - set(cfg.tune_cases):
        raise InputError(
            data.root, "tune_cases: every training case is a tune case; none is left to train on"
        )
    tune = rows["case"].isin(cfg.tune_cases)
    return rows[~tune], rows[tune]


def budget_slices(cfg: TrainConfig, data: PreparedData) -> int | None:
    """The slices whose ``epochs`` passes make the run's step budget: the whole training set's (of
    the fold) for a ``train_cases`` subset or a sweep run (``tune_cases``) under ``budget: steps``,
    so a sweep point trains for the steps of the run its rate is chosen for; None: the run's own slices."""
    if cfg.budget != "steps" or (cfg.train_cases is None and not cfg.tune_cases):
        return None
    return len(data.slices("train", kept_only=True, fold=cfg.fold))


def build_preprocessing(cfg: TrainConfig, data: PreparedData, loaded: LoadedModel) -> Preprocessing:
    """How this run turns slices into model input (recorded in run.json; segment and evaluate reuse
    it): the prepared data's window, the input channels with today's HU windows, the model's side and
    normalisation, and for ``neighbors`` the min/median/max spacing of neighbouring slices (mm)."""
    mode = cfg.input_channels
    spacing = None
    if mode == "neighbors":
        dz = data.manifest["spacing_z"].astype(float)
        spacing = [float(dz.min()), float(dz.median()), float(dz.max())]
    return Preprocessing(
        window=data.window,
        input_channels=mode,
        channel_windows=[dict(w) for w in WINDOWS] if needs_hu(mode) else None,
        image_size=loaded.image_size,
        mean=list(loaded.mean),
        std=list(loaded.std),
        neighbor_spacing_mm=spacing,
    )


def build_loader(cfg: TrainConfig, data, rows, features, size: int, preprocessing: Preprocessing, acc=None):
    """The training slices' loader and its sampler (whose order is a function of (seed, epoch)).

    On CUDA batches come in pinned memory (the loop copies them without blocking); with
    ``acc`` given, the worker count follows the device (:func:`worker_count`).
    """
    dataset = SliceDataset(
        data,
        "train",
        size=size,
        features=features,
        rows=rows,
        channels=cfg.input_channels,
        windows=preprocessing.windows,
    )
    device = acc.device if acc is not None else torch.device("cpu")
    workers = worker_count(cfg, device, acc.num_processes if acc is not None else 1)
    sampler = EpochSampler(len(dataset), cfg.seed)
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=device.type == "cuda",
    )
    return loader, sampler


def build_resident(cfg: TrainConfig, loader: DataLoader, device: torch.device) -> ResidentData | None:
    """Hold the training rows on the device when the features are cached and
    ``feature_cache_on_device`` says so; the loader then serves indices only."""
    dataset = loader.dataset
    if dataset.features is None or not wants_resident(
        cfg.feature_cache_on_device, device, resident_bytes(dataset)
    ):
        return None
    resident = load_resident(dataset, device)
    dataset.index_only = True
    return resident


def build_schedule(
    cfg: TrainConfig, n_slices: int, num_processes: int, n_budget: int | None = None
) -> tuple[int, int]:
    """(total optimizer steps, epochs) of a run over ``n_slices`` training slices.

    Counted in global batches (batch_size slices on each of the processes): Accelerate's loader
    gives each process every num_processes-th batch, so a run's steps and epochs depend on the
    global batch only, not on how it is split over processes.

    Args:
        n_budget: the slices whose ``epochs`` passes set the step budget (``budget: steps`` with a
            ``train_cases`` subset: the whole training set's); None: ``n_slices``. The run then
            makes as many passes over its own ``n_slices`` as those steps take.
    """
    global_batch = cfg.batch_size * num_processes
    budget_per_epoch = math.ceil((n_budget or n_slices) / global_batch)
    total_steps = min(cfg.max_steps or 10**12, budget_per_epoch * cfg.epochs)
    return total_steps, math.ceil(total_steps / math.ceil(n_slices / global_batch))


def param_groups(cfg: TrainConfig, model: nn.Module) -> list[dict]:
    """The optimizer's parameter groups: the strategy's own trainables at its ``lr``, the decoder at
    ``decoder_lr`` (the same rate in every strategy); a group with nothing trainable is left out.

    The decoder is the model family's ``decoder`` part (:meth:`ModelFamily.parts`), so no attribute
    path of a particular model is named here.

    Returns:
        ``[{"name", "lr", "params": [Parameter, ...]}]``, strategy group first; [] when nothing trains.
    """
    decoder = {id(p) for p in parameters_of(family_of(model).parts(model).decoder)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"name": "strategy", "lr": resolve_lr(cfg), "params": [p for p in trainable if id(p) not in decoder]},
        {
            "name": "decoder",
            "lr": float(cfg.decoder_lr),
            "params": [p for p in trainable if id(p) in decoder],
        },
    ]
    return [g for g in groups if g["params"]]


def group_record(optimizer: torch.optim.Optimizer | None) -> list[dict]:
    """run.json's ``param_groups``, read from the optimizer itself: ``[{name, lr, params}]`` with
    ``lr`` the group's peak rate and ``params`` its number of weights; [] when nothing trains."""
    if optimizer is None:
        return []
    return [
        {
            "name": g["name"],
            "lr": float(g.get("initial_lr", g["lr"])),  # the scheduler keeps the peak in initial_lr
            "params": sum(p.numel() for p in g["params"]),
        }
        for g in optimizer.param_groups
    ]


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    """The linear warm-up's length in optimizer steps: ``warmup_fraction`` of the run's steps, or
    the fixed ``warmup_steps`` of a config that sets it (older runs), never past the run's end."""
    if cfg.warmup_steps is not None:
        return min(cfg.warmup_steps, total_steps)
    return min(round(cfg.warmup_fraction * total_steps), total_steps)


def build_optimizer(cfg: TrainConfig, model: nn.Module, total_steps: int, num_processes: int):
    """AdamW over :func:`param_groups` and its warm-up + cosine schedule; (None, None) when nothing
    trains (zero-shot)."""
    groups = param_groups(cfg, model)
    if not groups:
        return None, None
    from transformers import get_cosine_schedule_with_warmup

    # torch keeps a group's extra keys ("name"), so the optimizer itself says which group is which.
    optimizer = make_optimizer(groups, lr=groups[0]["lr"], weight_decay=cfg.weight_decay)
    # Accelerate's AcceleratedScheduler (split_batches=False) steps the wrapped scheduler once per
    # process at every optimizer step, so the schedule is sized in those ticks, as Accelerate's and
    # transformers' no_trainer examples do: the learning rate after k optimizer steps is then the
    # same rational function of k on any number of processes (the lr column of history.csv).
    ticks = num_processes
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, warmup_steps(cfg, total_steps) * ticks, total_steps * ticks
    )
    return optimizer, scheduler


def build_training(
    cfg: TrainConfig,
    acc,
    *,
    loaded: LoadedModel | None = None,
    train_rows: pd.DataFrame | None = None,
) -> TrainingSetup:
    """Build everything a run trains with, in the order that keeps runs reproducible.

    Args:
        cfg: the run's config.
        acc: the Accelerator (:func:`make_accelerator`).
        loaded: a model with its strategy already applied (see :func:`build_model`).
        train_rows: train on these manifest rows instead of the split's kept slices.
    """
    data = build_data(cfg)
    check_memory(cfg, len(data.slices("train")), acc.device)
    loaded, counts = build_model(cfg, acc, loaded)
    prompt = build_prompts(cfg, loaded, acc.device)
    train_rows, val_rows = build_rows(cfg, data, train_rows)
    preprocessing = build_preprocessing(cfg, data, loaded)
    features, val_features, infos = None, None, {}
    if not vision_trainable(loaded.model) and cfg.feature_cache:
        features, val_features, infos = _cache_frozen_vision(
            cfg, acc, data, loaded, train_rows, val_rows, preprocessing
        )
    loader, sampler = build_loader(cfg, data, train_rows, features, loaded.image_size, preprocessing, acc)
    resident = build_resident(cfg, loader, acc.device)
    total_steps, n_epochs = build_schedule(cfg, len(sampler), acc.num_processes, budget_slices(cfg, data))
    module = PromptedModule(loaded.model, prompt.tokens["input_ids"], prompt.tokens["attention_mask"])
    if cfg.compile:  # in place, so Accelerate/DDP still wrap an ordinary module (measured in benchmarks/)
        module.compile()
    optimizer, scheduler = build_optimizer(cfg, loaded.model, total_steps, acc.num_processes)
    if optimizer is not None:  # the loop moves batches itself: selecting pairs needs them on the host
        module, optimizer, loader, scheduler = acc.prepare(
            module, optimizer, loader, scheduler, device_placement=[True, True, False, True]
        )
    precision = acc.mixed_precision if acc.native_amp else "no"
    segmenter = Segmenter.of(
        loaded, organs=prompt.organs, prompts=prompt.texts, device=acc.device, precision=precision
    )
    return TrainingSetup(
        cfg=cfg,
        accelerator=acc,
        data=data,
        loaded=loaded,
        organs=prompt.organs,
        counts=counts,
        module=module,
        optimizer=optimizer,
        scheduler=scheduler,
        loader=loader,
        sampler=sampler,
        prompt_emb=prompt.features,
        train_rows=train_rows,
        val_rows=val_rows,
        train_check=even_sample(train_rows, cfg.val_max_slices),
        features=features,
        val_features=val_features,
        cache_infos=infos,
        preprocessing=preprocessing,
        segmenter=segmenter,
        timer=StepTimer(acc.device, exact=cfg.profile_sync),
        audit=GradientAudit.start(loaded.model),
        total_steps=total_steps,
        n_epochs=n_epochs,
        precision=precision,
        tf32=acc.device.type == "cuda" and cfg.tf32,
        pair_chunk=resolve_pair_chunk(cfg, acc.device),
        resident=resident,
    )


def _cache_frozen_vision(
    cfg: TrainConfig, acc, data: PreparedData, loaded: LoadedModel, train_rows, val_rows, preprocessing
):
    """Vision activations of the train rows and the val sample, built once and shared.

    Every process asks for the cache; the first to take the build lock builds it, the others wait
    for it (as long as it makes progress, however long the build takes: no collective with a fixed
    timeout) and then read it. The training rows are read from the cache of the split's whole kept
    set, so runs on nested ``train_cases`` subsets share one file.
    """
    precision = acc.mixed_precision if acc.native_amp else "no"
    # What the activations depend on: the cache key hashes the same inputs the builder uses.
    inputs = {
        "data": data,
        "size": loaded.image_size,
        "mean": loaded.mean,
        "std": loaded.std,
        "dtype": cfg.feature_cache_dtype,
        "channels": cfg.input_channels,
        "windows": preprocessing.windows,
        "precision": precision,
    }
    # One key for both row sets: it hashes the whole vision encoder (344 MB for rd64).
    key = cache_key(loaded.model, **inputs)
    build = functools.partial(
        build_feature_cache,
        loaded.model,
        **inputs,
        device=acc.device,
        show_progress=acc.is_main_process,
        key=key,
        root=cache_root(data, cache_dir=cfg.cache_dir, beside=cfg.out),
    )
    features = val_features = None
    infos: dict[str, CacheInfo] = {}
    if not cfg.augment:  # augmented images change every epoch: their encodings cannot be cached
        features, infos["train_kept"] = _train_features(build, data, train_rows, cfg.fold)
    if len(val_rows) and cfg.tune_cases:  # a sweep run's tune cases are training cases: rows of that cache
        val_features, infos["val_kept"] = _train_features(build, data, val_rows, cfg.fold)
    elif len(val_rows):
        val_features, infos["val_kept"] = build(rows=val_rows, name="val_kept" + fold_suffix(cfg.fold))
    acc.wait_for_everyone()
    return features, val_features, infos


def _train_features(build, data: PreparedData, train_rows, fold: int | None = None):
    """Features of rows of the training cases: rows of the whole kept train split's (or fold's) cache
    when every row is one of them (the default, any ``train_cases`` subset, a sweep run's training and
    tune rows), else a cache of their own. One encoding per slice, whichever runs share it."""
    kept = data.slices("train", kept_only=True, fold=fold)
    position = {(str(c), int(z)): i for i, (c, z) in enumerate(zip(kept["case"], kept["z"]))}
    wanted = [position.get((str(c), int(z))) for c, z in zip(train_rows["case"], train_rows["z"])]
    if None in wanted:  # rows from elsewhere (e.g. a benchmark's own): a file named after them
        digest = hashlib.blake2b(str(train_rows[["case", "z"]].values.tolist()).encode(), digest_size=6)
        return build(rows=train_rows, name=f"train_rows_{digest.hexdigest()}")
    full, info = build(rows=kept, name="train_kept" + fold_suffix(fold))
    if wanted == list(range(len(kept))):
        return full, info
    return full.take(wanted), info
