"""`clipseg-bench segment`: a tuned run (or a zero-shot model) + a CT -> a FLARE22 multi-label NIfTI.

The mask is written on the CT's own voxel grid with its own affine, so it opens over the CT in
3D Slicer or ITK-SNAP. Each slice is encoded once for all requested organs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from tqdm.auto import tqdm

from clipseg_bench.data.channels import WINDOWS, channel_images, hu_slices, needs_hu
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
from clipseg_bench.evaluation.postprocess import POSTPROCESS_MODES, postprocess
from clipseg_bench.evaluation.predict import probabilities_to_labels
from clipseg_bench.organs import parse_organs


def _run_window(run: Path | None) -> dict:
    """The intensity window the run was trained with (from its prepared data), else the default."""
    if run is not None:
        info = json.loads((run / "run.json").read_text()) if (run / "run.json").is_file() else {}
        if "window" in info:
            return info["window"]
    return parse_window(DEFAULT_WINDOW)


def model_inputs(slices: np.ndarray, gray: np.ndarray, *, channels: str, run: Path | None) -> np.ndarray:
    """A new CT's model inputs, built like the run's training inputs.

    Args:
        slices: (Z, H, W) the CT's slices in HU (prepared slice convention).
        gray: the same slices windowed to uint8 with the run's window.
        channels: the run's input_channels mode; ``windows`` uses the HU windows its run.json
            recorded (``channel_windows``), else today's :data:`~clipseg_bench.data.channels.WINDOWS`.
        run: the run folder (None for a zero-shot model).

    Returns:
        (Z, H, W) uint8 for ``gray``, (Z, 3, H, W) uint8 otherwise.
    """
    if not needs_hu(channels):
        return channel_images(np.arange(len(gray)), mode=channels, gray=gray)
    info = json.loads((run / "run.json").read_text()) if run and (run / "run.json").is_file() else {}
    windows = info.get("channel_windows", WINDOWS)
    return channel_images(
        np.arange(len(gray)), mode=channels, gray=gray, hu=hu_slices(slices), windows=windows
    )


def _save_nifti(array: np.ndarray, like: nib.Nifti1Image | None, affine: np.ndarray, out: Path) -> None:
    header = like.header.copy() if like is not None else None
    img = nib.Nifti1Image(array, affine, header)
    img.set_data_dtype(array.dtype)
    img.header.set_slope_inter(None, None)  # the CT's HU rescale must not touch label values
    tmp = out.with_name(f".{out.name}.tmp{''.join(out.suffixes)}")
    nib.save(img, tmp)
    os.replace(tmp, out)  # never a half-written mask under the real name


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
    postprocess_mode: str = "none",
) -> Path:
    """Segment ``ct`` and write ``out`` (uint8 FLARE22 ids on the CT's grid).

    Args:
        run: a run folder from `train`; or model + strategy="zeroshot" for the untrained baseline.
        organs: comma-separated organ keys to segment (default: the organs the run trained on).
        probabilities: also write ``<out>_probabilities.nii.gz``, float32 (X, Y, Z, K) in organ order.
        threshold: a pixel is background unless its most probable organ is above it.
        postprocess_mode: ``none``, or ``lcc`` to keep each organ's largest 3D component (paired
            organs on their own side of the midline; evaluation.postprocess). The probabilities
            are written as predicted.
    """
    if postprocess_mode not in POSTPROCESS_MODES:
        raise InputError("--postprocess", f"unknown mode {postprocess_mode!r}; choose from none, lcc")
    if run:
        trained, window = load_run(run), _run_window(Path(run))
    elif model and strategy == "zeroshot":
        trained, window = zeroshot_run(model), parse_window(DEFAULT_WINDOW)
    else:
        raise InputError("--run", "give --run RUN, or --model M --strategy zeroshot")
    if organs:
        wanted = {o.id for o in parse_organs(organs)}
        keep = [i for i, o in enumerate(trained.organs) if o.id in wanted]
        trained.organs = [trained.organs[i] for i in keep]
        trained.prompts = [trained.prompts[i] for i in keep]
    ct = Path(ct)
    if not str(out).endswith((".nii", ".nii.gz")):
        raise InputError(out, "output must end in .nii or .nii.gz")
    if not Path(out).parent.exists():
        raise InputError(out, "output folder does not exist")
    volume, affine, _ = read_volume(ct)
    slices, meta = volume_to_slices(volume, affine)
    images = normalize(slices, window)
    inputs = model_inputs(slices, images, channels=trained.cfg.input_channels, run=Path(run) if run else None)

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    seg = trained.segmenter(dev)
    organ_ids = [o.id for o in trained.organs]
    labels = np.zeros(images.shape, dtype=np.uint8)
    probs_out = np.zeros((*images.shape, len(organ_ids)), dtype=np.float32) if probabilities else None
    bar = tqdm(total=len(images), desc="segment", unit="slice")
    for start, probs in seg.iter_probabilities(inputs, batch_size=batch_size):
        stop = start + len(probs)
        labels[start:stop] = probabilities_to_labels(probs, organ_ids, threshold=threshold).numpy()
        if probs_out is not None:
            probs_out[start:stop] = probs.permute(0, 2, 3, 1).numpy()
        bar.update(len(probs))
    bar.close()

    like = nib.load(str(ct))
    mask = postprocess(slices_to_volume(labels, meta), like.affine, postprocess_mode)
    _save_nifti(mask, like, like.affine, Path(out))
    if probs_out is not None:
        vol = np.stack([slices_to_volume(probs_out[..., k], meta) for k in range(len(organ_ids))], axis=-1)
        stem = str(out)[: -len(".nii.gz")] if str(out).endswith(".nii.gz") else str(out)[: -len(".nii")]
        _save_nifti(vol, None, like.affine, Path(f"{stem}_probabilities.nii.gz"))
    found = sorted({int(v) for v in np.unique(mask)} - {0})
    names = [o.key for o in trained.organs if o.id in found]
    print(f"segmented {ct.name}: {', '.join(names) or 'no organ'} -> {out}")
    return Path(out)
