"""`clipseg-bench segment`: a tuned run (or a zero-shot model) + CTs -> FLARE22 masks (NIfTI).

A CT is a NIfTI file or a folder holding one DICOM series; ``--ct`` may also be a folder of them.
Each mask is written on its CT's own voxel grid with its affine (a DICOM series' NIfTI-conversion
affine), so it opens over the CT in 3D Slicer or ITK-SNAP. The model is loaded once; each slice is
encoded once for all requested organs, in batches of slices, exactly as for a single CT.

Over a folder, outputs already there are skipped, every file is written under a temporary name and
renamed, and a CT that cannot be read is reported at the end without stopping the others.

``--probabilities`` writes each organ's probability as uint8 ``round(255 p)`` with the NIfTI scale
``scl_slope = 1/255`` recorded in the header (readers such as nibabel's ``get_fdata`` give p back
within half a level, 1/510, plus float32 rounding), streamed organ by organ: while a CT is segmented
the quantised probabilities wait in a temporary organ-major file beside the output, then each
organ's volume is put on the CT's grid and appended to the gzip stream. Memory stays at about one organ's volume above a labels-only call,
instead of the float32 (X, Y, Z, K) array twice over (~16 GB for a 512x512x600 CT with 13 organs).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from nibabel.openers import Opener
from tqdm.auto import tqdm

from clipseg_bench.data.channels import channel_images, hu_slices, needs_hu
from clipseg_bench.data.io import (
    PROBABILITIES_SUFFIX,
    SEGMENT_DESCRIPTION,
    ct_sources,
    read_volume,
    strip_nifti_suffix,
    written_by_segment,
)
from clipseg_bench.data.volumes import (
    normalize,
    slices_to_volume,
    volume_to_slices,
)
from clipseg_bench.errors import FieldError, InputError
from clipseg_bench.evaluation.postprocess import AUTO, check_postprocess_mode, postprocess, recorded_choice
from clipseg_bench.evaluation.predict import Segmenter, probabilities_to_labels
from clipseg_bench.model.trained import TrainedModel, load_run_model, zeroshot_model
from clipseg_bench.organs import Organ, parse_organs
from clipseg_bench.provenance import (
    check_free_space,
    check_output_file,
    replacing,
    reserve_file,
    write_error,
)

PER_ORGAN_MODES = ("also", "only")  # --per-organ: beside the multi-label file, or instead of it
MAX_FAILURES_SHOWN = 5
PROBABILITY_LEVELS = 255  # --probabilities: uint8 round(255 p), scl_slope 1/255 in the header


def model_inputs(slices: np.ndarray, gray: np.ndarray, *, channels: str, windows) -> np.ndarray:
    """A new CT's model inputs, built like the run's training inputs.

    Args:
        slices: (Z, H, W) the CT's slices in HU (prepared slice convention).
        gray: the same slices windowed to uint8 with the run's window.
        channels: the run's input_channels mode.
        windows: the HU windows of the ``windows`` mode (the run's ``Preprocessing.windows``).

    Returns:
        (Z, H, W) uint8 for ``gray``, (Z, 3, H, W) uint8 otherwise.
    """
    hu = hu_slices(slices) if needs_hu(channels) else None
    return channel_images(np.arange(len(gray)), mode=channels, gray=gray, hu=hu, windows=windows)


def _save_nifti(array: np.ndarray, like: nib.Nifti1Image | None, affine: np.ndarray, out: Path) -> None:
    header = like.header.copy() if like is not None else None
    img = nib.Nifti1Image(array, affine, header)
    img.set_data_dtype(array.dtype)
    img.header.set_slope_inter(None, None)  # the CT's HU rescale must not touch label values
    img.header["descrip"] = SEGMENT_DESCRIPTION
    with replacing(out) as tmp:  # never a half-written mask under the real name
        nib.save(img, tmp)


# --- the model, loaded once -------------------------------------------------------------------


@dataclass
class SegmentModel:
    """What every CT is segmented with: the run's model (its organs and preprocessing: window, input
    channels, HU windows), its segmenter on the device, and for ``--postprocess auto`` the run's
    recorded per-organ clean-up (FLARE22 id -> ``none`` | ``lcc``)."""

    trained: TrainedModel
    segmenter: Segmenter
    cleanup: dict[int, str] | None = None

    @property
    def organs(self) -> list[Organ]:
        return self.trained.organs


def load_for_segment(
    *, run=None, model=None, strategy=None, organs: str | None = None, device=None, auto: bool = False
) -> SegmentModel:
    """Load a run (or a zero-shot model) once, restricted to ``organs`` (comma-separated keys); with
    ``auto``, also the run's recorded clean-up choice.

    Raises:
        InputError: no run or model; ``auto`` without a run or without a recorded choice.
    """
    cleanup = _recorded_cleanup(run) if auto else None
    if run:
        trained = load_run_model(run)
    elif model and strategy == "zeroshot":
        trained = zeroshot_model(model)
    elif model:
        raise InputError("strategy", f"--model without --run needs --strategy zeroshot (got {strategy!r})")
    else:
        raise InputError("run", "give --run RUN, or --model M --strategy zeroshot")
    if organs:
        trained.keep_organs([o.key for o in _organ_list(organs)])
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return SegmentModel(trained, trained.segmenter(dev), cleanup)


def _recorded_cleanup(run) -> dict[int, str]:
    """``--postprocess auto``: the per-organ choice the run records (postprocess.json)."""
    if not run:
        raise FieldError("postprocess", "auto applies a run's recorded choice: give --run RUN")
    return recorded_choice(run)[1]


# --- one CT -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outputs:
    """The files one CT's segmentation writes.

    ``labels``: the multi-label mask (None with ``--per-organ only``); ``organ_dir``: the folder of
    ``<organ_key>.nii.gz`` binary masks (None without ``--per-organ``); ``probabilities``: (X, Y, Z, K)
    uint8 with scale 1/255 (:class:`ProbabilityStore`) or None.
    """

    labels: Path | None
    organ_dir: Path | None
    probabilities: Path | None
    organ_keys: tuple[str, ...]

    @classmethod
    def at(cls, mask: Path, organs: list[Organ], *, per_organ: str | None, probabilities: bool) -> Outputs:
        """The outputs named after ``mask`` (``x.nii.gz``): ``x/segmentations/``, ``x_probabilities.nii.gz``."""
        stem = mask.with_name(strip_nifti_suffix(mask.name) or mask.name)
        return cls(
            labels=None if per_organ == "only" else mask,
            organ_dir=stem / "segmentations" if per_organ else None,
            probabilities=stem.with_name(f"{stem.name}{PROBABILITIES_SUFFIX}.nii.gz")
            if probabilities
            else None,
            organ_keys=tuple(o.key for o in organs),
        )

    def files(self) -> list[Path]:
        organ_files = [self.organ_dir / f"{k}.nii.gz" for k in self.organ_keys] if self.organ_dir else []
        return [p for p in (self.labels, self.probabilities) if p is not None] + organ_files

    def done(self) -> bool:
        """All written by an earlier call (a file segment did not write is redone with --overwrite)."""
        return all(p.is_file() and written_by_segment(p) for p in self.files())


class ProbabilityStore:
    """One CT's probabilities, quantised to uint8 and kept organ-major in a temporary file while the
    CT is segmented, then streamed organ by organ into a NIfTI (see the module docstring).

    The file is written and read with plain file I/O, not memory-mapped: its pages stay in the page
    cache (which the kernel may write back and drop), never in this process's memory.

    Args:
        beside: the output file; the temporary file sits beside it (same file system, not RAM).
        shape: (Z, H, W) of the CT's slices; organs: K.
        meta: the slices' geometry (:func:`~clipseg_bench.data.volumes.volume_to_slices`).
    """

    def __init__(self, beside: Path, shape: tuple[int, int, int], organs: int, meta: dict):
        self.path = beside.with_name(f".tmp-{os.getpid()}-{beside.name}.u8")
        self.shape, self.organs, self.meta = tuple(int(v) for v in shape), organs, meta
        check_free_space(
            beside.parent, self.nbytes, what=f"the probabilities of {beside.name} (a temporary file)"
        )
        self.file = None
        try:
            self.file = open(self.path, "w+b")  # noqa: SIM115 (closed by close(), after write())
            self.file.truncate(self.nbytes)
            reserve_file(self.path)  # its blocks now: a disk that fills later cannot stop it midway
        except OSError as exc:
            self.close()
            raise write_error(self.path, exc) from None

    @property
    def organ_bytes(self) -> int:
        z, h, w = self.shape
        return z * h * w

    @property
    def nbytes(self) -> int:
        """Bytes of the quantised probabilities (what the output holds before gzip)."""
        return self.organs * self.organ_bytes

    def put(self, start: int, probs: torch.Tensor) -> None:
        """Slices ``start:start+b`` from (b, K, H, W) probabilities (quantised on their device)."""
        q = (probs * PROBABILITY_LEVELS).round_().to(torch.uint8).cpu().numpy()
        plane = self.shape[1] * self.shape[2]
        for k in range(self.organs):  # organ k's slices are one contiguous run of the file
            self.file.seek(k * self.organ_bytes + start * plane)
            self.file.write(np.ascontiguousarray(q[:, k]).tobytes())

    def organ(self, k: int) -> np.ndarray:
        """(Z, H, W) uint8: organ k's quantised probabilities, read back."""
        self.file.seek(k * self.organ_bytes)
        return np.fromfile(self.file, dtype=np.uint8, count=self.organ_bytes).reshape(self.shape)

    def write(self, out: Path, affine: np.ndarray) -> None:
        """``out`` as (X, Y, Z, K) uint8 on the CT's grid, scale 1/255, written organ by organ."""
        shape = tuple(int(v) for v in self.meta["shape"])
        header = nib.Nifti1Header()
        header.set_data_shape((*shape, self.organs))
        header.set_data_dtype(np.uint8)
        header.set_sform(affine, code="aligned")  # what nib.Nifti1Image(array, affine) writes
        header.set_zooms((*nib.affines.voxel_sizes(affine), 1.0))
        header.set_slope_inter(1.0 / PROBABILITY_LEVELS, 0.0)
        header["descrip"] = SEGMENT_DESCRIPTION
        self.file.flush()
        with replacing(out) as tmp:
            with Opener(str(tmp), "wb") as fh:
                header.write_to(fh)  # the 348-byte header and the empty extension block: data at 352
                for k in range(self.organs):  # NIfTI data is Fortran-ordered: organ k's volume is contiguous
                    fh.write(slices_to_volume(self.organ(k), self.meta).tobytes(order="F"))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.file is not None:
                self.file.close()
            self.path.unlink(missing_ok=True)


