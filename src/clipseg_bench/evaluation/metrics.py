"""Segmentation metrics as pure functions: 2D Dice, and 3D DSC/NSD scored the FLARE22 way.

The 3D scores follow the official FLARE22 evaluation, ``FLARE22/Evaluation/FLARE22_DSC_NSD_Eval.py``
in https://github.com/JunMa11/FLARE (with DeepMind's ``SurfaceDice.py``), rule for rule:

* per organ ``i``: empty in both ground truth and prediction -> DSC 1, NSD 1; predicted but absent
  from the ground truth -> DSC 0, NSD 0; otherwise DSC and NSD at the organ's tolerance (mm, from
  :data:`clipseg_bench.organs.ORGANS`);
* aorta, inferior vena cava and esophagus (:data:`~clipseg_bench.organs.Z_CROPPED_IDS`) are scored
  on ``gt[:, :, z_min:z_max]`` and the same crop of the prediction, where z_min/z_max are the lowest
  and highest slice (third array axis) the ground truth labels. As in the official code the slice
  ``z_max`` itself is left out;
* the spacing is the label file's header zooms and the arrays stay in the file's own axis order.

The NSD comes from MONAI's ``compute_surface_dice(..., use_subvoxels=True)``, which computes DeepMind's
surfel areas and distances and so agrees with the official code (tests check it against DeepMind's
``surface-distance`` package to 1e-4). Without ``use_subvoxels`` MONAI counts boundary voxels instead
and differs by up to a few 1e-3.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.metrics import compute_surface_dice

from clipseg_bench.organs import ORGANS, Z_CROPPED_IDS, Organ


def _as_bool(x) -> np.ndarray:
    """A numpy bool array from a numpy array, a torch tensor or anything array-like."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x).astype(bool, copy=False)


def _on_accelerator(pred, gt) -> bool:
    """Both are tensors on a GPU (or another accelerator): count there, and copy back only the counts.

    On the CPU numpy's view of the same memory counts several times faster than torch's reductions.
    """
    return isinstance(pred, torch.Tensor) and isinstance(gt, torch.Tensor) and pred.device.type != "cpu"


def pair_counts(pred, gt) -> tuple:
    """The integers Dice is made of, per pair of masks: ``(|P∩G|, |P|, |G|)``.

    Args:
        pred: predicted masks, bool-like (N, ...); numpy array or torch tensor (any device),
            nonzero = foreground.
        gt: ground-truth masks of the same shape.

    Returns:
        Three int64 (N,) arrays. On an accelerator (both tensors there) they are tensors left on the
        device, so a caller can keep counting without waiting for the device (the training loop
        reads them every ``log_every`` steps); otherwise numpy arrays (numpy's view of CPU memory
        counts several times faster than torch's reductions).
    """
    if _on_accelerator(pred, gt):
        p, g = pred.detach() != 0, gt.detach().to(pred.device) != 0
    else:
        p, g = _as_bool(pred), _as_bool(gt)
    if p.shape != g.shape or p.ndim < 1:
        raise ValueError(
            f"expected two (N, ...) arrays of one shape, got {tuple(p.shape)} and {tuple(g.shape)}"
        )
    axes = tuple(range(1, p.ndim))
    if isinstance(p, torch.Tensor):
        count = functools.partial(torch.sum, dim=axes, dtype=torch.int64)
        return count(p & g), count(p), count(g)
    return (
        np.logical_and(p, g).sum(axis=axes, dtype=np.int64),
        p.sum(axis=axes, dtype=np.int64),
        g.sum(axis=axes, dtype=np.int64),
    )


def dice_from_counts(inter, pred_sum, gt_sum) -> np.ndarray:
    """Dice ``2|P∩G| / (|P| + |G|)`` from :func:`pair_counts` (host arrays or tensors on any device).

    Returns:
        float64 (N,). Empty-mask rules: a pair empty in both masks scores 1.0 (nothing to find and
        nothing found, the FLARE22 convention); a pair empty in exactly one scores 0.0.
    """
    inter, pred_sum, gt_sum = (_host_int64(x) for x in (inter, pred_sum, gt_sum))
    total = pred_sum + gt_sum
    return np.where(total == 0, 1.0, 2.0 * inter / np.maximum(total, 1))


def present_dice_from_counts(inter, pred_sum, gt_sum) -> np.ndarray:
    """:func:`dice_from_counts` of the pairs whose ground truth is not empty (``gt_sum > 0``), in order."""
    inter, pred_sum, gt_sum = (_host_int64(x) for x in (inter, pred_sum, gt_sum))
    present = gt_sum > 0
    return dice_from_counts(inter[present], pred_sum[present], gt_sum[present])


