"""3D clean-up of predicted label volumes: per organ, the largest connected component (``lcc``).

A 2D model predicts each slice on its own, so its 3D masks carry stray blobs: a spleen-like patch
in the liver three slices up, a "left kidney" on the right kidney. nnU-Net keeps the largest
component where it helps; the CLIP-Driven Universal Model adds anatomy rules. Here:

- every organ keeps its largest 3D component (26-connectivity: thin, oblique structures such as
  the adrenal glands and the esophagus step diagonally from slice to slice on anisotropic grids,
  and face connectivity would cut them);
- paired organs (kidneys, adrenal glands) first lose every component whose centroid lies on the
  wrong side of the body's midline, then keep the largest that is left.

**Sides from the affine.** World coordinates of a NIfTI affine are RAS+: world x grows toward the
patient's *right*, so the patient's left is the side of smaller x. Array order does not matter:
component centroids go through the affine.

**The midline** is the world x of the grid's centre (the middle voxel of the field of view). CT
is reconstructed on a field of view centred on the patient, and it needs no image, so ``evaluate``,
``segment`` and ``score`` clean masks identically from labels and affine alone. Measured on the
shared real CT (TS_0001, 3 mm): grid centre x = +3.5 mm; body (HU > -500) centroid -2.0 mm;
midpoint of aorta and IVC -2.0 mm; the nearest paired-organ voxel (right adrenal) at +17 mm, the
left adrenal's at -40 mm. A field of view reconstructed off-centre (a targeted liver FOV) moves
the midline with it: pass ``midline_x`` when the body's centre is known.

**Per organ, chosen on data** (``--postprocess auto``): the clean-up helps blob-like organs that
collect strays and hurts thin ones a 2D model breaks into pieces (keeping the largest piece of an
aorta drops the rest). :func:`choose_organ_modes` keeps ``lcc`` for an organ only where it raised
the organ's mean score over cases it was chosen on (out-of-fold cases: ``study/choices.py``), and
:func:`postprocess` applies such a choice per organ. Components never mix labels and each organ's
largest component is found on its own, so cleaning some organs and not others is exact.

Labelling is connected-components-3d's (cc3d): one pass over the multi-label volume labels every
organ, with sizes and centroids. ``benchmarks/postprocess_speed.py`` measured it against
scipy.ndimage.label per organ: 15-22x faster on CT-sized volumes, same voxels kept.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import cc3d
import numpy as np

from clipseg_bench.errors import FieldError, InputError
from clipseg_bench.organs import organ

POSTPROCESS_MODES = ("none", "lcc")  # what evaluate scores every run with
AUTO = "auto"  # per organ, as a run's recorded choice says (postprocess.json)


def check_postprocess_mode(mode: str, *, auto: bool = False) -> None:
    """``--postprocess`` of evaluate, segment and score: one of :data:`POSTPROCESS_MODES`, or
    :data:`AUTO` where ``auto`` (commands that read a run, which may hold a choice)."""
    modes = POSTPROCESS_MODES + ((AUTO,) if auto else ())
    if mode not in modes:
        raise FieldError("postprocess", f"unknown mode {mode!r}; choose from {', '.join(modes)}")


def choose_organ_modes(gains: Mapping[str, Sequence[float]]) -> dict[str, str]:
    """Per organ, ``lcc`` where the clean-up raised its mean score, else ``none``.

    Args:
        gains: organ key -> the score after ``lcc`` minus the score as predicted, one value per case
            (each case once: seeds averaged within a case first), on the cases the choice is made on.

    Returns:
        organ key -> ``"lcc"`` | ``"none"``; an organ without a finite gain stays ``none``.
    """
    out = {}
    for key, values in gains.items():
        finite = [float(v) for v in values if np.isfinite(v)]
        out[key] = "lcc" if finite and float(np.mean(finite)) > 0 else "none"
    return out


def organ_modes(choice: Mapping) -> dict[int, str]:
    """A recorded choice (postprocess.json) as FLARE22 id -> mode.

    Raises:
        FieldError: a choice without ``organs``, or with an unknown organ or mode.
    """
    organs = choice.get("organs") if isinstance(choice, Mapping) else None
    if not isinstance(organs, Mapping):
        raise FieldError("postprocess", "the recorded choice has no 'organs' mapping")
    out = {}
    for key, mode in organs.items():
        if mode not in POSTPROCESS_MODES:
            raise FieldError("postprocess", f"the recorded choice gives {key!r} the unknown mode {mode!r}")
        try:
            out[organ(key).id] = mode
        except InputError as exc:
            raise FieldError("postprocess", f"the recorded choice names {exc.problem}") from None
    return out


def recorded_choice(run) -> tuple[dict, dict[int, str]]:
    """``--postprocess auto``: a run's recorded clean-up choice (RUN/postprocess.json, written by
    ``benchmark --postprocess auto``) and its per-organ modes (:func:`organ_modes`).

    Returns:
        (the choice as recorded, FLARE22 id -> ``none`` | ``lcc``).

    Raises:
        InputError: the run records no choice (naming the run folder), or a malformed one (naming
            postprocess.json).
    """
    from clipseg_bench.run_folder import RunFolder

    folder = RunFolder(run)
    choice = folder.postprocess_choice()
    if choice is None:
        raise InputError(
            folder.path,
            "has no recorded clean-up choice (postprocess.json) for --postprocess auto: "
            "`benchmark --folds all --postprocess auto` makes it on out-of-fold scores",
        )
    try:
        return choice, organ_modes(choice)
    except FieldError as exc:  # the file is what is wrong, not the flag
        raise InputError(folder.postprocess_path, exc.problem) from None


# FLARE22 ids of paired organs -> the side they belong on (patient's side).
PAIRED_SIDES = {2: "right", 7: "right", 8: "left", 13: "left"}


def grid_midline_x(shape, affine: np.ndarray) -> float:
    """World x (mm, RAS+) of the centre of a volume's grid: the default midline."""
    centre = (np.asarray(shape[:3], dtype=float) - 1.0) / 2.0
    return float(np.asarray(affine, dtype=float)[0, :3] @ centre + affine[0][3])


