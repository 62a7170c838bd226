"""`clipseg-bench evaluate`: 2D Dice like the original study, 3D DSC/NSD like FLARE22.

Per case, every slice of the split is predicted once for all organs. Two readings follow:
- 2D, per (slice, organ) prompt: the organ's own probability > threshold (the original study's
  binary per-prompt masks) -> ``dice2d`` over pairs where the organ is present, and the
  false-positive slice rate ``fp_slice_rate`` (and its complement ``empty_specificity``) over
  pairs where it is absent;
- 3D: per pixel the most probable organ above threshold, slices re-stacked onto the case's
  original grid and spacing, then scored with the FLARE22 rules (evaluation.metrics), both as
  predicted and after each 3D clean-up (evaluation.postprocess), so one run shows what the clean-up
  gains; ``--postprocess`` picks which of them is the headline ``per_case``/``summary`` (``auto``:
  per organ, the run's recorded choice, made on out-of-fold scores).

The split is ``val`` (with folds: the run's own fold, which it never trained on; RUN/metrics.json),
``test`` (the held-out cases, read by nothing else; RUN/metrics-test.json) or ``train``
(RUN/metrics-train.json).

The right prompts' masks also give the prompt-confusion matrix (where the mask for each organ's
name lands), and the same slices are decoded again with reworded prompts (evaluation.reliance):
does the model still read its prompt, and how much does the wording matter.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from clipseg_bench.data.dataset import PreparedData
from clipseg_bench.data.volumes import slices_to_volume
from clipseg_bench.errors import FieldError, InputError
from clipseg_bench.evaluation.metrics import organs_present, score_case, summarize
from clipseg_bench.evaluation.postprocess import (
    AUTO,
    POSTPROCESS_MODES,
    check_postprocess_mode,
    postprocess,
    recorded_choice,
)
from clipseg_bench.evaluation.predict import probabilities_to_labels
from clipseg_bench.evaluation.reliance import RIGHT, PromptCheck
from clipseg_bench.model.feature_cache import cache_root
from clipseg_bench.model.trained import load_run_model
from clipseg_bench.organs import BY_ID
from clipseg_bench.provenance import check_output_file, check_unlocked, output_lock, replacing
from clipseg_bench.run_folder import TRAIN_LOCK, RunFolder

N_SAMPLES = 4  # slices kept for the report's qualitative overlays


def sample_slices(labels: np.ndarray, n: int = N_SAMPLES) -> list[int]:
    """Deterministic overlay slices of one case: evenly spread over the slices that hold organs."""
    with_organs = np.flatnonzero(labels.reshape(len(labels), -1).any(1))
    if len(with_organs) == 0:
        return []
    picks = np.linspace(0, len(with_organs) - 1, num=min(n, len(with_organs))).round().astype(int)
    return sorted({int(with_organs[i]) for i in picks})


@dataclass
class _Tally:
    """What evaluate accumulates over a split's cases: 3D scores per clean-up mode, the organs each
    case's truth has, and the overlay slices of the first case (the 2D counts live in PromptCheck)."""

    per_mode: dict[str, dict] = field(default_factory=lambda: {m: {} for m in POSTPROCESS_MODES})
    present: dict[str, list[str]] = field(default_factory=dict)
    samples: dict[str, list] = field(
        default_factory=lambda: {k: [] for k in ("image", "gt", "pred", "case", "z")}
    )

    def add_samples(self, case: str, images, gt: np.ndarray, pred: np.ndarray) -> None:
        """Overlays: the first case only, the same slices for every run."""
        if self.samples["case"]:
            return
        for z in sample_slices(gt):
            for k, v in (("image", images[z]), ("gt", gt[z]), ("pred", pred[z]), ("case", case), ("z", z)):
                self.samples[k].append(v)


def evaluate_run(
    *,
    run: Path,
    data: Path | None = None,
    split: str = "val",
    max_cases: int | None = None,
    device: str | None = None,
    show_progress: bool = True,
    postprocess_mode: str = "none",
    cache_dir: str | Path | None = None,
) -> dict:
    """Evaluate a run folder on a prepared split and write its metrics and overlay slices
    (``RunFolder.metrics_file(split)``: RUN/metrics.json for val, RUN/metrics-test.json for test).

    ``postprocess_mode`` (``none`` | ``lcc`` | ``auto``) picks the 3D scores reported as ``per_case``
    and ``summary``; ``postprocess_3d`` holds those of every mode. ``auto`` takes, per organ, the
    mode the run's postprocess.json records, and refuses cases that choice was made on. Inputs are
    built with the run's own preprocessing (its recorded window, channels and HU windows). The val
    split of a run on a fold is that fold; the test split is the same for every fold.

    Args:
        data: the PREPARED folder, when the run's own cannot be found where it recorded it (it must
            be the same prepared data: :meth:`~clipseg_bench.run_folder.RunFolder.prepared`).
        cache_dir: the feature cache's folder (default: the run's ``cache_dir``, then
            :func:`~clipseg_bench.model.feature_cache.cache_root`'s rule).

    Raises:
        InputError: a bad argument, run folder or data folder, a run folder evaluate cannot write
            (checked before the work), ``--split test`` on data without test cases or of a run that
            trained or validated on one of them, ``auto`` without a recorded choice.
    """
    t0 = time.perf_counter()
    check_postprocess_mode(postprocess_mode, auto=True)
    if max_cases is not None and max_cases < 1:
        raise InputError("max_cases", f"must be >= 1, got {max_cases}")
    folder = RunFolder(run)
    folder.config()  # not a run folder: say so before anything else
    check_unlocked(folder.path, TRAIN_LOCK)  # a live `train` is still writing this run's weights
    for path in (folder.metrics_file(split), folder.samples_file(split)):  # replaced on a re-run
        check_output_file(path, command="evaluate", ours=lambda _: True)
    # Two evaluations of one split would race on its files: the second is refused up front.
    with output_lock(folder.path, "evaluate", scope=split):
        return _evaluate(
            folder, data, split, max_cases, device, show_progress, postprocess_mode, cache_dir, t0
        )