def predict_volume(
    model: SegmentModel,
    ct: Path,
    *,
    threshold: float,
    batch_size: int,
    probabilities: Path | None = None,
    progress: bool = True,
    postprocess_mode: str = "none",
) -> tuple[np.ndarray, ProbabilityStore | None, np.ndarray]:
    """Segment one CT on its own grid.

    Probabilities stay on the model's device: the labels are picked there and only uint8 comes back.

    Args:
        probabilities: also keep the probabilities, for this output file (the store's temporary
            file goes beside it).
        postprocess_mode: ``none``, ``lcc`` to keep each organ's largest 3D component (paired
            organs on their own side of the midline; evaluation.postprocess), or ``auto``: ``lcc``
            for the organs the run's recorded choice gives it (``model.cleanup``). Probabilities
            stay as predicted.

    Returns:
        labels: uint8 (I, J, K) FLARE22 ids; a :class:`ProbabilityStore` (the caller writes and
        closes it) or None; affine: the CT's (4, 4) RAS affine.
    """
    pre = model.trained.preprocessing
    volume, affine, _ = read_volume(ct)
    slices, meta = volume_to_slices(volume, affine)
    del volume
    images = normalize(slices, pre.window)
    inputs = model_inputs(slices, images, channels=pre.input_channels, windows=pre.windows)
    del slices
    organ_ids = [o.id for o in model.organs]
    labels = np.zeros(images.shape, dtype=np.uint8)
    store = (
        None if probabilities is None else ProbabilityStore(probabilities, images.shape, len(organ_ids), meta)
    )
    bar = tqdm(total=len(images), desc=f"segment {ct.name}", unit="slice", leave=False, disable=not progress)
    try:
        for start, probs in model.segmenter.iter_probabilities(inputs, batch_size=batch_size, on_device=True):
            stop = start + len(probs)
            labels[start:stop] = probabilities_to_labels(probs, organ_ids, threshold=threshold).cpu().numpy()
            if store is not None:
                store.put(start, probs)
            bar.update(len(probs))
    except BaseException:
        if store is not None:
            store.close()
        raise
    bar.close()
    labels_vol = postprocess(slices_to_volume(labels, meta), affine, postprocess_mode, model.cleanup)
    return labels_vol, store, affine


