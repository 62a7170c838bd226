"""Helpers for the data-stage tests: tiny hand-made volumes written as NIfTI in FLARE22 layout."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

AFFINE = np.diag([0.8, 0.8, 2.5, 1.0])  # anisotropic, RAS


def small_case(seed: int = 0, shape=(24, 20, 10)) -> tuple[np.ndarray, np.ndarray]:
    """A small int16 HU volume and a uint8 label volume with liver (1) and left kidney (13) blocks."""
    rng = np.random.default_rng(seed)
    image = rng.normal(0, 30, size=shape).astype(np.int16)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[2:10, 3:12, 2:8] = 1
    labels[14:20, 8:16, 3:6] = 13
    image[labels == 1] += 60
    return image, labels


def save(array: np.ndarray, path: Path, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


class Layout:
    """An input folder in FLARE22 layout under ``root``: images/<case>_0000.nii.gz, labels/<case>.nii.gz."""

    def __init__(self, root: Path):
        self.root = root
        self.images = root / "images"
        self.labels = root / "labels"
        self.images.mkdir(parents=True, exist_ok=True)
        self.labels.mkdir(parents=True, exist_ok=True)

    def image_path(self, case: str) -> Path:
        return self.images / f"{case}_0000.nii.gz"

    def label_path(self, case: str) -> Path:
        return self.labels / f"{case}.nii.gz"

    def add(self, case: str, image=None, labels=None, affine=AFFINE, label_affine=None, seed: int = 0):
        img, lab = small_case(seed)
        save(img if image is None else image, self.image_path(case), affine)
        save(
            lab if labels is None else labels,
            self.label_path(case),
            affine if label_affine is None else label_affine,
        )
        return self

    def args(self, out: Path, *extra: str) -> list[str]:
        return [
            "prepare",
            "--images",
            str(self.images),
            "--labels",
            str(self.labels),
            "--out",
            str(out),
            *extra,
        ]