def _host_int64(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.int64)


def dice_2d_pairs(pred, gt) -> np.ndarray:
    """Dice ``2|P∩G| / (|P| + |G|)`` of each pair of binary masks: the project's one Dice.

    Training progress, validation, ``evaluate`` (2D) and the 3D DSC all call this function (or its
    two halves, :func:`pair_counts` and :func:`dice_from_counts`).

    Args:
        pred: predicted masks, bool-like (N, ...) (e.g. (N, H, W) for N (slice, organ) pairs);
            numpy array or torch tensor (any device), nonzero = foreground.
        gt: ground-truth masks of the same shape.

    Returns:
        float64 array (N,). Empty-mask rules: a pair empty in both masks scores 1.0 (nothing to
        find and nothing found, the FLARE22 convention); a pair empty in exactly one scores 0.0.
        Callers that want "Dice where the organ is present" use :func:`present_pairs_dice`.
    """
    return dice_from_counts(*pair_counts(pred, gt))


def present_pairs_dice(pred, gt) -> np.ndarray:
    """:func:`dice_2d_pairs` of the pairs whose ground truth is not empty, in order.

    This is what ``dice2d`` averages (the original study's number): pairs where the organ is absent
    from the ground truth are left out, so empty-both pairs (Dice 1 by convention) cannot inflate it.
    Every pair is counted where the masks are and only the counts are selected (on a GPU, selecting
    masks by a data-dependent mask would make the host wait for the device).
    """
    return present_dice_from_counts(*pair_counts(pred, gt))


