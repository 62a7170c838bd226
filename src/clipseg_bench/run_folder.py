"""RUN/: the one module that names, reads and writes a run folder's files.

A run folder is what ``train`` writes and everything later reads (``evaluate``, ``segment``,
``benchmark``, ``report``, the demo). Its files:

- ``config.yaml``: the validated :class:`~clipseg_bench.config.TrainConfig`, every value resolved
  (the learning rate the run used, never ``null``);
- ``run.json``: the :class:`RunRecord`: status (:class:`RunStatus`), what ran, where, with which
  preprocessing (:class:`Preprocessing`), timing, final scores, the gradient audit;
- ``history.csv``, ``weights.safetensors``, ``checkpoints/last/`` (resume), ``tb/`` (TensorBoard);
- from ``evaluate``: ``metrics.json`` and ``samples.npz`` (the val split: with folds, the run's own
  fold, scored out of fold); ``metrics-test.json`` and ``samples-test.npz`` from ``evaluate --split
  test`` (``metrics-train.json`` from ``--split train``), so a test score never replaces the val one;
- from ``benchmark --postprocess auto``: ``postprocess.json``, the per-organ 3D clean-up chosen on
  out-of-fold scores, with the data it was chosen on (``segment`` and ``evaluate --postprocess auto``
  apply it).

Like nnU-Net's output folder, a run carries what is needed to use it again: :meth:`RunFolder.preprocessing`
says how to turn a new CT into model input exactly as training did, and ``segment``, ``evaluate``,
validation and the feature cache all take their windows from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import pandas as pd

from clipseg_bench.errors import InputError
from clipseg_bench.provenance import read_json_object, write_json_atomic

CONFIG = "config.yaml"
RECORD = "run.json"
HISTORY = "history.csv"
WEIGHTS = "weights.safetensors"
METRICS = "metrics.json"
SAMPLES = "samples.npz"
POSTPROCESS_CHOICE = "postprocess.json"
CHECKPOINT = "checkpoints/last"
TENSORBOARD = "tb"
TRAIN_LOCK = "train"  # the command whose lock (provenance.output_lock) a live `train` holds in its run folder

HISTORY_COLUMNS = ["epoch", "step", "loss", "train_dice", "val_dice", "epoch_time_s", "lr"]


class RunStatus(str, Enum):
    """A run's status. ``train`` writes the first four into run.json; the others are how a reader sees
    a folder: ``killed`` (run.json says running but its process is gone), ``missing`` (no run.json),
    ``not started`` (a benchmark cell without a folder), ``evaluated`` (finished, with metrics.json)."""

    RUNNING = "running"
    INTERRUPTED = "interrupted"
    FINISHED = "finished"
    FAILED = "failed"
    KILLED = "killed"
    MISSING = "missing"
    NOT_STARTED = "not started"
    EVALUATED = "evaluated"

    def __str__(self) -> str:  # f-strings and CSV cells show the value
        return self.value


@dataclass
class Preprocessing:
    """Everything that turns a CT into this run's model input, as training did it.

    Attributes:
        window: the prepared data's intensity window (``{"mode": "hu", "level", "width"}`` or
            ``{"mode": "minmax"}``), which makes the uint8 gray slices.
        input_channels: ``gray`` | ``neighbors`` | ``windows`` (data/channels.py).
        channel_windows: the three HU windows of ``windows`` (R, G, B); None for the other modes.
        image_size: the square side the model is fed (px); None when unknown (a run from before it
            was recorded: the model's own).
        mean, std: the model's per-channel normalisation; None when unknown (likewise).
        neighbor_spacing_mm: for ``neighbors``, the min/median/max distance of neighbouring
            training slices; None otherwise.
    """

    window: dict
    input_channels: str = "gray"
    channel_windows: list | None = None
    image_size: int | None = None
    mean: list | None = None
    std: list | None = None
    neighbor_spacing_mm: list | None = None

    @property
    def windows(self) -> list:
        """The HU windows of ``windows`` mode: the recorded ones, else today's (equal for every run so far)."""
        from clipseg_bench.data.channels import WINDOWS

        return list(self.channel_windows) if self.channel_windows is not None else list(WINDOWS)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, doc: dict) -> Preprocessing:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in known})


