"""Reading and validating CT and label volumes: NIfTI through nibabel, DICOM series through SimpleITK.

This is the one reader every stage uses. A CT is a NIfTI file or a folder holding one DICOM series
(:mod:`clipseg_bench.data.dicom`, converted exactly to nibabel's RAS affine); labels are NIfTI.
Every problem with a user's file becomes an :class:`~clipseg_bench.errors.InputError` that names the
file: corrupt or truncated files, files that are not images, volumes that are not 3D, NaN/inf
intensities, non-integer or unknown label values, and image/label pairs whose grids differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import imageglobals
from nibabel.openers import ImageOpener

from clipseg_bench.data import dicom
from clipseg_bench.errors import InputError
from clipseg_bench.organs import BY_ID, LabelMap

NIFTI_SUFFIXES = (".nii.gz", ".nii")
AFFINE_ATOL_MM = 1e-3  # label exports often round the affine in the last float digits
MAX_LABEL_ID = 65535  # a label volume with larger ids is almost surely an image given as a label
CHANNEL_SUFFIX = "_0000"  # nnU-Net/FLARE22 channel suffix of CT images
# `segment` marks its masks in the NIfTI header's description ("this file is ours, may be replaced"),
# and writes <mask>_probabilities.nii.gz beside a mask with --probabilities.
SEGMENT_DESCRIPTION = b"clipseg-bench segment"
PROBABILITIES_SUFFIX = "_probabilities"


def strip_nifti_suffix(name: str) -> str | None:
    """``"case_0000.nii.gz"`` -> ``"case_0000"``; None if the name is not a NIfTI file name."""
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def nifti_files(folder: str | Path, *, ignore_other_files: bool = False) -> dict[str, Path]:
    """The NIfTI files of a folder by case id (the name without ``.nii``/``.nii.gz``), sorted.

    Hidden files (``._x`` from macOS) and sub-folders are ignored, and so are other files with
    ``ignore_other_files`` (a prediction folder may hold the CSV that ``score`` wrote into it).

    Raises:
        InputError: the folder is missing or not a folder, a case has two files (``.nii`` and
            ``.nii.gz``), or (without ``ignore_other_files``) a file is not a NIfTI file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "not a folder" if folder.exists() else "not a folder: it does not exist")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.is_dir():
            continue
        stem = strip_nifti_suffix(path.name)
        if stem is None:
            if ignore_other_files:
                continue
            raise InputError(path, "not a NIfTI file (expected .nii or .nii.gz)")
        if stem in found:
            raise InputError(path, f"case {stem!r} has two files here (also {found[stem].name})")
        found[stem] = path
    return found


def image_case_id(name: str) -> str:
    """A CT's case id from its name: a NIfTI file's name without ``.nii``/``.nii.gz``, or a DICOM
    series folder's name, less a trailing ``_0000`` (nnU-Net's channel 0): ``"case_0000"`` -> ``"case"``.
    The same rule for files and folders, in `prepare` and `segment` alike."""
    return name[: -len(CHANNEL_SUFFIX)] if name.endswith(CHANNEL_SUFFIX) else name


def case_ids(found: dict[str, Path]) -> dict[str, Path]:
    """CTs by name (:func:`image_files`) -> CTs by case id (:func:`image_case_id`), sorted.

    Raises:
        InputError: naming both sources when two of them have one case id (``a.nii.gz`` and
            ``a_0000.nii.gz``, or a file and a series folder): one of them would be lost.
    """
    cases: dict[str, Path] = {}
    for name, path in found.items():
        case = image_case_id(name)
        if case in cases:
            raise InputError(
                path, f"case id {case!r} is also that of {cases[case]}; rename or move one of the two CTs"
            )
        cases[case] = path
    return dict(sorted(cases.items()))