def write_outputs(
    outputs: Outputs,
    labels: np.ndarray,
    probs: ProbabilityStore | None,
    affine: np.ndarray,
    *,
    ct: Path,
    organs,
) -> None:
    """Write a CT's masks, each atomically; the CT's own NIfTI header is kept where there is one.

    Raises:
        RunFailed: no room for them (checked first: their uncompressed size bounds what gzip writes).
    """
    need = labels.nbytes * (len(organs) if outputs.organ_dir is not None else 0)
    need += labels.nbytes if outputs.labels is not None else 0
    need += probs.nbytes if outputs.probabilities is not None and probs is not None else 0
    check_free_space(outputs.files()[0].parent, need, what=f"writing the masks of {ct.name} (uncompressed)")
    like = nib.load(str(ct)) if ct.is_file() else None  # a DICOM series has no NIfTI header to keep
    if outputs.organ_dir is not None:
        try:
            outputs.organ_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(outputs.organ_dir, exc) from None
        for o in organs:
            _save_nifti(
                (labels == o.id).astype(np.uint8), like, affine, outputs.organ_dir / f"{o.key}.nii.gz"
            )
    if outputs.probabilities is not None and probs is not None:
        probs.write(outputs.probabilities, affine)
    if outputs.labels is not None:
        _save_nifti(labels, like, affine, outputs.labels)