# run.json keys that RunRecord types; anything else is kept as it is in ``extra``.
_RECORD_KEYS = (
    "status",
    "strategy",
    "seed",
    "model",
    "model_family",
    "git",
    "hardware",
    "params",
    "lr",
    "param_groups",
    "preprocessing",
    "compute",
    "cases",
    "validation",
    "vision_features",
    "train_case_ids",
    "data",
    "fold",
    "folds",
    "val_case_ids",
    "process",
    "timing",
    "final",
    "gradient_audit",
    "rank_checksums",
    "error",
)
# Where runs from before the preprocessing block kept its parts (top level of run.json).
_LEGACY_PREPROCESSING = ("window", "input_channels", "channel_windows", "neighbor_spacing_mm")


@dataclass
class RunRecord:
    """run.json, typed. Fields a run has not reached yet (``timing``, ``final``) are None and are not
    written; unknown keys (a newer version's) are kept in ``extra`` and written back unchanged."""

    status: RunStatus = RunStatus.RUNNING
    strategy: str | None = None
    seed: int | None = None
    model: str | None = None
    model_family: str | None = None  # the family's name (`sam3`, `clipseg`): the report's `family`
    git: dict | None = None
    hardware: dict | None = None
    params: dict | None = None
    lr: float | None = None
    param_groups: list | None = None
    preprocessing: Preprocessing | None = None
    compute: dict | None = None
    cases: dict | None = None
    validation: dict | None = None
    vision_features: dict | None = None
    train_case_ids: list | None = None
    data: dict | None = None
    fold: int | None = None
    folds: int | None = None
    val_case_ids: list | None = None
    process: dict | None = None
    timing: dict | None = None
    final: dict | None = None
    gradient_audit: dict | None = None
    rank_checksums: list | None = None
    error: str | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        doc: dict[str, Any] = {}
        for key in _RECORD_KEYS:
            value = getattr(self, key)
            if value is None:  # not reached yet (or unknown): not written, as before the record was typed
                continue
            if isinstance(value, Preprocessing):
                value = value.to_dict()
            doc[key] = value.value if isinstance(value, RunStatus) else value
        return {**doc, **self.extra}

    @classmethod
    def from_dict(cls, doc: dict) -> RunRecord:
        """Read run.json's object, old layouts included (the preprocessing at the top level)."""
        values = {k: doc[k] for k in _RECORD_KEYS if k in doc}
        extra = {k: v for k, v in doc.items() if k not in _RECORD_KEYS and k not in _LEGACY_PREPROCESSING}
        if "preprocessing" in values and isinstance(values["preprocessing"], dict):
            values["preprocessing"] = Preprocessing.from_dict(values["preprocessing"])
        elif "window" in doc:
            values["preprocessing"] = Preprocessing.from_dict(
                {k: doc[k] for k in _LEGACY_PREPROCESSING if k in doc}
            )
        else:
            values["preprocessing"] = None
        status = str(values.get("status", "unknown"))
        values["status"] = RunStatus(status) if status in RunStatus._value2member_map_ else status
        return cls(**values, extra=extra)

    def groups(self) -> list[dict]:
        """The run's parameter groups ``[{name, lr, params}]``; a run recorded before groups existed
        trained every parameter at its one ``lr``: one group named ``all``."""
        if self.param_groups is not None:
            return list(self.param_groups)
        trainable = (self.params or {}).get("trainable", 0)
        return [{"name": "all", "lr": self.lr, "params": trainable}] if trainable else []

    def with_status(self, status: RunStatus, **changes) -> RunRecord:
        """A copy with another status and some fields changed (``error=``, ``gradient_audit=``...)."""
        return dataclasses.replace(self, status=status, **changes)