def _evaluate(
    folder: RunFolder,
    data: Path | None,
    split: str,
    max_cases: int | None,
    device: str | None,
    show_progress: bool,
    postprocess_mode: str,
    cache_dir: str | Path | None,
    t0: float,
) -> dict:
    """:func:`evaluate_run`'s work, under its lock."""
    trained = load_run_model(folder)
    prepared = folder.prepared(data, test=split == "test")
    prepared.check_channels(trained.preprocessing.input_channels)
    cases = prepared.cases(split, trained.cfg.fold)
    if split == "test":
        _check_held_out(folder, prepared, cases)
    modes = _recorded_modes(folder, cases) if postprocess_mode == AUTO else None
    if not cases:  # e.g. prepared with --val-fraction 0: say so, score nothing
        return _no_split(folder, split, t0)
    cases = cases[:max_cases]
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    seg = trained.segmenter(dev)
    cfg = trained.cfg
    check = PromptCheck(seg, organs=trained.organs, template=cfg.prompt_template, threshold=cfg.threshold)
    root = cache_root(prepared, cache_dir=cache_dir or trained.cfg.cache_dir, beside=folder.path)
    tally = _score_cases(
        trained, seg, check, prepared, cases, split=split, show_progress=show_progress, root=root
    )
    per_case = _headline(tally.per_mode, postprocess_mode, modes)
    metrics = {
        "split": split,
        "fold": trained.cfg.fold,
        "cases": cases,
        "per_case": per_case,
        "organs_present": tally.present,  # per case: the organs its truth has (the *_present means)
        "summary": summarize(per_case, tally.present),
        "postprocess": postprocess_mode,
        **({"postprocess_choice": folder.postprocess_choice()} if modes is not None else {}),
        "postprocess_3d": {
            m: {"per_case": pc, "summary": summarize(pc, tally.present)} for m, pc in tally.per_mode.items()
        },
        "input_channels": trained.preprocessing.input_channels,
        **check.metrics(),
        "threshold": cfg.threshold,
        "eval_time_s": time.perf_counter() - t0,
    }
    folder.write_metrics(metrics, split)
    if tally.samples["case"]:
        with replacing(folder.samples_file(split)) as tmp:
            np.savez_compressed(tmp, **{k: np.asarray(v) for k, v in tally.samples.items()})
    return metrics


def _check_held_out(folder: RunFolder, prepared: PreparedData, cases: list[str]) -> None:
    """``--split test``: the data must have test cases, and the run must not have trained or
    validated on any of them (a run trained on another preparation of the same cases)."""
    if not cases:
        raise FieldError(
            "split",
            f"{prepared.root} has no test case; prepare with --test-fraction F, or a split file's 'test' list",
        )
    record = folder.record()
    seen = set(record.train_case_ids or []) | set(record.val_case_ids or [])
    leaked = sorted(seen & set(cases))
    if leaked:
        raise InputError(
            folder.path,
            f"trained or validated on case {leaked[0]!r}, which {prepared.root} holds out as test: "
            "its test scores would not be held out",
        )


def _recorded_modes(folder: RunFolder, cases: list[str]) -> dict[int, str]:
    """``--postprocess auto``: the run's recorded per-organ choice, refused on the cases it was made on."""
    choice, modes = recorded_choice(folder.path)
    seen = sorted(set((choice.get("chosen_on") or {}).get("cases") or []) & set(cases))
    if seen:
        raise InputError(
            folder.path,
            f"its clean-up was chosen on case {seen[0]!r}, which this evaluation scores: auto scores only "
            "cases the choice did not see (--split test, or new CTs with segment)",
        )
    return modes


def _headline(per_mode: dict[str, dict], mode: str, modes: dict[int, str] | None) -> dict:
    """The headline ``per_case``: one mode's scores, or with ``auto`` each organ's chosen mode's
    (exact: an organ's score depends only on its own voxels, which the other organs' clean-up never
    touches)."""
    if mode != AUTO:
        return per_mode[mode]
    by_key = {BY_ID[i].key: m for i, m in (modes or {}).items()}
    return {
        case: {key: per_mode[by_key.get(key, "none")][case][key] for key in organs}
        for case, organs in per_mode["none"].items()
    }


