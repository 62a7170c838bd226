"""What CLIPSeg's three input channels hold: one gray slice, three neighbouring slices, or three windows.

CLIPSeg takes RGB. The original study copies one windowed gray slice into all three channels
(``gray``), which wastes two channels and all 3D context. Two alternatives fill them:

- ``neighbors``: slices z-1, z, z+1 of the same case (the prepared uint8 cache) as R, G, B: 2.5D
  context, as BiomedParse v2 infers. At the first and last slice the edge slice is repeated. The
  neighbours are the next slices of the grid whatever its spacing (thick slices give far neighbours;
  ``manifest.csv`` ``spacing_z`` says how far).
- ``windows``: the same slice under three HU windows, from the prepared int16 HU cache:
  soft tissue 40/400 ([-160, 240]: every abdominal organ against fat; the default gray window, so
  R is the ``gray`` image of a default-prepared dataset), liver 80/150 ([5, 155]: the organ
  range of both non-contrast (liver ~55 HU, kidney ~30, bile ~10) and portal-venous CT
  (liver/spleen ~100-120), at 2.7x the contrast of the soft-tissue window: organ-to-organ
  borders), and wide 0/1000 ([-500, 500]: bowel gas against fat, contrast-filled vessels against
  bone, which the soft-tissue window clips together).

Every mode gives uint8 images, so resizing, augmentation and CLIPSeg's mean/std normalisation are
the same code for all three: ``gray`` as (N, H, W), the others as (N, 3, H, W).
"""

from __future__ import annotations

import numpy as np

from clipseg_bench.data.volumes import normalize

CHANNEL_MODES = ("gray", "neighbors", "windows")
# (level, width) in HU of the R, G, B channels of ``windows`` (see the module docstring).
WINDOWS: tuple[dict, ...] = (
    {"mode": "hu", "level": 40.0, "width": 400.0},
    {"mode": "hu", "level": 80.0, "width": 150.0},
    {"mode": "hu", "level": 0.0, "width": 1000.0},
)


def needs_hu(mode: str) -> bool:
    """Whether a channel mode reads the HU cache (else only the windowed uint8 cache)."""
    return mode == "windows"


def neighbor_indices(z: np.ndarray, n_slices: int) -> np.ndarray:
    """(N,) slice indices -> (N, 3) indices of z-1, z, z+1, clipped to [0, n_slices - 1] (edges repeat)."""
    z = np.asarray(z, dtype=np.int64).reshape(-1)
    return np.clip(z[:, None] + np.array([-1, 0, 1]), 0, n_slices - 1)


def hu_slices(slices: np.ndarray) -> np.ndarray:
    """Slices in HU -> int16 (rounded, clipped to int16's range): CT HU fit with room to spare."""
    info = np.iinfo(np.int16)
    return np.clip(np.rint(np.asarray(slices, dtype=np.float32)), info.min, info.max).astype(np.int16)


def channel_images(
    z, *, mode: str, gray: np.ndarray, hu: np.ndarray | None = None, windows=WINDOWS
) -> np.ndarray:
    """The model's uint8 input images for slices ``z`` of one case.

    Args:
        z: slice indices (int or sequence) into the case's stacks.
        mode: ``gray`` | ``neighbors`` | ``windows``.
        gray: (Z, H, W) uint8 windowed slices of the case (a memmap is read only where needed).
        hu: (Z, H, W) slices in HU (int16 cache); needed by ``windows`` only.
        windows: the three :func:`~clipseg_bench.data.volumes.parse_window` dicts of ``windows``.

    Returns:
        ``gray``: (N, H, W) uint8; ``neighbors`` and ``windows``: (N, 3, H, W) uint8 (R, G, B).
    """
    z = np.asarray(z, dtype=np.int64).reshape(-1)
    if mode == "gray":
        return np.asarray(gray[z])
    if mode == "neighbors":
        idx = neighbor_indices(z, len(gray))
        return np.asarray(gray[idx.ravel()]).reshape(len(z), 3, *gray.shape[1:])
    if mode == "windows":
        if hu is None:
            raise ValueError("input_channels 'windows' needs the slices in HU")
        if len(windows) != 3:
            raise ValueError(f"'windows' needs three windows, got {len(windows)}")
        x = np.asarray(hu[z])
        return np.stack([normalize(x, w) for w in windows], axis=1)
    raise ValueError(f"unknown input_channels {mode!r}; choose from {', '.join(CHANNEL_MODES)}")
