"""One validated config object per training run, loaded from YAML with CLI overrides.

The resolved config is saved as ``config.yaml`` in every run folder, so each number a report shows
traces back to the exact settings (and, via ``run.json``, the exact commit).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from clipseg_bench.errors import FieldError, InputError
from clipseg_bench.provenance import write_text_atomic


class TrainConfig(BaseModel):
    """Everything that decides what a training run does. Field descriptions are the docs."""

    # Numbers are finite (``inf``/``nan`` refused) and whole-number fields take integers only: YAML
    # 1.1 reads ``yes``/``no`` as booleans, which pydantic's lax mode would turn into 1 and 0.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    data: str = Field(description="PREPARED folder written by `clipseg-bench prepare`.")
    out: str = Field(description="Run folder to write (config, weights, history, metrics).")
    model: str = Field("tiny", description="Hub id, local save_pretrained folder, or `tiny`.")
    strategy: str = Field("full", description="Registered strategy name (see `clipseg-bench strategies`).")
    strategy_options: dict[str, Any] = Field(
        default_factory=dict, description="Strategy-specific options, e.g. {rank: 8} for lora."
    )
    epochs: int = Field(20, strict=True, ge=1, description="Passes over the training slices.")
    max_steps: int | None = Field(
        None, strict=True, ge=1, description="Stop after this many optimizer steps (short runs)."
    )
    batch_size: int = Field(
        8, strict=True, ge=1, description="Slices per step; each slice brings its organ prompts."
    )
    lr: float | None = Field(
        None,
        gt=0,
        description="Peak learning rate of the strategy's own trainables (encoders, adapters, LoRA, "
        "biases); None takes the strategy default. The decoder trains at `decoder_lr`.",
    )
    decoder_lr: float = Field(
        1e-3,
        gt=0,
        description="Peak learning rate of the decoder, the same in every strategy (CLIPSeg's own 1e-3), "
        "so that strategies differ in what else trains, not in how fast the shared decoder learns.",
    )
    weight_decay: float = Field(1e-4, ge=0)
    warmup_fraction: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Linear warm-up before the cosine decay, as a share of the run's optimizer steps "
        "(so a short run is not left inside its warm-up).",
    )
    warmup_steps: int | None = Field(
        None,
        strict=True,
        ge=0,
        description="A fixed warm-up length in optimizer steps instead of `warmup_fraction` (runs "
        "from before the fraction recorded one); None: use the fraction.",
    )
    budget: Literal["steps", "epochs"] = Field(
        "steps",
        description="With `train_cases`: `steps` gives every training-set size the optimizer steps of "
        "the whole training set (`epochs` passes over all its slices, capped by `max_steps`), so a "
        "1-case run anneals like the full one; `epochs` makes `epochs` passes over the subset's own "
        "slices. The same without `train_cases`.",
    )
    grad_clip: float = Field(1.0, ge=0, description="Max gradient norm; 0 disables clipping.")
    bce_weight: float = Field(1.0, ge=0)
    dice_weight: float = Field(1.0, ge=0)
    absent_fraction: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Share of absent-organ (slice, prompt) pairs trained on, to learn 'empty'.",
    )
    image_size: int | None = Field(
        None, strict=True, ge=16, description="Square input side; None takes the model's."
    )
    prompt_template: str = Field("name", description="`name`, `photo`, `ct` or a template with {organ}.")
    organs: list[str] | None = Field(None, description="Organ keys to train on; None means all 13.")
    train_cases: int | None = Field(
        None,
        strict=True,
        ge=1,
        description="Train on this many of the train split's cases (a subset fixed by the seed; a "
        "larger count contains a smaller one); None: all of them. The val split (or fold) never changes.",
    )
    fold: int | None = Field(
        None,
        strict=True,
        ge=0,
        description="With a folder prepared with --folds K: train on every non-test case outside this "
        "fold (0..K-1) and validate on the fold's cases; None: the folder's train/val split.",
    )
    tune_cases: list[str] | None = Field(
        None,
        description="A learning-rate sweep run (`benchmark --lr-sweep`): train on the training cases "
        "(of the fold) minus these and validate on these instead of the val split (or fold), whose "
        "arrays are then never opened; None: an ordinary run.",
    )
    seed: int = Field(
        0, ge=0, strict=True, description="Seed of the run (weights of injected modules, order, dropout)."
    )
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto",
        description="Autocast (Accelerate in training; the same in validation, evaluate, segment and the "
        "feature cache): `auto` is bf16 on a CUDA device that supports it and fp32 (`no`) elsewhere.",
    )
    tf32: bool = Field(
        True, description="On CUDA, run float32 matmuls and convolutions in TF32 (no effect on CPU)."
    )
    num_workers: int | None = Field(
        None,
        strict=True,
        ge=0,
        description="DataLoader workers; None: 4 per process on CUDA (at most the CPU cores per process), "
        "0 on CPU. Workers read the prepared arrays and the feature cache through their own memory maps.",
    )
    log_every: int = Field(
        50,
        strict=True,
        ge=1,
        description="Read the loss and Dice the device accumulates every N steps (and at each epoch end): "
        "the progress bar's value; no per-step wait for the device.",
    )
    profile_sync: bool = Field(
        False,
        description="Time each step phase exactly by synchronising the device around it (slower; on CUDA "
        "the default reads CUDA events without waiting).",
    )
    threads: int | None = Field(
        None,
        strict=True,
        ge=1,
        description="CPU threads for torch ops; None keeps torch's default (all cores).",
    )
    augment: bool = Field(
        False,
        description="Random contrast/brightness/noise on training slices (no flips: left/right matter); "
        "turns the training feature cache off.",
    )
    feature_cache: bool = Field(True, description="Cache frozen encoder outputs once, on disk.")
    feature_cache_on_device: Literal["auto", "yes", "no"] = Field(
        "auto",
        description="Decoder-only: hold the feature cache and the labels on the device (`auto`: on CUDA when "
        "they fit in half the free device memory); otherwise batches are read from the memory-mapped cache "
        "and copied from pinned memory.",
    )
    feature_cache_dtype: Literal["fp16", "fp32"] = Field(
        "fp16",
        description="Precision of the cached encoder outputs: fp16 halves the cache (benchmarks/README.md "
        "measures what it costs in Dice); fp32 equals computing them live.",
    )
    pair_chunk: int | None = Field(
        None,
        strict=True,
        ge=0,
        description="When no encoder trains, decode at most this many (slice, organ) pairs at a time "
        "and accumulate their gradients (exact; bounds decoder memory). 0: all at once. None: 16 on CPU "
        "(the decoder's memory, benchmarks/README.md), all at once on CUDA (each chunk costs kernel "
        "launches the device waits for).",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute encoder activations in backward.")
    compile: bool = Field(
        False, description="torch.compile the training forward (needs a C++ compiler on CPU)."
    )
    val_every: int = Field(
        1, strict=True, ge=0, description="Validate every N epochs (0: never during training)."
    )
    val_max_slices: int | None = Field(
        None, strict=True, ge=1, description="Cap val slices per validation (speed)."
    )
    threshold: float = Field(0.5, gt=0, lt=1, description="Probability above which a pixel is foreground.")
    cache_dir: str | None = Field(
        None,
        description="Folder of the frozen-feature cache (shared by runs of the same data and model); "
        "None: $CLIPSEG_BENCH_CACHE, else PREPARED/feature_cache when it can be written, else "
        "feature_cache/ beside the run folder (model/feature_cache.py).",
    )
    input_channels: Literal["gray", "neighbors", "windows"] = Field(
        "gray",
        description="What CLIPSeg's R, G, B hold: `gray` the windowed slice three times (the original "
        "study); `neighbors` slices z-1, z, z+1 (edges repeated); `windows` the slice under three HU "
        "windows (needs a folder prepared with the HU cache). See data/channels.py.",
    )

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_not_booleans(cls, v: Any, info) -> Any:
        # Integer fields are strict; a float field would still take a YAML `yes` as 1.0.
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(v, bool) and annotation in (float, float | None):
            raise ValueError(f"expected a number, got {v!r} (YAML reads yes/no/on/off as booleans)")
        return v

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, v: str) -> str:
        from clipseg_bench.strategies import available

        if v not in available():
            raise ValueError(f"unknown strategy {v!r}; available: {', '.join(available())}")
        return v

    @field_validator("organs")
    @classmethod
    def _known_organs(cls, v: list[str] | None) -> list[str] | None:
        from clipseg_bench.organs import organ

        if v is None:
            return v
        if not v:
            raise ValueError("needs at least one organ (leave it unset for all 13)")
        for ref in v:
            try:
                organ(ref)
            except InputError as exc:
                raise ValueError(exc.problem) from None
        return v

    @field_validator("prompt_template")
    @classmethod
    def _template_has_organ(cls, v: str) -> str:
        from clipseg_bench.organs import PROMPT_TEMPLATES

        if v not in PROMPT_TEMPLATES and "{organ}" not in v:
            raise ValueError(
                f"{v!r} is neither {', '.join(PROMPT_TEMPLATES)} nor a template with an {{organ}} placeholder"
            )
        return v

    @model_validator(mode="after")
    def _strategy_options_fit(self) -> TrainConfig:
        # Fail at config time, not minutes later after the model has loaded.
        from clipseg_bench.strategies import get

        get(self.strategy).parse_options(self.strategy_options)
        return self


# How a run is carried out, not what it computes: a resumed or re-run run may change these.
RUNTIME_FIELDS = (
    "out",
    "num_workers",
    "threads",
    "cache_dir",
    "log_every",
    "profile_sync",
    "feature_cache_on_device",
)


def config_differences(saved: TrainConfig, other: TrainConfig, fields=None) -> list[tuple[str, Any, Any]]:
    """The fields (of ``fields``, default all) where two configs would train differently.

    Returns:
        ``(field, saved value, other value)`` in field order; :data:`RUNTIME_FIELDS` never count, and
        ``data`` compares the folders, not how their paths are spelled.
    """
    saved, other = resolved(saved), resolved(other)  # an unset rate means the strategy's default
    diffs = []
    for field in TrainConfig.model_fields:
        if field in RUNTIME_FIELDS or (fields is not None and field not in fields):
            continue
        a, b = getattr(saved, field), getattr(other, field)
        same = Path(a).resolve() == Path(b).resolve() if field == "data" else a == b
        if not same:
            diffs.append((field, a, b))
    return diffs


def legacy_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """The fields a run folder's saved config.yaml leaves out, as they were when it was written: a
    run from before parameter groups trained its decoder at its one ``lr``, and one from before
    ``budget`` trained a ``train_cases`` subset for ``epochs`` passes (a saved ``warmup_steps``
    count is kept as it is). Returns only those fields ({} for a config written today)."""
    legacy = {}
    if "decoder_lr" not in values and values.get("lr") is not None:
        legacy["decoder_lr"] = values["lr"]
    if "budget" not in values:
        legacy["budget"] = "epochs"
    return legacy


def resolve_lr(cfg: TrainConfig) -> float:
    """The peak learning rate a run uses: its own, else its strategy's default (in the strategy's file)."""
    from clipseg_bench.strategies import get

    return float(cfg.lr) if cfg.lr is not None else float(get(cfg.strategy).lr)


def resolved(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with every default that depends on other fields filled in (the learning rate): what a
    run folder's config.yaml records, so that no value there stays ``null``."""
    return cfg.model_copy(update={"lr": resolve_lr(cfg)})


