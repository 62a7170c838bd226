"""`clipseg-bench evaluate`: 2D Dice like the original study, 3D DSC/NSD like FLARE22.

Per case, every slice of the split is predicted once for all organs. Two readings follow:
- 2D, per (slice, organ) prompt: the organ's own probability > threshold (the original study's
  binary per-prompt masks) -> ``dice2d`` over pairs where the organ is present, and
  ``empty_specificity`` over pairs where it is absent;
- 3D: per pixel the most probable organ above threshold, slices re-stacked onto the case's
  original grid and spacing, then scored with the FLARE22 rules (evaluation.metrics).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from clipseg_bench.data.dataset import PreparedData
from clipseg_bench.data.volumes import slices_to_volume
from clipseg_bench.errors import InputError
from clipseg_bench.evaluation.loading import load_run
from clipseg_bench.evaluation.metrics import present_pairs_dice, score_case, summarize
from clipseg_bench.evaluation.predict import probabilities_to_labels
from clipseg_bench.provenance import replacing, write_json_atomic

N_SAMPLES = 4  # slices kept for the report's qualitative overlays


def sample_slices(labels: np.ndarray, n: int = N_SAMPLES) -> list[int]:
    """Deterministic overlay slices of one case: evenly spread over the slices that hold organs."""
    with_organs = np.flatnonzero(labels.reshape(len(labels), -1).any(1))
    if len(with_organs) == 0:
        return []
    picks = np.linspace(0, len(with_organs) - 1, num=min(n, len(with_organs))).round().astype(int)
    return sorted({int(with_organs[i]) for i in picks})


def evaluate_run(
    *,
    run: Path,
    data: Path | None = None,
    split: str = "val",
    max_cases: int | None = None,
    device: str | None = None,
    show_progress: bool = True,
) -> dict:
    """Evaluate a run folder on a prepared split and write ``RUN/metrics.json`` and ``RUN/samples.npz``."""
    t0 = time.perf_counter()
    if max_cases is not None and max_cases < 1:
        raise InputError("--max-cases", f"must be >= 1, got {max_cases}")
    trained = load_run(run)
    cfg = trained.cfg
    prepared = PreparedData(data or cfg.data)
    cases = prepared.cases(split)[:max_cases]
    if not cases:
        raise InputError(prepared.root, f"split {split!r} has no cases to evaluate")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    seg = trained.segmenter(dev)
    organ_ids = [o.id for o in trained.organs]
    features = _frozen_features(trained, prepared, cases, split, dev, show_progress)

    per_case, dice_pairs, absent_total, absent_empty = {}, [], 0, 0
    samples: dict[str, list] = {"image": [], "gt": [], "pred": [], "case": [], "z": []}
    offset = 0
    for case in tqdm(cases, desc=f"evaluate {split}", unit="case", disable=not show_progress):
        images, gt = prepared.array(case, "image"), np.asarray(prepared.array(case, "label"))
        pred = np.zeros_like(gt)
        feats = None if features is None else features[offset : offset + len(images)]
        offset += len(images)
        for start, probs in seg.iter_probabilities(images, batch_size=16, features=feats):
            stop = start + len(probs)
            pred[start:stop] = probabilities_to_labels(probs, organ_ids, threshold=cfg.threshold).numpy()
            binary = (probs > cfg.threshold).numpy()  # (b, K, H, W): each prompt on its own
            target = gt[start:stop, None] == np.asarray(organ_ids)[None, :, None, None]
            present = target.any((2, 3))
            pairs_shape = (-1, *binary.shape[2:])  # (b * K, H, W): one row per (slice, organ) pair
            dice_pairs.extend(
                present_pairs_dice(binary.reshape(pairs_shape), target.reshape(pairs_shape)).tolist()
            )
            absent_total += int((~present).sum())
            absent_empty += int((~present & ~binary.any((2, 3))).sum())
        meta = prepared.cases_meta[case]
        per_case[case] = score_case(
            slices_to_volume(pred, meta), slices_to_volume(gt, meta), meta["spacing"], trained.organs
        )
        if not samples["case"]:  # overlays: the first case only, the same slices for every run
            for z in sample_slices(gt):
                for k, v in (
                    ("image", images[z]),
                    ("gt", gt[z]),
                    ("pred", pred[z]),
                    ("case", case),
                    ("z", z),
                ):
                    samples[k].append(v)

    metrics = {
        "split": split,
        "cases": cases,
        "dice2d": float(np.mean(dice_pairs)) if dice_pairs else float("nan"),
        "dice2d_pairs": len(dice_pairs),
        "empty_specificity": absent_empty / absent_total if absent_total else float("nan"),
        "per_case": per_case,
        "summary": summarize(per_case),
        "threshold": cfg.threshold,
        "eval_time_s": time.perf_counter() - t0,
    }
    write_json_atomic(Path(run) / "metrics.json", metrics)
    if samples["case"]:
        with replacing(Path(run) / "samples.npz") as tmp:
            np.savez_compressed(tmp, **{k: np.asarray(v) for k, v in samples.items()})
    return metrics


def _frozen_features(trained, prepared: PreparedData, cases, split, dev, show_progress):
    """Reuse/build the cached vision activations of every slice of ``cases`` when the encoder is frozen."""
    from clipseg_bench.model.feature_cache import build_feature_cache
    from clipseg_bench.model.forward import vision_trainable

    lm = trained.loaded
    if vision_trainable(lm.model) or not trained.cfg.feature_cache:
        return None
    rows = prepared.slices(split, kept_only=False)
    rows = rows[rows["case"].isin(cases)].sort_values(["case", "z"]).reset_index(drop=True)
    feats, _ = build_feature_cache(
        lm.model,
        data=prepared,
        rows=rows,
        name=f"{split}_all_{len(cases)}",
        size=lm.image_size,
        mean=lm.mean,
        std=lm.std,
        device=dev,
        show_progress=show_progress,
    )
    return feats