def cross_dice(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Dice of every predicted mask against every true mask of the same slice.

    The prompt-confusion matrix is built from it: ``pred[:, k]`` is the mask for the prompt naming
    organ k, ``gt[:, j]`` organ j's truth, so entry ``[b, k, j]`` says how well the mask asked for k
    lands on j (the diagonal is :func:`dice_2d_pairs` of each organ with its own prompt).

    Args:
        pred: (b, K, H, W) bool-like predicted masks, one per prompt.
        gt: (b, K, H, W) bool-like ground truth, one mask per organ; H * W < 2**24 (the overlap
            counts run as an exact float32 matrix product).

    Returns:
        (b, K, K) float64. Empty-mask rules as :func:`dice_2d_pairs`: both empty -> 1.0, exactly one
        empty -> 0.0; the confusion matrix only reads columns whose organ is present. Tensors on an
        accelerator are counted there (only the (b, K, K) counts come back).
    """
    if _on_accelerator(pred, gt):
        p, g = pred.detach() != 0, gt.detach().to(pred.device) != 0
    else:
        p, g = _as_bool(pred), _as_bool(gt)
    if p.shape != g.shape or p.ndim != 4:
        raise ValueError(f"expected two (b, K, H, W) arrays of one shape, got {p.shape} and {g.shape}")
    b, k = p.shape[:2]
    p, g = p.reshape(b, k, -1), g.reshape(b, k, -1)
    if p.shape[2] >= 2**24:
        raise ValueError(f"{p.shape[2]} pixels per slice: float32 overlap counts would not be exact")
    if isinstance(p, torch.Tensor):  # 0/1 inputs are exact in TF32 too; fp32 accumulation
        inter = torch.bmm(p.float(), g.float().transpose(1, 2)).double().cpu().numpy()
        p_sum, g_sum = (_host_int64(x.sum(2, dtype=torch.int64)) for x in (p, g))
    else:
        inter = np.empty((b, k, k))
        for i in range(b):  # one slice at a time: the float copies of a batch at 352 px would be ~100 MB
            inter[i] = p[i].astype(np.float32) @ g[i].astype(np.float32).T
        p_sum, g_sum = p.sum(axis=2), g.sum(axis=2)
    total = p_sum[:, :, None] + g_sum[:, None, :]
    return np.where(total == 0, 1.0, 2.0 * inter / np.maximum(total, 1))


def false_positive_slices(pred, gt) -> tuple[np.ndarray, np.ndarray]:
    """Per organ: the slices where it is absent from the truth, and those of them with a mask.

    :func:`present_pairs_dice` (``dice2d``) never sees a slice without the organ, so a model that
    paints every organ on every slice loses nothing there; the false-positive slice rate
    ``fp / absent`` is what it costs.

    Args:
        pred: (b, K, H, W) bool-like predicted masks, one per organ prompt.
        gt: (b, K, H, W) bool-like ground truth.

    Returns:
        ``(absent, false_positive)``, each (K,) int64: slices whose truth lacks the organ, and how
        many of them got a non-empty mask.
    """
    if _on_accelerator(pred, gt):  # counted where the masks are; (K,) comes back
        p, g = pred.detach() != 0, gt.detach().to(pred.device) != 0
        absent = ~g.any(dim=(2, 3))
        return _host_int64(absent.sum(0)), _host_int64((absent & p.any(dim=(2, 3))).sum(0))
    p, g = _as_bool(pred), _as_bool(gt)
    absent = ~g.any(axis=(2, 3))
    return absent.sum(axis=0), (absent & p.any(axis=(2, 3))).sum(axis=0)


def dice(pred, gt) -> float:
    """Dice of one pair of masks of any (equal) shape: :func:`dice_2d_pairs` of a single pair.

    Both empty -> 1.0; exactly one empty -> 0.0.
    """
    p, g = _as_bool(pred), _as_bool(gt)
    if p.shape != g.shape:
        raise ValueError(f"pred and gt shapes differ: {p.shape} vs {g.shape}")
    return float(dice_2d_pairs(p[None], g[None])[0])


def _z_range(gt: np.ndarray) -> slice:
    """The official crop ``z_min:z_max`` of an organ's labelled slices (top slice left out).

    When the organ sits on a single slice the official slice is empty and its code fails (a
    reduction over a zero-size array); we score that one slice instead.
    """
    z = np.flatnonzero(gt.any(axis=(0, 1)))
    z_min, z_max = int(z[0]), int(z[-1])
    return slice(z_min, max(z_max, z_min + 1))


def _bbox(mask: np.ndarray) -> tuple[slice, ...]:
    """The bounding box of a non-empty mask, one voxel wider on each side where the array allows.

    Surface distances need nothing outside it (MONAI crops the same way, and pads with background
    where the box meets the array's edge); cropping first spares it full-volume copies.
    """
    box = []
    for axis in range(mask.ndim):
        idx = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(int(idx[0]) - 1, 0), int(idx[-1]) + 2))
    return tuple(box)


def flare_dsc_nsd(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float],
    tolerance_mm: float,
    *,
    z_crop: bool = False,
) -> tuple[float, float]:
    """3D DSC and NSD of one organ, by the rules of the official FLARE22 evaluation.

    Args:
        pred: predicted mask of the organ, bool-like (X, Y, Z) in the label file's array order.
        gt: ground-truth mask, (X, Y, Z).
        spacing: voxel size (mm) along X, Y, Z: the label file's header zooms.
        tolerance_mm: NSD tolerance (mm); an organ's is ``Organ.nsd_tolerance_mm``.
        z_crop: score only slices ``z_min:z_max`` of the ground truth's labelled range (third axis;
            the top labelled slice is left out, as in the official code), for the aorta, IVC and
            esophagus. A prediction outside that range then costs nothing.

    Returns:
        ``(dsc, nsd)``, each in [0, 1]. Empty in both -> (1.0, 1.0). Predicted while absent from the
        ground truth -> (0.0, 0.0), wherever the prediction lies. Present in the ground truth but
        predicted empty (within the crop, if any) -> (0.0, 0.0).
    """
    p, g = _as_bool(pred), _as_bool(gt)
    if p.shape != g.shape or p.ndim != 3:
        raise ValueError(f"expected two (X, Y, Z) masks of one shape, got {p.shape} and {g.shape}")
    if not g.any():
        return (0.0, 0.0) if p.any() else (1.0, 1.0)
    if z_crop:
        zs = _z_range(g)
        p, g = p[:, :, zs], g[:, :, zs]
    if not p.any():
        # Official: DSC 2*0/|G| = 0, and every ground-truth surfel is infinitely far away: NSD 0.
        return 0.0, 0.0
    box = _bbox(p | g)
    p, g = p[box], g[box]
    with warnings.catch_warnings():
        # MONAI 1.5-1.6 passes its own deprecated `always_return_as_numpy` internally; not ours to fix.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        nsd = compute_surface_dice(
            torch.from_numpy(p)[None, None],
            torch.from_numpy(g)[None, None],
            class_thresholds=[float(tolerance_mm)],
            include_background=True,  # our single channel is the organ itself
            spacing=[float(s) for s in spacing[:3]],
            use_subvoxels=True,  # DeepMind's surfel areas: what the official FLARE22 NSD uses
        )
    return dice(p, g), float(nsd.item())


def score_case(
    pred_labels: np.ndarray,
    gt_labels: np.ndarray,
    spacing: Sequence[float],
    organs: Sequence[Organ] | None = None,
) -> dict[str, dict[str, float]]:
    """FLARE22 DSC and NSD of every organ in one case.

    Args:
        pred_labels: predicted label volume, integer FLARE22 ids (X, Y, Z), 0 = background.
        gt_labels: ground-truth label volume, (X, Y, Z), on the same grid, in the label file's array
            order (not reoriented: the official code scores ``get_fdata()`` as stored).
        spacing: voxel size (mm) along X, Y, Z, from the label file's header zooms.
        organs: organs to score (default all 13). Each uses its own NSD tolerance, and the aorta, IVC
            and esophagus get the z-crop of :func:`flare_dsc_nsd`. Ids not in ``organs`` are ignored.

    Returns:
        ``{organ.key: {"dsc": float, "nsd": float}}`` in organ order, with the empty-mask rules of
        :func:`flare_dsc_nsd` (an organ absent from both scores 1).
    """
    pred_labels, gt_labels = np.asarray(pred_labels), np.asarray(gt_labels)
    if pred_labels.shape != gt_labels.shape or gt_labels.ndim != 3:
        raise ValueError(
            f"expected two (X, Y, Z) label volumes of one shape, got {pred_labels.shape} "
            f"and {gt_labels.shape}"
        )
    scores = {}
    for o in organs if organs is not None else ORGANS:
        dsc, nsd = flare_dsc_nsd(
            pred_labels == o.id, gt_labels == o.id, spacing, o.nsd_tolerance_mm, z_crop=o.id in Z_CROPPED_IDS
        )
        scores[o.key] = {"dsc": dsc, "nsd": nsd}
    return scores


def organs_present(gt_labels: np.ndarray, organs: Sequence[Organ] | None = None) -> list[str]:
    """The keys of the organs (default all 13) with at least one voxel in a case's truth, in order."""
    found = set(np.unique(np.asarray(gt_labels)).tolist())
    return [o.key for o in (organs if organs is not None else ORGANS) if o.id in found]


def summarize(
    per_case: Mapping[str, Mapping[str, Mapping[str, float]]],
    present: Mapping[str, Sequence[str]] | None = None,
) -> dict:
    """Means of per-case scores, per organ and overall.

    Args:
        per_case: ``{case_id: {organ_key: {"dsc": float, "nsd": float}}}`` as :func:`score_case`
            returns it, for one or more cases.
        present: ``{case_id: [organ keys present in its truth]}`` (:func:`organs_present`); adds
            the means over present organs.

    Returns:
        ``{"dsc": float, "nsd": float, "per_organ": {organ_key: {"dsc": float, "nsd": float}}}``,
        and with ``present`` also ``dsc_present``/``nsd_present``.
        ``per_organ`` is the mean over the cases that scored that organ. The overall ``dsc``/``nsd``
        is the mean over all (case, organ) scores, organs absent from both masks included (they score
        1, the FLARE22 convention, so one stray voxel on an absent organ moves a case by 1/13). With
        every case scoring the same organs, as :func:`score_case` does, that equals both the mean
        over cases of each case's organ mean and the mean of the per-organ means.
        ``dsc_present``/``nsd_present`` is the mean over cases of each case's mean over the organs
        present in its truth (absent organs, and predictions of them, left out); a case with no
        organ present is left out; NaN when no case has one.
    """
    if not per_case:
        raise ValueError("no cases to summarize")
    by_organ: dict[str, dict[str, list[float]]] = {}
    for organs in per_case.values():
        for key, s in organs.items():
            acc = by_organ.setdefault(key, {"dsc": [], "nsd": []})
            acc["dsc"].append(float(s["dsc"]))
            acc["nsd"].append(float(s["nsd"]))
    every = {m: [v for acc in by_organ.values() for v in acc[m]] for m in ("dsc", "nsd")}
    out = {
        "dsc": math.fsum(every["dsc"]) / len(every["dsc"]),
        "nsd": math.fsum(every["nsd"]) / len(every["nsd"]),
        "per_organ": {
            key: {m: math.fsum(acc[m]) / len(acc[m]) for m in ("dsc", "nsd")} for key, acc in by_organ.items()
        },
    }
    if present is not None:
        for m in ("dsc", "nsd"):
            means = [
                math.fsum(float(per_case[c][k][m]) for k in keys) / len(keys)
                for c, keys in present.items()
                if c in per_case and keys
            ]
            out[f"{m}_present"] = math.fsum(means) / len(means) if means else math.nan
    return out