class RunFolder:
    """A run folder (RUN/): the only code that names its files or reads and writes them.

    Args:
        path: the folder.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # --- the files --------------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def record_path(self) -> Path:
        return self.path / RECORD

    @property
    def history_path(self) -> Path:
        return self.path / HISTORY

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    @property
    def samples_path(self) -> Path:
        return self.path / SAMPLES

    def metrics_file(self, split: str = "val") -> Path:
        """``evaluate --split``'s metrics: metrics.json for val (out of fold with folds), else
        metrics-<split>.json."""
        return self.metrics_path if split == "val" else self.path / f"metrics-{split}.json"

    def samples_file(self, split: str = "val") -> Path:
        """``evaluate --split``'s overlay slices: samples.npz for val, else samples-<split>.npz."""
        return self.samples_path if split == "val" else self.path / f"samples-{split}.npz"

    @property
    def postprocess_path(self) -> Path:
        return self.path / POSTPROCESS_CHOICE

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / TENSORBOARD

    def files(self) -> list[Path]:
        """Every file the run folder holds now (what a command that reads it must not overwrite)."""
        return sorted(p for p in self.path.rglob("*") if p.is_file()) if self.path.is_dir() else []

    # --- reading ---------------------------------------------------------------------------------

    def has_record(self) -> bool:
        return self.record_path.is_file()

    def has_config(self) -> bool:
        return self.config_path.is_file()

    def has_metrics(self, split: str = "val") -> bool:
        return self.metrics_file(split).is_file()

    def config(self):
        """The run's config (config.yaml), validated.

        Raises:
            InputError: no config.yaml (not a run folder), or one that does not validate.
        """
        from clipseg_bench.config import load_config

        if not self.has_config():
            raise InputError(
                self.path, "not a run folder (no config.yaml); train one with `clipseg-bench train`"
            )
        from clipseg_bench.config import legacy_values, read_yaml_config

        # the file's own values win (and a bad one names the file); beneath them what it left out
        # meant when it was written
        return load_config(self.config_path, base=legacy_values(read_yaml_config(self.config_path)))

    def refuse_other_config(self, cfg, hint: str) -> None:
        """Refuse to reuse this folder for ``cfg`` when the run in it was trained with other settings.

        Args:
            cfg: the TrainConfig a call would train here.
            hint: what to do instead, ending the message.

        Raises:
            InputError: naming the folder, the first differing field with both values, and ``hint``.
        """
        from clipseg_bench.config import config_differences

        if not self.has_config():
            return
        diffs = config_differences(self.config(), cfg)
        if diffs:
            field, old, new = diffs[0]
            raise InputError(
                self.path, f"was run with {field}={old!r}, this call asks {field}={new!r}: {hint}"
            )

    def record(self) -> RunRecord:
        """run.json as a :class:`RunRecord` (a folder without one: status ``missing``)."""
        if not self.has_record():
            return RunRecord(status=RunStatus.MISSING)
        return RunRecord.from_dict(read_json_object(self.record_path))

    def status(self) -> RunStatus | str:
        """run.json's status (``missing`` without one); ``evaluated`` for a finished run with metrics.json."""
        status = self.record().status
        if status == RunStatus.FINISHED and self.has_metrics():
            return RunStatus.EVALUATED
        return status

    def preprocessing(self) -> Preprocessing:
        """How this run turned CT slices into model input (run.json), for evaluate, segment and the cache.

        Runs written before run.json had a ``preprocessing`` block read theirs from its old top-level
        keys (``window``, ``input_channels``: ``gray`` before the field existed, ``channel_windows``);
        a folder without run.json gets the default window and the config's channels.

        Raises:
            InputError: run.json or config.yaml unreadable.
        """
        record = self.record()
        if record.preprocessing is not None:
            return record.preprocessing
        from clipseg_bench.data.volumes import DEFAULT_WINDOW, parse_window

        channels = self.config().input_channels if self.has_config() else "gray"
        return Preprocessing(window=parse_window(DEFAULT_WINDOW), input_channels=channels)

    def prepared(self, override: str | Path | None = None, *, test: bool = False):
        """The PREPARED data this run was trained on (a :class:`~clipseg_bench.data.dataset.PreparedData`),
        wherever it is now.

        Looked for, in order: ``override`` (``evaluate --data``); the folder recorded in run.json
        (resolved when the run started); the same folder relative to this run folder (the run and its
        data moved together, e.g. copied to another machine); config.yaml's ``data`` (runs from
        before run.json recorded it). Whatever is found must be the same prepared data: its
        dataset.json fingerprint (:func:`~clipseg_bench.data.dataset.data_fingerprint`) must be the
        recorded one. ``test`` opens its test split too (``evaluate --split test`` alone).

        Raises:
            InputError: ``override`` is not prepared data, or other data than the run's; or the data
                is nowhere to be found (naming where it was looked for).
        """
        from clipseg_bench.data.dataset import PreparedData

        recorded = self.record().data or {}
        expected = recorded.get("fingerprint")
        if override is not None:
            data = PreparedData(override, test=test)
            if expected and data.fingerprint != expected:
                raise InputError(
                    data.root / "dataset.json",
                    f"is not the prepared data {self.path} was trained on (fingerprint {data.fingerprint}; "
                    f"the run recorded {expected}, from {recorded.get('path')})",
                )
            return data
        places = self._data_places(recorded)
        for place in places:
            if (place / "dataset.json").is_file():
                data = PreparedData(place, test=test)
                if not expected or data.fingerprint == expected:
                    return data
        looked = " nor ".join(str(p) for p in places) or "anywhere (no data recorded)"
        raise InputError(
            self.path,
            f"cannot find the prepared data it was trained on: not at {looked}; pass --data PREPARED",
        )

    def _data_places(self, recorded: dict) -> list[Path]:
        """Where the run's data may be: recorded, relative to the run, config.yaml's (no repeats)."""
        places = []
        if recorded.get("path"):
            places.append(Path(recorded["path"]))
        if recorded.get("relative"):
            places.append(self.path / recorded["relative"])
        if not recorded and self.has_config():
            places.append(Path(self.config().data))
        unique: list[Path] = []
        for place in places:
            if not any(place.absolute() == seen.absolute() for seen in unique):
                unique.append(place)
        return unique

    def history(self) -> pd.DataFrame | None:
        """history.csv (one row per epoch); None when absent or empty.

        Raises:
            InputError: a file pandas cannot read.
        """
        if not self.history_path.is_file():
            return None
        try:
            df = pd.read_csv(self.history_path)
        except pd.errors.EmptyDataError:
            return None
        except (ValueError, OSError, UnicodeDecodeError) as exc:  # pandas' ParserError is a ValueError
            raise InputError(self.history_path, f"not a readable CSV ({str(exc).splitlines()[0]})") from None
        return df if len(df) else None

    def metrics(self, split: str = "val") -> dict | None:
        """metrics.json (or ``split``'s file, :meth:`metrics_file`) from ``evaluate``; None before."""
        return read_json_object(self.metrics_file(split)) if self.has_metrics(split) else None

    def postprocess_choice(self) -> dict | None:
        """postprocess.json: ``{"organs": {organ key: "none" | "lcc"}, "chosen_on": {...}, ...}``, the
        clean-up ``--postprocess auto`` applies; None when no choice was recorded."""
        return read_json_object(self.postprocess_path) if self.postprocess_path.is_file() else None

    # --- writing (train, evaluate) ------------------------------------------------------------------

    def write_config(self, cfg) -> None:
        """config.yaml: the resolved config (atomically)."""
        from clipseg_bench.config import save_config

        save_config(cfg, self.config_path)

    def write_record(self, record: RunRecord) -> None:
        """run.json (atomically)."""
        write_json_atomic(self.record_path, record.to_dict())

    def write_history(self, rows: list[dict]) -> None:
        """history.csv from the loop's per-epoch rows (an empty table with its header for none)."""
        from clipseg_bench.provenance import replacing

        with replacing(self.history_path) as tmp:
            pd.DataFrame(rows, columns=HISTORY_COLUMNS).to_csv(tmp, index=False)

    def write_metrics(self, metrics: dict, split: str = "val") -> None:
        """metrics.json, or ``split``'s file (atomically)."""
        write_json_atomic(self.metrics_file(split), metrics)

    def write_postprocess_choice(self, choice: dict) -> None:
        """postprocess.json (atomically)."""
        write_json_atomic(self.postprocess_path, choice)

    def create(self) -> None:
        """Create the folder (train's first write).

        Raises:
            InputError: the file system refuses.
        """
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(self.path, f"cannot create run folder ({exc.strerror})") from None
