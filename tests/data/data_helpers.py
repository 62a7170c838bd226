"""Helpers for the data-stage tests: tiny hand-made volumes written as NIfTI in FLARE22 layout."""

from __future__ import annotations

import contextlib
import locale
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


@contextlib.contextmanager
def _keep_locale():
    """GDCM's writers set the C locale to "C" and leave it so; later subprocesses run with
    text=True would then decode their UTF-8 output as ASCII. Put the test process's locale back."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def write_dicom_series(
    nifti: Path,
    folder: Path,
    *,
    compressor: str | None = None,
    modality: str = "CT",
    series_uid: str = "1.2.826.0.1.3680043.2.1125.1.1",
    shift_mm: dict[int, float] | None = None,
    skip: tuple[int, ...] = (),
) -> Path:
    """Write a NIfTI volume as a DICOM series, one file per k-slice, with SimpleITK (GDCM).

    SimpleITK reads the NIfTI into ITK's LPS geometry itself, so nothing here converts coordinates.

    Args:
        compressor: None (uncompressed), "JPEG2000" or "JPEG" (GDCM's lossless JPEG).
        modality: the Modality tag.
        series_uid: SeriesInstanceUID (two calls with different UIDs into one folder: two series).
        shift_mm: slice index -> mm added to its position along the slice normal (uneven spacing).
        skip: slice indices not written (missing slices).
    """
    with _keep_locale():
        return _write_dicom_series(nifti, folder, compressor, modality, series_uid, shift_mm or {}, skip)


def _write_dicom_series(nifti, folder, compressor, modality, series_uid, shift_mm, skip) -> Path:
    import SimpleITK as sitk

    image = sitk.Cast(sitk.ReadImage(str(nifti)), sitk.sitkInt16)
    d = image.GetDirection()
    normal = np.array(d[2::3])
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()  # our UIDs, not fresh ones per file
    if compressor:
        writer.SetUseCompression(True)
        writer.SetCompressor(compressor)
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(image.GetDepth()):
        if k in skip:
            continue
        position = np.array(image.TransformIndexToPhysicalPoint((0, 0, k))) + shift_mm.get(k, 0.0) * normal
        piece = image[:, :, k]
        tags = {
            "0008|0060": modality,
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
            "0008|0018": f"{series_uid}.{k + 1}",
            "0020|000d": f"{series_uid}.0",
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0037": "\\".join(str(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
        }
        for key, value in tags.items():
            piece.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"s{series_uid.rsplit('.', 1)[-1]}_{k:04d}.dcm"))
        writer.Execute(piece)
    return folder


def nifti_conversion(folder: Path, out: Path) -> Path:
    """What a user's DICOM -> NIfTI conversion gives: SimpleITK's series reader and NIfTI writer."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    with _keep_locale():
        sitk.WriteImage(reader.Execute(), str(out))
    return out
