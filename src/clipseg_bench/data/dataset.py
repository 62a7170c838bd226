"""Reading a PREPARED folder for training and evaluation.

A training item is one axial slice with all its organ masks; the trainer turns a batch of B slices
into (slice, organ prompt) pairs. Grouping pairs by slice is what lets every slice be encoded once
per step for all K organs (issue 6) instead of once per pair.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from clipseg_bench.data.channels import CHANNEL_MODES, channel_images, needs_hu
from clipseg_bench.data.prepare import FORMAT
from clipseg_bench.data.splits import SPLITS
from clipseg_bench.errors import FieldError, InputError

# The dtype of each cached array kind: windowed images and labels uint8, the HU slices int16.
ARRAY_DTYPES = {"image": np.uint8, "label": np.uint8, "hu": np.int16}
LABEL_IDS = 256  # uint8 label maps: the length of an item's ``present_ids``


class PreparedData:
    """The files `prepare` wrote: dataset.json, manifest.csv and the per-case uint8 arrays.

    Which cases a split (and fold) holds is decided here and nowhere else (:meth:`cases`). The test
    split is held out: without ``test=True`` its arrays are never opened (nor checked), its manifest
    rows are dropped, and asking for one of its arrays is an error, so nothing that trains, tunes or
    chooses can read a test case by mistake.

    Args:
        root: the PREPARED folder.
        test: open the test split too (``evaluate --split test`` only).
        seal_val: hold out the val cases of ``fold`` the same way (a learning-rate sweep run,
            which tunes on training cases and must not read the cases the report scores).
        fold: the fold whose val cases ``seal_val`` holds out (None: the val split).
    """

    def __init__(
        self, root: str | Path, *, test: bool = False, seal_val: bool = False, fold: int | None = None
    ):
        self.root = Path(root)
        self.test = test
        meta_path = self.root / "dataset.json"
        if not meta_path.is_file():
            raise InputError(
                self.root, "not a prepared dataset (no dataset.json); run `clipseg-bench prepare`"
            )
        try:
            self.meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(meta_path, f"unreadable prepared dataset ({exc})") from None
        manifest_path = self.root / "manifest.csv"
        try:
            self.manifest = pd.read_csv(manifest_path, dtype={"case": str})
        except (OSError, ValueError) as exc:
            raise InputError(manifest_path, f"unreadable manifest ({exc}); re-run `prepare`") from None
        found = self.meta.get("format") if isinstance(self.meta, dict) else None
        if found != FORMAT:
            raise InputError(
                self.root, f"prepared with format {found!r}, this version reads {FORMAT!r}; re-run `prepare`"
            )
        _check_contents(self.meta, self.manifest, meta_path, manifest_path)
        if not test:  # the test cases' slice rows (organ pixel counts come from their labels) go
            self.manifest = self.manifest[~self.manifest["case"].isin(self.held_out)]
        self._arrays: dict[tuple[str, str], np.ndarray] = {}
        # A learning-rate sweep never reads the cases the report scores: not even their arrays' headers.
        self.sealed = set(self.cases("val", fold)) if seal_val else set()
        # A truncated array fails here, not mid-training. Checked and let go: a memmap holds a file
        # descriptor, and keeping every case's two would hit the open-file limit on large datasets.
        for case in self.cases_meta:
            if (test or case not in self.held_out) and case not in self.sealed:
                for kind in ("image", "label"):
                    self._open(case, kind)

    @property
    def cases_meta(self) -> dict[str, dict]:
        return self.meta["cases"]

    @property
    def fingerprint(self) -> str:
        """What makes this prepared data itself (:func:`data_fingerprint` of its dataset.json)."""
        return data_fingerprint(self.meta)

    @property
    def window(self) -> dict:
        return self.meta["window"]

    @property
    def n_folds(self) -> int | None:
        """The number of folds `prepare --folds` drew; None for one train/val split (every folder
        prepared before folds existed)."""
        return (self.meta.get("split") or {}).get("folds") or None

    @property
    def held_out(self) -> set[str]:
        """The test split's case ids (from dataset.json; their arrays are not read without ``test``)."""
        return set(self.cases("test"))

    def check_fold(self, fold: int | None) -> None:
        """Refuse a fold this folder does not have (FieldError ``fold``)."""
        if fold is None:
            return
        if self.n_folds is None:
            raise FieldError(
                "fold", f"{self.root} was prepared without folds (one train/val split); prepare --folds K"
            )
        if not 0 <= fold < self.n_folds:
            raise FieldError("fold", f"{self.root} has folds 0..{self.n_folds - 1}, not {fold}")

    def cases(self, split: str, fold: int | None = None) -> list[str]:
        """Case ids of one split, sorted: the one place that decides which cases a split holds.

        Args:
            split: "train", "val" or "test".
            fold: with folds, "val" is this fold's cases and "train" every other non-test case;
                None: the cases dataset.json marks with ``split`` (with folds: fold 0 is val).
                The test split is the same for every fold.
        """
        if split not in SPLITS:
            raise FieldError("split", f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
        self.check_fold(fold)
        if fold is None or split == "test":
            return sorted(c for c, m in self.cases_meta.items() if m["split"] == split)
        inside = split == "val"
        return sorted(
            c for c, m in self.cases_meta.items() if m["split"] != "test" and (m["fold"] == fold) == inside
        )

    def slices(self, split: str, *, kept_only: bool = True, fold: int | None = None) -> pd.DataFrame:
        """Manifest rows of a split (of ``fold``; see :meth:`cases`), optionally only the slices kept
        for training, in (case, z) order."""
        if split == "test" and not self.test:
            raise InputError(self.root, "the test split is held out: only `evaluate --split test` reads it")
        df = self.manifest[self.manifest["case"].isin(self.cases(split, fold))]
        if kept_only:
            df = df[df["kept"].astype(bool)]
        return df.sort_values(["case", "z"]).reset_index(drop=True)

    def array(self, case: str, kind: str) -> np.ndarray:
        """Memory-mapped (Z, H, W) array; kind is "image" (uint8), "label" (uint8) or "hu" (int16)."""
        key = (case, kind)
        if not self.test and case in self.held_out:
            raise InputError(
                self.root,
                f"case {case!r} is in the held-out test split: only `evaluate --split test` reads it",
            )
        if case in self.sealed:
            raise InputError(
                self.root, f"case {case!r} is scored by the report: a learning-rate sweep does not read it"
            )
        if key not in self._arrays:
            self._arrays[key] = self._open(case, kind)
        return self._arrays[key]

    def _open(self, case: str, kind: str) -> np.ndarray:
        """Memory-map one cached array, checked against dataset.json (dtype and shape)."""
        path = self.root / "cache" / f"{case}_{kind}.npy"
        if not path.is_file():
            raise InputError(path, "missing from the prepared array cache; re-run `prepare`")
        try:
            array = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:  # numpy's words for a truncated or foreign file
            raise InputError(path, f"corrupt or truncated array ({exc}); re-run `prepare`") from None
        meta = self.cases_meta[case]
        expected = (meta["n_slices"], *meta["slice_shape"])
        dtype = ARRAY_DTYPES[kind]
        if array.dtype != dtype or tuple(array.shape) != tuple(expected):
            raise InputError(
                path,
                f"holds {array.dtype} {tuple(array.shape)}, dataset.json says "
                f"{np.dtype(dtype)} {tuple(expected)}; re-run `prepare`",
            )
        return array

    def check_channels(self, mode: str) -> None:
        """Refuse an input_channels mode this folder cannot feed (``windows`` needs the HU cache)."""
        if mode not in CHANNEL_MODES:
            raise InputError(
                "input_channels", f"unknown mode {mode!r}; choose from {', '.join(CHANNEL_MODES)}"
            )
        if needs_hu(mode) and not self.meta.get("hu_cache"):
            raise InputError(
                self.root,
                f"input_channels {mode!r} needs the HU cache (cache/<case>_hu.npy), which this folder "
                "was prepared without; re-run `prepare` into a new folder",
            )

    def inputs(self, case: str, z, channels: str = "gray", windows=None) -> np.ndarray:
        """The model's uint8 input images of slices ``z`` of ``case``: (N, H, W) for ``gray``,
        (N, 3, H, W) otherwise (see :func:`clipseg_bench.data.channels.channel_images`).

        Args:
            windows: the HU windows of ``windows`` mode, as the run recorded them
                (``Preprocessing.windows``); None takes today's.
        """
        hu = self.array(case, "hu") if needs_hu(channels) else None
        extra = {} if windows is None else {"windows": windows}
        return channel_images(z, mode=channels, gray=self.array(case, "image"), hu=hu, **extra)

    def __getstate__(self):  # DataLoader workers reopen the memmaps themselves
        state = self.__dict__.copy()
        state["_arrays"] = {}
        return state


def data_fingerprint(meta: dict) -> str:
    """A hash of a PREPARED folder's dataset.json without its ``summary`` (how long `prepare` took
    and how many cases it redid): the same for a copy of the folder anywhere, different when the
    cases, splits, window or label map differ. Runs record it to find their data again."""
    doc = {k: v for k, v in meta.items() if k != "summary"}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


CASE_KEYS = ("split", "n_slices", "slice_shape", "spacing")
MANIFEST_KEYS = ("case", "z", "split", "kept")


def _check_contents(meta: dict, manifest: pd.DataFrame, meta_path: Path, manifest_path: Path) -> None:
    """What readers rely on: dataset.json's window and per-case entries, and the manifest's columns."""
    cases = meta.get("cases")
    if not isinstance(cases, dict) or not cases:
        raise InputError(meta_path, "has no 'cases' (a mapping of case id to its entry); re-run `prepare`")
    if not isinstance(meta.get("window"), dict):
        raise InputError(meta_path, "has no 'window'; re-run `prepare`")
    for case, entry in cases.items():
        missing = [k for k in CASE_KEYS if not isinstance(entry, dict) or k not in entry]
        if missing:
            raise InputError(meta_path, f"case {case!r} lacks {', '.join(missing)}; re-run `prepare`")
        if entry["split"] not in SPLITS:
            raise InputError(meta_path, f"case {case!r} has split {entry['split']!r}, not train, val or test")
        _check_fold(meta, case, entry, meta_path)
    missing = [c for c in MANIFEST_KEYS if c not in manifest.columns]
    if missing:
        raise InputError(manifest_path, f"lacks the column(s) {', '.join(missing)}; re-run `prepare`")
    unknown = sorted(set(manifest["case"]) - set(cases))
    if unknown:
        raise InputError(manifest_path, f"lists case {unknown[0]!r}, which dataset.json does not have")


def _check_fold(meta: dict, case: str, entry: dict, meta_path: Path) -> None:
    """With folds, every non-test case needs a fold in 0..K-1."""
    n_folds = (meta.get("split") or {}).get("folds")
    if not n_folds or entry["split"] == "test":
        return
    fold = entry.get("fold")
    if not isinstance(fold, int) or not 0 <= fold < n_folds:
        raise InputError(
            meta_path, f"case {case!r} has fold {fold!r}, not one of 0..{n_folds - 1}; re-run `prepare`"
        )


def resize_slices(images: torch.Tensor, size: int, *, labels: bool = False) -> torch.Tensor:
    """Resize (N, H, W) or (N, C, H, W) slices to side ``size``: bilinear for images, nearest for labels.

    Each channel is resized on its own. Returns the input dtype (uint8 stays uint8, rounded), so
    the cache and the loader stay small.
    """
    if images.shape[-2:] == (size, size):
        return images
    lead = images.shape[:-2]
    x = images.reshape(-1, 1, *images.shape[-2:]).float()
    if labels:
        out = F.interpolate(x, size=(size, size), mode="nearest-exact")
    else:
        out = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out = out.round().clamp(0, 255)
    return out[:, 0].reshape(*lead, size, size).to(images.dtype)


def present_ids(labels: np.ndarray) -> np.ndarray:
    """(LABEL_IDS,) bool: which label ids occur in a uint8 label map (of any shape).

    The training loop picks its (slice, organ) pairs from this on the host, before the batch reaches
    the device (:func:`clipseg_bench.data.sampling.select_pairs`).
    """
    return np.bincount(np.asarray(labels).ravel(), minlength=LABEL_IDS) > 0


class SliceDataset(Dataset):
    """One item per slice: ``{"image": uint8 (S,S) or (3,S,S), "labels": uint8 (S,S), "present_ids":
    bool (256,), "index": int}``.

    With ``features``, items carry ``"features"`` instead of ``"image"``; with ``index_only``, only
    ``"index"`` (the trainer then reads the rest from copies it holds on the device).

    Pickling it (a DataLoader worker under ``spawn``/``forkserver``) sends no array: the prepared
    data's and the feature cache's memory maps are reopened by the worker on its first read.

    Args:
        data: the prepared dataset.
        split: "train" or "val".
        size: square side S the model takes (slices are resized here, once, in the loader).
        kept_only: only slices `prepare` kept for training (organ present, or all with --keep-empty).
        features: optional frozen vision activations (N, ...) aligned with the rows, e.g. the
            feature cache's :class:`~clipseg_bench.model.feature_cache.CachedRows`; when given,
            items carry ``"features"`` (fp16) and the image encoder can be skipped.
        rows: manifest rows to serve instead of the split's (``split`` and ``kept_only`` then unused).
        channels: the input_channels mode: ``gray`` gives (S, S) images, the others (3, S, S).
        windows: the run's HU windows of ``windows`` mode (None: today's).
    """

    def __init__(
        self,
        data: PreparedData,
        split: str,
        *,
        size: int,
        kept_only: bool = True,
        features=None,
        rows=None,
        channels: str = "gray",
        windows=None,
    ):
        self.data = data
        rows = data.slices(split, kept_only=kept_only) if rows is None else rows.reset_index(drop=True)
        # (case, z) only: the whole manifest row would be pickled into every worker
        self.cases = rows["case"].astype(str).to_numpy()
        self.zs = rows["z"].astype(np.int64).to_numpy()
        self.size = size
        self.features = features
        self.channels = channels
        self.windows = windows
        self.index_only = False
        if len(self.zs) == 0:
            raise InputError(data.root, f"split {split!r} has no slices to use")

    def __len__(self) -> int:
        return len(self.zs)

    def labels(self, i: int) -> torch.Tensor:
        """(S, S) uint8 label map of item ``i`` at the model's side."""
        labels = np.array(self.data.array(self.cases[i], "label")[self.zs[i]])
        return resize_slices(torch.from_numpy(labels)[None], self.size, labels=True)[0]

    def __getitem__(self, i: int) -> dict:
        if self.index_only:
            return {"index": i}
        labels = self.labels(i)
        item = {"labels": labels, "present_ids": torch.from_numpy(present_ids(labels.numpy())), "index": i}
        if self.features is not None:  # the encoder's output stands in for the image: skip loading it
            item["features"] = torch.from_numpy(np.array(self.features[i]))
        else:
            image = self.data.inputs(self.cases[i], [self.zs[i]], self.channels, self.windows)
            item["image"] = resize_slices(torch.from_numpy(image), self.size)[0]
        return item


def organ_targets(labels: torch.Tensor, organ_ids) -> torch.Tensor:
    """(B, H, W) FLARE ids -> (B, K, H, W) float one-hot targets for the K prompted organs.

    ``organ_ids``: a list, or a tensor of the labels' dtype on their device (used as it is).
    """
    ids = torch.as_tensor(organ_ids, device=labels.device, dtype=labels.dtype)
    return (labels[:, None] == ids[None, :, None, None]).float()
