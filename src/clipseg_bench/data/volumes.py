"""3D volume <-> stack of axial 2D slices, exactly invertible, plus intensity windowing.

Conventions (every stage relies on them):

- **Canonical orientation** is RAS+ (nibabel's): the volume is first reoriented with
  ``nibabel.orientations`` so array axis 0 points to the patient's Right, axis 1 Anterior,
  axis 2 Superior. Only flips and axis permutations are applied (the closest canonical axes of
  the affine), so no voxel is ever interpolated and the map back is exact.
- **Slices** are the canonical volume cut along its S axis: ``slices[z]`` is one axial image, z
  running from inferior (0) to superior.
- **In-plane display** is the radiological convention every CT viewer uses: image row 0 is the
  most *anterior* row (anterior at the top), image column 0 is the patient's *right* (patient's
  right on the viewer's left). So ``slices[z, r, c] = ras[X-1-c, Y-1-r, z]``.

A flipped, LAS or axis-permuted copy of a scan therefore gives the very same slices as the RAS
original.
"""

from __future__ import annotations

import numpy as np
from nibabel.orientations import aff2axcodes, apply_orientation, axcodes2ornt, io_orientation, ornt_transform

CANONICAL = ("R", "A", "S")


def _to_canonical_ornt(affine: np.ndarray) -> np.ndarray:
    """The orientation transform taking an array with this affine to RAS+."""
    return ornt_transform(io_orientation(affine), axcodes2ornt(CANONICAL))


def voxel_spacing(affine: np.ndarray) -> list[float]:
    """Voxel sizes (mm) along the array axes: the column norms of the affine's 3x3 part."""
    return np.sqrt((np.asarray(affine, dtype=float)[:3, :3] ** 2).sum(axis=0)).tolist()


def volume_to_slices(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, dict]:
    """Reorient a volume to RAS+ and cut it into axial slices in display convention.

    Args:
        array: (I, J, K) volume on its original grid, any dtype.
        affine: (4, 4) voxel -> world (mm) affine of ``array``.

    Returns:
        slices: (Z, H, W) view/copy of ``array``'s voxels, same dtype; H runs anterior -> posterior,
            W runs patient right -> left, Z inferior -> superior.
        meta: what :func:`slices_to_volume` needs to undo it, all JSON-serialisable:
            ``shape`` (original array shape), ``affine`` (4x4 list), ``orientation`` (original axis
            codes, e.g. "LPS"), ``spacing`` (mm along the original array axes) and
            ``slice_spacing`` (mm as [row, column, slice]).
    """
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {array.shape}")
    affine = np.asarray(affine, dtype=float)
    ornt = _to_canonical_ornt(affine)
    ras = apply_orientation(array, ornt)
    slices = np.ascontiguousarray(ras[::-1, ::-1, :].transpose(2, 1, 0))
    spacing = voxel_spacing(affine)
    # RAS axis k came from original axis ornt[k]'s source: invert the permutation for the spacing.
    ras_spacing = [0.0, 0.0, 0.0]
    for src_axis, (dst_axis, _flip) in enumerate(ornt):
        ras_spacing[int(dst_axis)] = spacing[src_axis]
    meta = {
        "shape": [int(s) for s in array.shape],
        "affine": affine.tolist(),
        "orientation": "".join(aff2axcodes(affine)),
        "spacing": [float(s) for s in spacing],
        "slice_spacing": [float(ras_spacing[1]), float(ras_spacing[0]), float(ras_spacing[2])],
    }
    return slices, meta


def slices_to_volume(slices: np.ndarray, case_meta: dict) -> np.ndarray:
    """Exact inverse of :func:`volume_to_slices`: put (Z, H, W) slices back on the original grid.

    Args:
        slices: (Z, H, W) array of any dtype (predicted labels, probabilities, windowed images).
        case_meta: the ``meta`` from :func:`volume_to_slices`, or a ``dataset.json`` case entry
            (both hold ``shape`` and ``affine``).

    Returns:
        Array of ``case_meta["shape"]``, same dtype as ``slices``, to be saved with the original
        affine.
    """
    slices = np.asarray(slices)
    affine = np.asarray(case_meta["affine"], dtype=float)
    shape = tuple(int(s) for s in case_meta["shape"])
    ras = slices.transpose(2, 1, 0)[::-1, ::-1, :]
    back = ornt_transform(axcodes2ornt(CANONICAL), io_orientation(affine))
    volume = np.ascontiguousarray(apply_orientation(ras, back))
    if volume.shape != shape:
        raise ValueError(f"slices {slices.shape} do not fit the original grid {shape}")
    return volume


# --- intensity windowing -------------------------------------------------------------------

DEFAULT_WINDOW = "40,400"  # abdominal soft-tissue window: level 40 HU, width 400 HU -> [-160, 240]


def parse_window(spec: str | dict) -> dict:
    """Parse ``"minmax"`` or ``"LEVEL,WIDTH"`` (HU) into the window dict stored in dataset.json.

    Returns:
        ``{"mode": "minmax"}`` or ``{"mode": "hu", "level": float, "width": float}``.

    Raises:
        ValueError: on anything else (prepare turns it into an InputError naming ``--window``).
    """
    if isinstance(spec, dict):
        return dict(spec)
    text = str(spec).strip().lower()
    if text == "minmax":
        return {"mode": "minmax"}
    parts = text.split(",")
    try:
        level, width = (float(p) for p in parts)
    except ValueError:
        raise ValueError(f"window {spec!r} is neither 'minmax' nor 'LEVEL,WIDTH' (e.g. 40,400)") from None
    if not np.isfinite([level, width]).all() or width <= 0:
        raise ValueError(f"window {spec!r} needs a finite level and a width > 0")
    return {"mode": "hu", "level": level, "width": width}


def normalize(array: np.ndarray, window: dict | str) -> np.ndarray:
    """Map intensities to uint8 [0, 255].

    Args:
        array: (Z, H, W) slices or one (H, W) slice, intensities in HU.
        window: a :func:`parse_window` dict (or its string). ``hu``: linear from level - width/2
            (-> 0) to level + width/2 (-> 255), clipped. ``minmax``: each 2D slice stretched from
            its own minimum to its own maximum, as the original study exported slices one by one;
            a constant slice becomes 0.

    Returns:
        uint8 array of the same shape.
    """
    window = parse_window(window)
    x = np.asarray(array, dtype=np.float32)
    if window["mode"] == "hu":
        lo = window["level"] - window["width"] / 2.0
        scaled = (x - lo) * (255.0 / window["width"])
    else:
        axes = (-2, -1)
        lo = x.min(axis=axes, keepdims=True)
        span = x.max(axis=axes, keepdims=True) - lo
        scaled = (x - lo) * np.divide(255.0, span, out=np.zeros_like(span), where=span > 0)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
