"""`clipseg-bench segment`: a tuned run (or a zero-shot model) + a CT -> a FLARE22 multi-label NIfTI.

The mask is written on the CT's own voxel grid with its own affine, so it opens over the CT in
3D Slicer or ITK-SNAP. Each slice is encoded once for all requested organs.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from tqdm.auto import tqdm

from clipseg_bench.data.io import read_volume
from clipseg_bench.data.volumes import (
    DEFAULT_WINDOW,
    normalize,
    parse_window,
    slices_to_volume,
    volume_to_slices,
)
from clipseg_bench.errors import InputError
from clipseg_bench.evaluation.loading import load_run, zeroshot_run
from clipseg_bench.evaluation.predict import probabilities_to_labels
from clipseg_bench.organs import parse_organs
from clipseg_bench.provenance import check_output_file, read_json_object, replacing

MASK_DESCRIPTION = b"clipseg-bench segment"  # in the NIfTI header: "this file is ours, may be replaced"


def _run_window(run: Path | None) -> dict:
    """The intensity window the run was trained with (from its prepared data), else the default."""
    if run is not None:
        info = read_json_object(run / "run.json") if (run / "run.json").is_file() else {}
        if "window" in info:
            return info["window"]
    return parse_window(DEFAULT_WINDOW)


def _save_nifti(array: np.ndarray, like: nib.Nifti1Image | None, affine: np.ndarray, out: Path) -> None:
    header = like.header.copy() if like is not None else None
    img = nib.Nifti1Image(array, affine, header)
    img.set_data_dtype(array.dtype)
    img.header.set_slope_inter(None, None)  # the CT's HU rescale must not touch label values
    img.header["descrip"] = MASK_DESCRIPTION
    with replacing(out) as tmp:  # never a half-written mask under the real name
        nib.save(img, tmp)


def _written_by_segment(path: Path) -> bool:
    """Whether ``path`` is a NIfTI file this command wrote (its header description says so)."""
    try:
        return bytes(nib.load(str(path)).header["descrip"]).startswith(MASK_DESCRIPTION)
    except Exception:  # not NIfTI, unreadable: not ours
        return False


def probabilities_path(out: Path) -> Path:
    """``mask.nii.gz`` -> ``mask_probabilities.nii.gz`` (where ``--probabilities`` writes)."""
    name = str(out)
    stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else name[: -len(".nii")]
    return Path(f"{stem}_probabilities.nii.gz")


def check_segment_args(
    *, run, ct: Path, out: Path, organs: str | None, probabilities: bool, overwrite: bool
) -> list[Path]:
    """Check the arguments of :func:`segment` before anything loads or is written.

    Returns:
        The files segment will write (the mask, and the probabilities with ``probabilities``).

    Raises:
        InputError: naming the flag or file: an output that is not ``.nii``/``.nii.gz``, that is one of
            the inputs (the CT, the run's files), a file segment did not write (without ``overwrite``),
            a folder, or cannot be created; unknown or empty ``--organs``.
    """
    if organs is not None:
        _organ_list(organs)
    if not str(out).endswith((".nii", ".nii.gz")):
        raise InputError(out, "output must end in .nii or .nii.gz")
    if not Path(out).parent.exists():
        raise InputError(out, "output folder does not exist")
    inputs = [Path(ct)] + (sorted(Path(run).iterdir()) if run and Path(run).is_dir() else [])
    outs = [Path(out)] + ([probabilities_path(Path(out))] if probabilities else [])
    for path in outs:
        check_output_file(
            path, command="segment", ours=_written_by_segment, inputs=inputs, overwrite=overwrite
        )
    return outs


def _organ_list(organs: str) -> list:
    """``--organs``: known organ keys, at least one."""
    try:
        chosen = parse_organs(organs)
    except InputError as exc:
        raise InputError("--organs", exc.problem) from None
    if not chosen:
        raise InputError("--organs", f"names no organ ({organs!r}); give keys such as liver,spleen")
    return chosen


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
    overwrite: bool = False,
) -> Path:
    """Segment ``ct`` and write ``out`` (uint8 FLARE22 ids on the CT's grid).

    Args:
        run: a run folder from `train`; or model + strategy="zeroshot" for the untrained baseline.
        organs: comma-separated organ keys to segment (default: the organs the run trained on).
        probabilities: also write ``<out>_probabilities.nii.gz``, float32 (X, Y, Z, K) in organ order.
        threshold: a pixel is background unless its most probable organ is above it.
        overwrite: replace an existing ``out`` that segment did not write.
    """
    if not 0 < threshold < 1:
        raise InputError("--threshold", f"must be between 0 and 1 (exclusive), got {threshold}")
    check_segment_args(
        run=run, ct=ct, out=out, organs=organs, probabilities=probabilities, overwrite=overwrite
    )
    if run:
        trained, window = load_run(run), _run_window(Path(run))
    elif model and strategy == "zeroshot":
        trained, window = zeroshot_run(model), parse_window(DEFAULT_WINDOW)
    elif model:
        raise InputError("--strategy", f"--model without --run needs --strategy zeroshot (got {strategy!r})")
    else:
        raise InputError("--run", "give --run RUN, or --model M --strategy zeroshot")
    if organs:
        chosen = _organ_list(organs)
        wanted = {o.id for o in chosen}
        untrained = [o.key for o in chosen if o not in trained.organs]
        if untrained:
            raise InputError(
                "--organs",
                f"the run was not trained on {','.join(untrained)}; "
                f"it segments {','.join(o.key for o in trained.organs)}",
            )
        keep = [i for i, o in enumerate(trained.organs) if o.id in wanted]
        trained.organs = [trained.organs[i] for i in keep]
        trained.prompts = [trained.prompts[i] for i in keep]
    ct = Path(ct)
    volume, affine, _ = read_volume(ct)
    slices, meta = volume_to_slices(volume, affine)
    images = normalize(slices, window)

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    seg = trained.segmenter(dev)
    organ_ids = [o.id for o in trained.organs]
    labels = np.zeros(images.shape, dtype=np.uint8)
    probs_out = np.zeros((*images.shape, len(organ_ids)), dtype=np.float32) if probabilities else None
    bar = tqdm(total=len(images), desc="segment", unit="slice")
    for start, probs in seg.iter_probabilities(images, batch_size=batch_size):
        stop = start + len(probs)
        labels[start:stop] = probabilities_to_labels(probs, organ_ids, threshold=threshold).numpy()
        if probs_out is not None:
            probs_out[start:stop] = probs.permute(0, 2, 3, 1).numpy()
        bar.update(len(probs))
    bar.close()

    like = nib.load(str(ct))
    _save_nifti(slices_to_volume(labels, meta), like, like.affine, Path(out))
    if probs_out is not None:
        vol = np.stack([slices_to_volume(probs_out[..., k], meta) for k in range(len(organ_ids))], axis=-1)
        _save_nifti(vol, None, like.affine, probabilities_path(Path(out)))
    found = sorted({int(v) for v in np.unique(labels)} - {0})
    names = [o.key for o in trained.organs if o.id in found]
    print(f"segmented {ct.name}: {', '.join(names) or 'no organ'} -> {out}")
    return Path(out)
