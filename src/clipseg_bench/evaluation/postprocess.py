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

Labelling is scipy.ndimage's (``benchmarks/postprocess_speed.py`` measures it against
connected-components-3d).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

POSTPROCESS_MODES = ("none", "lcc")
# FLARE22 ids of paired organs -> the side they belong on (patient's side).
PAIRED_SIDES = {2: "right", 7: "right", 8: "left", 13: "left"}
_FULL = ndimage.generate_binary_structure(3, 3)  # 26-connectivity


def grid_midline_x(shape, affine: np.ndarray) -> float:
    """World x (mm, RAS+) of the centre of a volume's grid: the default midline."""
    centre = (np.asarray(shape[:3], dtype=float) - 1.0) / 2.0
    return float(np.asarray(affine, dtype=float)[0, :3] @ centre + affine[0][3])


def _components(mask: np.ndarray) -> tuple[np.ndarray, int, tuple]:
    """Label ``mask``'s 26-connected components inside its bounding box (labelling a box, not the
    whole volume, is what keeps 13 organs cheap). Returns (labels in the box, count, box slices)."""
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    comp, n = ndimage.label(mask[box], structure=_FULL)
    return comp, n, box


def _wrong_side(comp, n, box, affine: np.ndarray, side: str, midline_x: float) -> np.ndarray:
    """(n,) bool: components whose centroid lies on the other side of the midline than ``side``."""
    centroids = np.asarray(ndimage.center_of_mass(np.ones_like(comp), comp, np.arange(1, n + 1)), dtype=float)
    centroids = centroids.reshape(n, 3) + np.array([s.start for s in box], dtype=float)
    world_x = centroids @ np.asarray(affine, dtype=float)[0, :3] + affine[0][3]
    return world_x < midline_x if side == "right" else world_x > midline_x


def keep_largest_components(
    labels: np.ndarray, affine: np.ndarray, *, midline_x: float | None = None
) -> np.ndarray:
    """Per organ, keep the largest 3D connected component; paired organs only on their own side.

    Args:
        labels: (X, Y, Z) integer label volume (FLARE22 ids, 0 = background), any array order.
        affine: (4, 4) voxel -> world (mm) affine of ``labels`` (RAS+ world, as NIfTI's).
        midline_x: world x (mm) of the body's midline; default :func:`grid_midline_x`.

    Returns:
        A copy of ``labels`` with removed voxels set to 0 (same dtype). An organ with no voxels
        stays empty; a paired organ with every component on the wrong side becomes empty. Ties in
        size keep the first component in scan order.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"expected a 3D label volume, got shape {labels.shape}")
    affine = np.asarray(affine, dtype=float)
    midline = grid_midline_x(labels.shape, affine) if midline_x is None else float(midline_x)
    out = labels.copy()
    for organ_id in np.unique(labels):
        if organ_id == 0:
            continue
        comp, n, box = _components(labels == organ_id)
        allowed = np.ones(n, dtype=bool)
        if int(organ_id) in PAIRED_SIDES:
            allowed = ~_wrong_side(comp, n, box, affine, PAIRED_SIDES[int(organ_id)], midline)
        sizes = np.bincount(comp.ravel(), minlength=n + 1)[1:]
        sizes[~allowed] = 0
        keep = int(np.argmax(sizes)) + 1 if sizes.max() > 0 else 0
        region = out[box]
        region[(comp > 0) & (comp != keep)] = 0
    return out


def postprocess(labels: np.ndarray, affine: np.ndarray, mode: str) -> np.ndarray:
    """Apply a clean-up mode to a label volume: ``none`` returns it unchanged, ``lcc`` is
    :func:`keep_largest_components`."""
    if mode == "none":
        return labels
    if mode == "lcc":
        return keep_largest_components(labels, affine)
    raise ValueError(f"unknown postprocess mode {mode!r}; choose from {', '.join(POSTPROCESS_MODES)}")