def _segment_one(
    model: SegmentModel,
    ct: Path,
    outputs: Outputs,
    *,
    threshold,
    batch_size,
    progress,
    postprocess_mode="none",
) -> list[str]:
    """Segment and write one CT; returns the keys of the organs found."""
    labels, probs, affine = predict_volume(
        model,
        ct,
        threshold=threshold,
        batch_size=batch_size,
        probabilities=outputs.probabilities,
        progress=progress,
        postprocess_mode=postprocess_mode,
    )
    try:
        write_outputs(outputs, labels, probs, affine, ct=ct, organs=model.organs)
    finally:
        if probs is not None:
            probs.close()
    found = {int(v) for v in np.unique(labels)} - {0}
    return [o.key for o in model.organs if o.id in found]


# --- the command ----------------------------------------------------------------------------------


def _is_mask_path(out: Path) -> bool:
    return strip_nifti_suffix(out.name) is not None


def _check_mask_path(out: Path) -> None:
    if not _is_mask_path(out):
        raise InputError(out, "output must end in .nii or .nii.gz")
    if not out.parent.exists():
        raise InputError(out, "output folder does not exist")


def _check_out_folder(out: Path, ct: Path) -> None:
    if out.resolve() == ct.resolve():  # masks named <case>.nii.gz would be read as CTs next time
        raise InputError(out, "--out must not be the --ct folder itself")
    if out.exists() and not out.is_dir():
        raise InputError(out, "with a folder of CTs, --out must be a folder (it is a file)")
    if _is_mask_path(out):
        raise InputError(out, "with a folder of CTs, --out must be a folder, not a .nii/.nii.gz name")


def _organ_list(organs: str) -> list[Organ]:
    """``--organs``: known organ keys, at least one."""
    try:
        chosen = parse_organs(organs)
    except InputError as exc:
        raise FieldError("organs", exc.problem) from None
    if not chosen:
        raise FieldError("organs", f"names no organ ({organs!r}); give keys such as liver,spleen")
    return chosen


def _check_outputs(files: list[Path], *, inputs: list[Path], overwrite: bool) -> None:
    """Every file segment will write: not an input, not a folder, not a file segment did not write
    (unless ``overwrite``), creatable. Checked for every CT before the first write."""
    for path in files:
        check_output_file(
            path, command="segment", ours=written_by_segment, inputs=inputs, overwrite=overwrite
        )


def _check_options(
    *, threshold: float, organs: str | None, postprocess_mode: str, per_organ: str | None
) -> None:
    """The command's options, checked before anything is loaded."""
    if not 0 < threshold < 1:
        raise FieldError("threshold", f"must be between 0 and 1 (exclusive), got {threshold}")
    if organs is not None:
        _organ_list(organs)
    check_postprocess_mode(postprocess_mode, auto=True)
    if per_organ is not None and per_organ not in PER_ORGAN_MODES:
        raise FieldError("per_organ", f"must be one of {', '.join(PER_ORGAN_MODES)}, got {per_organ!r}")


def _single_ct(sources: dict, ct: Path, out: Path) -> bool:
    """Whether ``--ct`` is one CT written to one mask file (else a folder of CTs into a folder);
    ``out`` checked for that."""
    one_ct = list(sources.values()) == [ct] and not out.is_dir()  # a file or a series -> a mask file
    single = len(sources) == 1 and (one_ct or _is_mask_path(out))
    if single:
        _check_mask_path(out)
    elif len(sources) > 1 and _is_mask_path(out):
        raise InputError(out, f"--ct {ct} holds {len(sources)} CTs: --out must be a folder")
    else:
        _check_out_folder(out, ct)
    return single