def keep_largest_components(
    labels: np.ndarray,
    affine: np.ndarray,
    *,
    midline_x: float | None = None,
    sides: Mapping[int, str] = PAIRED_SIDES,
) -> np.ndarray:
    """Per organ, keep the largest 3D connected component; paired organs only on their own side.

    Args:
        labels: (X, Y, Z) integer label volume (FLARE22 ids, 0 = background), any array order.
        affine: (4, 4) voxel -> world (mm) affine of ``labels`` (RAS+ world, as NIfTI's).
        midline_x: world x (mm) of the body's midline; default :func:`grid_midline_x`.
        sides: label id -> ``"left"`` | ``"right"``, the patient's side of each paired organ
            (default FLARE22's kidneys and adrenal glands); ``{}`` turns the side rule off.

    Returns:
        A copy of ``labels`` with removed voxels set to 0 (same dtype). An organ with no voxels
        stays empty; a paired organ with every component on the wrong side becomes empty. Ties in
        size keep the component met first in C-order scan, whatever the input's memory order.
    """
    # C order: cc3d numbers components in memory order, and ties in size go to the first number,
    # so a Fortran-ordered copy (as nibabel loads) must not break them differently.
    labels = np.ascontiguousarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"expected a 3D label volume, got shape {labels.shape}")
    affine = np.asarray(affine, dtype=float)
    midline = grid_midline_x(labels.shape, affine) if midline_x is None else float(midline_x)
    # One pass labels every organ's components (a component never mixes two labels).
    comp, n = cc3d.connected_components(labels, connectivity=26, return_N=True)
    if n == 0:
        return labels.copy()
    stats = cc3d.statistics(comp, no_slice_conversion=True)
    sizes = stats["voxel_counts"].astype(np.int64)
    world_x = stats["centroids"] @ affine[0, :3] + affine[0, 3]  # (n + 1,) centroid x in mm
    owner = np.zeros(n + 1, dtype=np.int64)
    owner[comp.ravel()] = labels.ravel()  # the label each component belongs to
    keep = np.zeros(n + 1, dtype=bool)
    for organ_id in np.unique(owner[1:]):
        ids = np.flatnonzero(owner == organ_id)
        ids = ids[ids > 0]
        side = sides.get(int(organ_id))
        if side is not None:  # RAS+: the patient's right is +x
            ids = ids[world_x[ids] >= midline] if side == "right" else ids[world_x[ids] <= midline]
        if len(ids):
            keep[ids[np.argmax(sizes[ids])]] = True
    return np.where(keep[comp], labels, 0).astype(labels.dtype)


def postprocess(
    labels: np.ndarray, affine: np.ndarray, mode: str, modes: Mapping[int, str] | None = None
) -> np.ndarray:
    """Apply a clean-up mode to a label volume: ``none`` returns it unchanged, ``lcc`` is
    :func:`keep_largest_components`, ``auto`` applies ``lcc`` to the organs ``modes`` (FLARE22 id ->
    mode, :func:`organ_modes`) gives it and leaves the others as predicted."""
    if mode == "none":
        return labels
    if mode == "lcc":
        return keep_largest_components(labels, affine)
    if mode == AUTO:
        if modes is None:
            raise ValueError("postprocess auto needs the per-organ modes of a recorded choice")
        cleaned_ids = [i for i, m in modes.items() if m == "lcc"]
        if not cleaned_ids:
            return labels
        cleaned = keep_largest_components(labels, affine)
        return np.where(np.isin(labels, cleaned_ids), cleaned, labels).astype(labels.dtype)
    raise ValueError(f"unknown postprocess mode {mode!r}; choose from {', '.join(POSTPROCESS_MODES)}")