def read_yaml_config(path: str | Path) -> dict[str, Any]:
    """The field: value mapping of a YAML config file (not yet validated)."""
    p = Path(path)
    try:
        loaded = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise InputError(p, "config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(p, f"cannot read the config file ({exc.__class__.__name__}: {exc})") from None
    except yaml.YAMLError as exc:
        raise InputError(p, f"not valid YAML ({str(exc).splitlines()[0]})") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise InputError(p, "config must be a YAML mapping of field: value")
    return loaded or {}


def load_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    *,
    base: Mapping[str, Any] | None = None,
) -> TrainConfig:
    """Build a TrainConfig from an optional YAML file plus overrides (CLI flags win; None is 'unset').

    Args:
        path: YAML file of TrainConfig fields.
        overrides: field values that win over the file's; None values are ignored.
        base: values beneath the file's (a run's saved config, for ``--resume``).

    Raises:
        FieldError: a bad override, or a required field that is missing, naming the field (the CLI
            names the flag it came from).
        InputError: a bad value from the file, naming the file; from ``base``, naming ``config``.
    """
    values: dict[str, Any] = dict(base or {})
    from_file = read_yaml_config(path) if path is not None else {}
    values.update(from_file)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    values.update(given)
    try:
        return TrainConfig(**values)
    except InputError as exc:  # raised by a strategy's option parser, naming the field
        raise _blame((exc.path,), exc.problem, path, from_file, given, base) from None
    except ValidationError as exc:
        err = exc.errors()[0]
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "int_type" and isinstance(err.get("input"), bool | str | float):
            msg += f", got {err['input']!r}" + (
                " (YAML reads yes/no/on/off as booleans)" if isinstance(err["input"], bool) else ""
            )
        if err["type"] == "missing":
            msg = f"required: {TrainConfig.model_fields[str(err['loc'][0])].description}"
        raise _blame(err["loc"], msg, path, from_file, given, base) from None


def _blame(loc, msg: str, path, from_file: dict, given: dict, base) -> InputError:
    """The error for a bad value: naming its field when it was given as an override (or is a missing
    required field), else the file it came from, else ``config`` (a resumed run's saved value)."""
    field = str(loc[0]) if loc else ""
    where = ".".join(str(x) for x in loc) or "config"
    from_base = field in (base or {}) and field not in from_file
    if field in given or (field and field not in from_file and not from_base):
        rest = ".".join(str(x) for x in loc[1:])
        return FieldError(field, f"{rest}: {msg}" if rest else msg)
    if path is not None and field in from_file:
        return InputError(str(path), f"{where}: {msg}")
    return InputError("config", f"{where}: {msg}")


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    write_text_atomic(Path(path), yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
