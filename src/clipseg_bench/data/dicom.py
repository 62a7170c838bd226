"""Reading one DICOM CT series (a folder of slice files) as a 3D volume, through SimpleITK.

Why SimpleITK: its ``ImageSeriesReader`` decodes through GDCM, which reads the transfer syntaxes
hospital archives use (uncompressed, JPEG lossless, JPEG 2000, JPEG-LS, RLE) without extra
plugins, applies the rescale slope/intercept (-> HU), and its pip wheel is self-contained.
dicom2nifti (TotalSegmentator's choice) needs pydicom plus separate codec packages for compressed
data, and writes a NIfTI file we would then read back.

Geometry is SimpleITK's, converted exactly to nibabel's convention: ITK/DICOM world coordinates are
LPS, NIfTI/nibabel's are RAS, so the voxel -> world affine is ``diag(-1, -1, 1, 1) @ A_lps`` (the
first two world axes flip; voxel axes are ITK's i, j, k). That is what SimpleITK's own NIfTI writer
does, so a series read here has the grid and affine of its NIfTI conversion (tested).

Before any voxel is decoded, :func:`scan_series` reads every slice header and refuses what a
volume cannot be built from: several series in one folder, a modality other than CT, slices of
different sizes or orientations, duplicate positions, missing slices, uneven spacing and slices
not stacked along their normal (gantry tilt). Each is a one-line :class:`InputError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipseg_bench.errors import InputError

DICOM_MAGIC_OFFSET = 128  # DICOM Part 10 files: 128-byte preamble, then b"DICM"
MODALITY_TAG = "0008|0060"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
SPACING_RTOL = 0.01  # slice steps may differ by 1% (rounded positions) before "uneven" is declared
POSITION_ATOL_MM = 0.01


def _sitk():
    import SimpleITK as sitk  # imported on use: NIfTI-only runs never load ITK

    # ITK prints its warnings to stderr; every problem we care about is checked here and becomes
    # one InputError line, so its own warnings would only garble the CLI's output.
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    return sitk


def is_dicom_file(path: Path) -> bool:
    """True for a DICOM Part 10 file (the ``DICM`` marker after the 128-byte preamble)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(DICOM_MAGIC_OFFSET)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def is_dicom_folder(folder: str | Path) -> bool:
    """True if ``folder`` directly holds at least one DICOM file (hidden files are ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    return any(p.is_file() and not p.name.startswith(".") and is_dicom_file(p) for p in folder.iterdir())


@dataclass(frozen=True)
class Series:
    """A checked DICOM series: its slice files in stacking order and the volume's geometry.

    ``shape`` is (I, J, K) = (columns, rows, slices); ``affine`` maps those voxel indices to RAS mm.
    """

    folder: Path
    files: tuple[str, ...]
    shape: tuple[int, int, int]
    affine: np.ndarray
    zooms: tuple[float, float, float]


def ras_affine(origin, spacing, direction) -> np.ndarray:
    """ITK geometry (LPS origin, spacing, row-major 3x3 direction) -> (4, 4) RAS voxel-to-world affine."""
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(direction, float).reshape(3, 3) @ np.diag(np.asarray(spacing, float))
    lps[:3, 3] = np.asarray(origin, float)
    return LPS_TO_RAS @ lps


def _series_files(folder: Path) -> tuple[str, ...]:
    """The files of the folder's one series, in GDCM's stacking order (by position along the normal)."""
    sitk = _sitk()
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not ids:
        raise InputError(folder, "no readable DICOM series in this folder")
    if len(ids) > 1:
        shown = ", ".join(ids[:3]) + (", ..." if len(ids) > 3 else "")
        raise InputError(folder, f"holds {len(ids)} DICOM series ({shown}); give one folder per series")
    return tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), ids[0]))


@dataclass(frozen=True)
class _Slice:
    size: tuple[int, ...]
    origin: np.ndarray
    direction: np.ndarray
    spacing: tuple[float, ...]
    modality: str


def _slice_info(path: str) -> _Slice:
    sitk = _sitk()
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(path, f"cannot read as DICOM ({str(exc).strip().splitlines()[-1][:160]})") from None
    modality = reader.GetMetaData(MODALITY_TAG).strip() if reader.HasMetaDataKey(MODALITY_TAG) else ""
    return _Slice(
        size=tuple(reader.GetSize()),
        origin=np.asarray(reader.GetOrigin(), float),
        direction=np.asarray(reader.GetDirection(), float).reshape(3, 3),
        spacing=tuple(reader.GetSpacing()),
        modality=modality,
    )


def scan_series(folder: str | Path) -> Series:
    """Read and check every slice header of a one-series folder (no voxels decoded).

    Raises:
        InputError: naming the folder (or a slice file) for: no DICOM, several series, a non-CT
            modality, fewer than two slices, slices of different sizes or orientations, duplicate
            positions, missing slices, uneven spacing, slices not stacked along their normal.
    """
    folder = Path(folder)
    files = _series_files(folder)
    slices = [_slice_info(f) for f in files]
    first = slices[0]
    modalities = sorted({s.modality for s in slices})
    if modalities != ["CT"]:
        raise InputError(folder, f"modality {'/'.join(m or '(none)' for m in modalities)}, not CT")
    if len(files) == 1:
        if len(first.size) == 3 and first.size[2] > 1:  # one multi-frame file: GDCM gives its geometry
            affine = ras_affine(first.origin, first.spacing, first.direction)
            return Series(folder, files, tuple(first.size), affine, tuple(first.spacing))
        raise InputError(folder, "a single slice, not a 3D series")
    for path, s in zip(files, slices):
        if s.size[:2] != first.size[:2]:
            raise InputError(path, f"slice size {s.size[:2]} differs from {first.size[:2]} ({files[0]})")
        if not np.allclose(s.direction, first.direction, atol=1e-4):
            raise InputError(path, f"slice orientation differs from that of {files[0]}")
    # ITK stacks the files in the order given and takes the slice normal as the third axis, so they
    # must run along the normal: sorted by position on it (not trusting the folder's or GDCM's order).
    order = np.argsort([s.origin @ first.direction[:, 2] for s in slices], kind="stable")
    files, slices = tuple(files[i] for i in order), [slices[i] for i in order]
    first = slices[0]
    _check_stacking(folder, files, np.stack([s.origin for s in slices]), first.direction[:, 2])
    # The series geometry exactly as ITK's ImageSeriesReader builds it: the first slice's origin and
    # orientation, and the mean step between the first and the last slice.
    step = np.linalg.norm(slices[-1].origin - first.origin) / (len(files) - 1)
    spacing = (float(first.spacing[0]), float(first.spacing[1]), float(step))
    affine = ras_affine(first.origin, spacing, first.direction)
    return Series(folder, files, (int(first.size[0]), int(first.size[1]), len(files)), affine, spacing)


def _check_stacking(folder: Path, files: tuple[str, ...], origins: np.ndarray, normal: np.ndarray) -> None:
    """Slices must lie along their normal at one even step: no duplicates, gaps, uneven steps or tilt."""
    along = (origins - origins[0]) @ normal
    sideways = np.linalg.norm((origins - origins[0]) - along[:, None] * normal[None, :], axis=1)
    if sideways.max() > max(POSITION_ATOL_MM, 1e-3 * np.abs(along).max()):
        raise InputError(
            folder, "slices are not stacked along their normal (gantry tilt?); resample it first"
        )
    steps = np.diff(along)  # >= 0: sorted by ``along``
    if steps.min() <= POSITION_ATOL_MM:
        i = int(np.argmin(steps))
        raise InputError(
            folder, f"two slices at the same position ({Path(files[i]).name}, {Path(files[i + 1]).name})"
        )
    base = float(steps.min())
    tol = max(POSITION_ATOL_MM, SPACING_RTOL * base)
    if steps.max() - base <= tol:
        return
    multiple = np.round(steps / base)
    if np.all(np.abs(steps - multiple * base) <= tol):  # every step a whole number of spacings: gaps
        i = int(np.argmax(multiple))
        raise InputError(
            folder,
            f"{int((multiple - 1).sum())} missing slice(s): a {steps[i]:.2f} mm gap between "
            f"{Path(files[i]).name} and {Path(files[i + 1]).name} where the spacing is {base:.2f} mm",
        )
    raise InputError(folder, f"uneven slice spacing ({base:.3f} to {steps.max():.3f} mm); resample it first")


def read_series(folder: str | Path) -> tuple[np.ndarray, np.ndarray, tuple[float, ...], Series]:
    """Read a checked DICOM CT series.

    Returns:
        array: float32 (I, J, K) = (columns, rows, slices) in HU (rescale slope/intercept applied).
        affine: (4, 4) RAS voxel -> world (mm), as SimpleITK's NIfTI conversion writes it.
        zooms: voxel sizes (mm).
        series: the checked header information (:func:`scan_series`).

    Raises:
        InputError: as :func:`scan_series`, plus pixel data that cannot be decoded.
    """
    series = scan_series(folder)
    sitk = _sitk()
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(series.files))
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(
            series.folder, f"cannot decode the pixel data ({str(exc).strip().splitlines()[-1][:160]})"
        ) from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(series.folder, "not a grayscale series")
    array = sitk.GetArrayViewFromImage(image).transpose(2, 1, 0).astype(np.float32)  # (K,J,I) -> (I,J,K)
    affine = ras_affine(image.GetOrigin(), image.GetSpacing(), image.GetDirection())
    if array.shape != series.shape or not np.allclose(affine, series.affine, atol=1e-3):
        raise InputError(series.folder, "the decoded volume does not match its slice headers")
    return array, affine, tuple(float(s) for s in image.GetSpacing()), series