def image_files(folder: str | Path, *, ignore_other_files: bool = False) -> dict[str, Path]:
    """The CTs of a folder by name: NIfTI files (as :func:`nifti_files`) and sub-folders holding one
    DICOM series each (named by the sub-folder). Other sub-folders are ignored.

    Raises:
        InputError: as :func:`nifti_files`, and when a NIfTI file and a DICOM folder share a name.
    """
    found = nifti_files(folder, ignore_other_files=ignore_other_files)
    for sub in sorted(p for p in Path(folder).iterdir() if p.is_dir() and not p.name.startswith(".")):
        if dicom.is_dicom_folder(sub):
            if sub.name in found:
                raise InputError(sub, f"case {sub.name!r} has two images here (also {found[sub.name].name})")
            found[sub.name] = sub
    return dict(sorted(found.items()))


def ct_sources(path: str | Path) -> dict[str, Path]:
    """What a user may give as CT input, as {case id: source}: one NIfTI file, one DICOM series
    folder, or a folder of NIfTI files and/or DICOM series folders. Case ids drop ``_0000``. In a
    folder, other files (BIDS ``.json`` sidecars, notes) are ignored.

    Raises:
        InputError: the path does not exist, or a folder holds no CT (or a file that is not one).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "not found")
    if path.is_file():
        stem = strip_nifti_suffix(path.name)
        return {image_case_id(stem if stem is not None else path.stem): path}
    if dicom.is_dicom_folder(path):
        return {image_case_id(path.name): path}
    sources = case_ids(image_files(path, ignore_other_files=True))
    if not sources:
        raise InputError(path, "no CT here: no .nii/.nii.gz files and no DICOM series folders")
    return sources


def _load(path: Path):
    """nibabel's lazy image (header parsed, voxels not yet read), its header checked as stored."""
    if not path.is_file():
        raise InputError(path, "file not found")
    _check_stored_spacing(path)
    try:
        with imageglobals.LoggingOutputSuppressor():  # its header fix-ups would print lines of their own
            return nib.load(str(path))
    except MemoryError:
        raise
    except Exception as exc:  # nibabel, gzip and zlib each raise their own types for bad bytes
        raise InputError(path, f"cannot read as a NIfTI image ({_why(exc)})") from None


def _stored_header(path: Path):
    """The NIfTI-1 or -2 header exactly as stored; None when it is neither (nib.load then says why)."""
    for klass in (nib.Nifti1Header, nib.Nifti2Header):
        try:
            with ImageOpener(str(path)) as fh:
                header = klass.from_fileobj(fh, check=False)
        except Exception:  # a short or foreign file: not this kind
            continue
        if int(header["sizeof_hdr"]) == klass.sizeof_hdr:
            return header
    return None


def _check_stored_spacing(path: Path) -> None:
    """Refuse a header whose voxel spacing (pixdim 1-3) is zero or not finite.

    nibabel "fixes" such a header on load by setting the spacing to 1 mm (with a warning): a CT
    would then be prepared, and its 3D metrics (NSD tolerances in mm, volumes) computed, at a made-up
    voxel size. FLARE22's evaluation reads the spacing from these fields.
    """
    header = _stored_header(path)
    if header is None:
        return
    spacing = np.asarray(header["pixdim"][1:4], dtype=float)
    if not np.isfinite(spacing).all() or (spacing == 0).any():
        shown = ", ".join(f"{v:g}" for v in spacing)
        raise InputError(
            path,
            f"the header's voxel spacing (pixdim {shown}) is zero or not finite: the voxel size is unknown "
            "(3D metrics are in mm); write the file again with its spacing",
        )