def _score_cases(
    trained, seg, check, prepared: PreparedData, cases, *, split: str, show_progress: bool, root: Path
) -> _Tally:
    """Predict every slice of ``cases`` once (for all prompt sets of ``check``) and score it in 2D and 3D."""
    pre, threshold = trained.preprocessing, trained.cfg.threshold
    organ_ids = [o.id for o in trained.organs]
    features = _frozen_features(trained, prepared, cases, split, seg.device, show_progress, root)
    ids = torch.as_tensor(organ_ids, dtype=torch.uint8, device=seg.device)
    tally, offset = _Tally(), 0
    for case in tqdm(cases, desc=f"evaluate {split}", unit="case", disable=not show_progress):
        images, gt = prepared.array(case, "image"), np.asarray(prepared.array(case, "label"))
        inputs = prepared.inputs(case, np.arange(len(images)), pre.input_channels, pre.windows)
        pred = np.zeros_like(gt)
        feats = None if features is None else features[offset : offset + len(images)]
        offset += len(images)
        # Probabilities stay on the device: thresholds and Dice counts are computed there and only
        # the uint8 label maps (for the 3D scores) and the counts come back.
        for start, prompt_sets in seg.iter_prompt_sets(
            inputs, prompt_embs=check.embeddings, batch_size=16, features=feats, on_device=True
        ):
            probs = prompt_sets[RIGHT]
            stop = start + len(probs)
            pred[start:stop] = probabilities_to_labels(probs, organ_ids, threshold=threshold).cpu().numpy()
            gt_b = torch.from_numpy(np.array(gt[start:stop])).to(seg.device)
            target = gt_b[:, None] == ids[None, :, None, None]  # (b, K, H, W) on the device
            check.add(prompt_sets, target)  # also dice2d and the false-positive slices
        tally.present[case] = organs_present(gt, trained.organs)
        for mode, scores in score_postprocessed(pred, gt, prepared.cases_meta[case], trained.organs).items():
            tally.per_mode[mode][case] = scores
        tally.add_samples(case, images, gt, pred)
    return tally


def _no_split(folder: RunFolder, split: str, t0: float) -> dict:
    """metrics.json for data without a ``split`` case: no scores (null, never NaN), and why."""
    metrics = {
        "split": split,
        "cases": [],
        "no_split": f"the prepared data has no {split} case",
        "dice2d": None,
        "dice2d_pairs": 0,
        "empty_specificity": None,
        "fp_slice_rate": None,
        "per_case": {},
        "summary": {},
        "eval_time_s": time.perf_counter() - t0,
    }
    folder.write_metrics(metrics, split)
    return metrics


def score_postprocessed(pred: np.ndarray, gt: np.ndarray, case_meta: dict, organs) -> dict[str, dict]:
    """FLARE22 scores of one case's predicted slices under every clean-up mode.

    Args:
        pred, gt: (Z, H, W) predicted and true FLARE ids in the prepared slice convention.
        case_meta: the case's dataset.json entry (original grid, affine, header spacing).
        organs: the organs scored.

    Returns:
        ``{mode: {organ key: {"dsc", "nsd"}}}`` for every mode of POSTPROCESS_MODES; the clean-up
        runs on the original grid with the original affine, as ``segment`` and ``score`` run it.
    """
    pred_vol, gt_vol = slices_to_volume(pred, case_meta), slices_to_volume(gt, case_meta)
    affine = np.asarray(case_meta["affine"], dtype=float)
    return {
        mode: score_case(postprocess(pred_vol, affine, mode), gt_vol, case_meta["spacing"], organs)
        for mode in POSTPROCESS_MODES
    }


def _frozen_features(trained, prepared: PreparedData, cases, split, dev, show_progress, root: Path):
    """Reuse/build the cached vision activations of every slice of ``cases`` when the encoder is frozen
    (in the feature-cache folder ``root``)."""
    from clipseg_bench.model.feature_cache import build_feature_cache, fold_suffix
    from clipseg_bench.model.forward import vision_trainable

    lm = trained.loaded
    if vision_trainable(lm.model) or not trained.cfg.feature_cache:
        return None
    rows = prepared.slices(split, kept_only=False, fold=trained.cfg.fold)
    rows = rows[rows["case"].isin(cases)].sort_values(["case", "z"]).reset_index(drop=True)
    feats, _ = build_feature_cache(
        lm.model,
        data=prepared,
        rows=rows,
        name=f"{split}_all_{len(cases)}" + ("" if split == "test" else fold_suffix(trained.cfg.fold)),
        size=lm.image_size,
        mean=lm.mean,
        std=lm.std,
        device=dev,
        show_progress=show_progress,
        dtype=trained.cfg.feature_cache_dtype,
        channels=trained.preprocessing.input_channels,
        windows=trained.preprocessing.windows,
        root=root,
        precision=trained.precision(dev),
    )
    return feats