def segment(
    *,
    run=None,
    model=None,
    strategy=None,
    ct: Path,
    out: Path,
    organs: str | None = None,
    probabilities: bool = False,
    threshold: float = 0.5,
    batch_size: int = 8,
    device: str | None = None,
    per_organ: str | None = None,
    postprocess_mode: str = "none",
    overwrite: bool = False,
) -> Path:
    """Segment one CT, or every CT of a folder, and write FLARE22 masks on each CT's grid.

    Args:
        run: a run folder from `train`; or model + strategy="zeroshot" for the untrained baseline.
        ct: a NIfTI file or a DICOM series folder; or a folder of those (then ``out`` is a folder).
        out: the mask file (``.nii``/``.nii.gz``) for one CT; otherwise a folder that receives
            ``<case>.nii.gz`` per CT (case = file name without ``_0000.nii.gz``, or the series
            folder's name). Over a folder, CTs whose outputs all exist are skipped.
        organs: comma-separated organ keys to segment (default: the organs the run trained on).
        probabilities: also write ``<mask>_probabilities.nii.gz``: (X, Y, Z, K), uint8 x 1/255 (module doc).
        threshold: a pixel is background unless its most probable organ is above it.
        per_organ: "also" or "only": write ``<mask without .nii.gz>/segmentations/<organ_key>.nii.gz``
            (uint8 0/1, one per segmented organ) beside, or instead of, the multi-label mask.
        postprocess_mode: ``none``, ``lcc`` or ``auto`` (see :func:`predict_volume`).
        overwrite: replace existing outputs that segment did not write.

    Returns:
        the mask written (one CT) or the output folder.

    Raises:
        InputError: bad arguments, an output that is an input or a file segment did not write
            (without ``overwrite``), or an unreadable CT (over a folder: raised at the end naming
            every CT that failed). Everything but unreadable CTs is refused before the first write.
    """
    _check_options(threshold=threshold, organs=organs, postprocess_mode=postprocess_mode, per_organ=per_organ)
    ct, out = Path(ct), Path(out)
    sources = ct_sources(ct)
    single = _single_ct(sources, ct, out)
    source = {"run": run, "model": model, "strategy": strategy, "organs": organs, "device": device}
    loaded = load_for_segment(**source, auto=postprocess_mode == AUTO)
    options = {"per_organ": per_organ, "probabilities": probabilities}
    inputs = [ct, *sources.values()] + (sorted(Path(run).iterdir()) if run and Path(run).is_dir() else [])
    if single:
        (source,) = sources.values()
        outputs = Outputs.at(out, loaded.organs, **options)
        _check_outputs(outputs.files(), inputs=inputs, overwrite=overwrite)
        names = _segment_one(
            loaded,
            source,
            outputs,
            threshold=threshold,
            batch_size=batch_size,
            progress=True,
            postprocess_mode=postprocess_mode,
        )
        print(f"segmented {source.name}: {', '.join(names) or 'no organ'} -> {out}")
        return out
    cases = {
        case: (src, Outputs.at(out / f"{case}.nii.gz", loaded.organs, **options))
        for case, src in sources.items()
    }
    _check_outputs(
        [f for _, outputs in cases.values() for f in outputs.files()], inputs=inputs, overwrite=overwrite
    )
    segment_cases(
        loaded,
        cases,
        out=out,
        threshold=threshold,
        batch_size=batch_size,
        ct=ct,
        postprocess_mode=postprocess_mode,
    )
    return out


def segment_cases(
    model: SegmentModel,
    cases: dict[str, tuple[Path, Outputs]],
    *,
    out: Path,
    threshold,
    batch_size,
    ct,
    postprocess_mode: str = "none",
) -> dict:
    """Segment every case whose outputs are not all there yet; one bad CT does not stop the others.

    Returns:
        {"written": [...], "skipped": [...], "failed": {case: message}}.

    Raises:
        InputError: naming ``ct`` and each failed case, after every other case was written.
    """
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"written": [], "skipped": [], "failed": {}}
    bar = tqdm(cases.items(), desc="segment", unit="CT", disable=None)
    for case, (source, outputs) in bar:
        if outputs.done():
            result["skipped"].append(case)
            continue
        try:
            _segment_one(
                model,
                source,
                outputs,
                threshold=threshold,
                batch_size=batch_size,
                progress=False,
                postprocess_mode=postprocess_mode,
            )
            result["written"].append(case)
        except InputError as exc:
            result["failed"][case] = exc.message
    bar.close()
    print(
        f"segmented {len(result['written'])} CTs, skipped {len(result['skipped'])} already done, "
        f"{len(result['failed'])} failed -> {out}"
    )
    if result["failed"]:
        shown = list(result["failed"].values())[:MAX_FAILURES_SHOWN]
        more = len(result["failed"]) - len(shown)
        raise InputError(
            ct,
            f"{len(result['failed'])} of {len(cases)} CTs failed (the others were written): "
            + "; ".join(shown)
            + (f"; and {more} more" if more > 0 else ""),
        )
    return result