def _why(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return f"{exc.__class__.__name__}: {text[:160]}" if text else exc.__class__.__name__


@dataclass(frozen=True)
class Header:
    """What a volume's header says, read without decompressing the voxels."""

    path: Path
    shape: tuple[int, ...]
    affine: np.ndarray
    zooms: tuple[float, ...]


def _squeezed_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Drop trailing length-1 axes beyond the third: an (X, Y, Z, 1) file is a 3D volume."""
    shape = tuple(int(s) for s in shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def read_header(path: str | Path, img=None) -> Header:
    """Read and check a volume's header only (fast): readable, 3D, a usable affine.

    Args:
        path: the file.
        img: its already-loaded nibabel image, if the caller has one.

    Raises:
        InputError: naming ``path`` when the file is not a readable 3D NIfTI image.
    """
    path = Path(path)
    if img is None and path.is_dir():
        series = dicom.scan_series(path)
        return Header(path=path, shape=series.shape, affine=series.affine, zooms=series.zooms)
    img = _load(path) if img is None else img
    shape = _squeezed_shape(img.shape)
    if len(shape) != 3:
        raise InputError(path, f"not a 3D volume (shape {shape})")
    if min(shape) < 1:
        raise InputError(path, f"empty volume (shape {shape})")
    affine = np.asarray(img.affine, dtype=float)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(path, "the header's affine is singular or not finite")
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    return Header(path=path, shape=shape, affine=affine, zooms=zooms)


def check_same_grid(reference: Header, other: Header, *, names: tuple[str, str] = ("image", "label")) -> None:
    """Raise an InputError naming ``other``'s file when its grid (shape, affine) is not ``reference``'s.

    Args:
        names: what the two files are, for the message (e.g. ``("ground truth", "prediction")``).
    """
    ref_name, name = names
    if reference.shape != other.shape:
        raise InputError(
            other.path,
            f"{name} shape {other.shape} differs from the {ref_name} shape {reference.shape} ({reference.path})",
        )
    if not np.allclose(reference.affine, other.affine, atol=AFFINE_ATOL_MM, rtol=0):
        raise InputError(
            other.path,
            f"{name} affine (orientation, spacing or origin) differs from the {ref_name} affine ({reference.path})",
        )


def _read_data(path: Path, img, shape: tuple[int, ...], dtype=None) -> np.ndarray:
    """The voxels, raw (``dtype=None``) or scaled to ``dtype``, reshaped to the squeezed shape."""
    try:
        if dtype is None:
            return np.asanyarray(img.dataobj).reshape(shape)
        return img.get_fdata(dtype=dtype).reshape(shape)
    except MemoryError:
        raise
    except Exception as exc:  # truncated gzip streams fail here, not at load time
        raise InputError(path, f"corrupt or truncated image data ({_why(exc)})") from None


def read_volume(path: str | Path) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Read a CT volume and check it.

    Args:
        path: a .nii or .nii.gz file, or a folder holding one DICOM CT series.

    Returns:
        array: float32 (I, J, K) intensities (HU for CT), header scaling applied.
        affine: (4, 4) float voxel -> world (mm), RAS (a DICOM series' LPS geometry converted).
        zooms: voxel sizes in mm from the header.

    Raises:
        InputError: corrupt/truncated/non-image file, not 3D, singular affine, NaN or inf values,
            and for DICOM what :func:`clipseg_bench.data.dicom.scan_series` refuses.
    """
    path = Path(path)
    if path.is_dir():
        array, affine, zooms, _ = dicom.read_series(path)
    else:
        img = _load(path)
        header = read_header(path, img)
        array, affine, zooms = _read_data(path, img, header.shape, np.float32), header.affine, header.zooms
    finite = np.isfinite(array)
    if not finite.all():
        raise InputError(path, f"{int((~finite).sum())} voxels are NaN or inf")
    return array, affine, zooms


def read_label_volume(path: str | Path) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Read a label volume: like :func:`read_volume`, but integer ids, checked to be integers.

    Returns:
        array: integer (I, J, K) source label ids, in the file's int dtype (not yet mapped to FLARE22).
        affine, zooms: as :func:`read_volume`.

    Raises:
        InputError: as :func:`read_volume`, plus non-integer or negative label values.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(path, "labels must be NIfTI files (.nii/.nii.gz), not a folder")
    img = _load(path)
    header = read_header(path, img)
    raw = _read_data(path, img, header.shape)
    scaled = getattr(img.dataobj, "slope", 1) != 1 or getattr(img.dataobj, "inter", 0) != 0
    if raw.dtype.kind not in "iub" or scaled:
        raw = _read_data(path, img, header.shape, np.float64)  # applies any header scaling
        if not np.isfinite(raw).all():
            raise InputError(path, "label volume holds NaN or inf values")
        fractional = raw != np.round(raw)
        if fractional.any():
            example = float(raw[fractional].flat[0])
            raise InputError(path, f"label values must be integers (found {example:g})")
        raw = raw.astype(np.int32 if raw.max(initial=0) < 2**31 else np.int64)
    labels = raw.astype(np.uint8) if raw.dtype == bool else raw  # keep the file's (small) int dtype
    if labels.size and labels.min() < 0:
        raise InputError(path, f"label values must be >= 0 (found {int(labels.min())})")
    return labels, header.affine, header.zooms


def map_labels(labels: np.ndarray, label_map: LabelMap, path: str | Path) -> np.ndarray:
    """Source ids -> FLARE22 ids (uint8) through the label map.

    Raises:
        InputError: naming ``path`` when a value is unknown to a map without a default.
    """
    max_id = int(labels.max()) if labels.size else 0
    if max_id > MAX_LABEL_ID:
        raise InputError(path, f"label value {max_id} is too large for a label volume")
    lut = label_map.lut(max_id)
    mapped = lut[labels]
    unknown = mapped < 0
    if unknown.any():
        ids = np.unique(labels[unknown])
        shown = ", ".join(str(int(i)) for i in ids[:8]) + (", ..." if len(ids) > 8 else "")
        raise InputError(path, f"label values the label map {label_map.source!r} does not know: {shown}")
    return mapped.astype(np.uint8)


def read_organ_masks(files: list[tuple[Path, int]], shape: tuple[int, ...]) -> np.ndarray:
    """One FLARE22 label volume from binary per-organ masks (``<case>/segmentations/<organ>.nii.gz``).

    Args:
        files: (mask file, FLARE22 id) pairs; several files may name one organ (their union is it).
        shape: the CT's (I, J, K); each mask's grid was checked against the CT's beforehand.

    Returns:
        uint8 (I, J, K) FLARE22 ids, 0 where no mask is set.

    Raises:
        InputError: naming the mask file when it is not binary (one nonzero value), has another
            shape, or overlaps a mask of another organ.
    """
    labels = np.zeros(shape, dtype=np.uint8)
    owner: dict[int, Path] = {}
    for path, organ_id in files:
        mask, _, _ = read_label_volume(path)
        if mask.shape != tuple(shape):
            raise InputError(path, f"mask shape {mask.shape} differs from the CT shape {tuple(shape)}")
        on = mask != 0
        set_values = mask[on]
        if set_values.size and (set_values != set_values.flat[0]).any():  # one pass, no sort
            values = np.unique(mask)
            raise InputError(path, f"not a binary mask (values {', '.join(map(str, values[:6].tolist()))})")
        clash = on & (labels != 0) & (labels != organ_id)
        if clash.any():
            other = owner[int(labels[clash].flat[0])]
            raise InputError(
                path,
                f"{BY_ID[organ_id].name} overlaps {other.name} ({int(clash.sum())} voxels); organ masks "
                "must not overlap (fix them, or map one to 0 with a label map's names)",
            )
        labels[on] = organ_id
        owner[organ_id] = path
    return labels


def written_by_segment(path: str | Path) -> bool:
    """Whether ``path`` is a NIfTI file `segment` wrote (its header description says so)."""
    try:
        with imageglobals.LoggingOutputSuppressor():
            return bytes(nib.load(str(path)).header["descrip"]).startswith(SEGMENT_DESCRIPTION)
    except Exception:  # not NIfTI, unreadable: not ours
        return False
