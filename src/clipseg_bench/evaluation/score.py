"""``clipseg-bench score``: FLARE22 DSC/NSD of a folder of predicted label volumes.

Modelled on nnU-Net's ``evaluate_folder``: every ground-truth volume ``LABELS/<case>.nii.gz`` needs a
prediction ``PRED/<case>.nii.gz`` (``.nii`` works on either side) on the same grid. Each case goes
through :func:`clipseg_bench.evaluation.metrics.score_case`, the code path ``evaluate`` uses too.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from clipseg_bench.errors import InputError
from clipseg_bench.evaluation.metrics import score_case, summarize

_SUFFIXES = (".nii.gz", ".nii")
# Headers written by different tools round the affine differently; a flip or another grid differs
# by far more than this (mm).
_AFFINE_ATOL_MM = 1e-3


def _case_id(path: Path) -> str | None:
    name = path.name
    for suffix in _SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def list_cases(folder: Path) -> dict[str, Path]:
    """``{case_id: path}`` of the ``<case>.nii.gz`` / ``<case>.nii`` files in a folder.

    Raises:
        InputError: the folder does not exist, or one case has both a .nii and a .nii.gz file.
    """
    if not folder.is_dir():
        raise InputError(folder, "not a folder")
    cases: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        case = _case_id(path)
        if case is None or not path.is_file():
            continue
        if case in cases:
            raise InputError(path, f"case {case!r} has two files here ({cases[case].name}, {path.name})")
        cases[case] = path
    return cases


def read_label_volume(path: Path) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray]:
    """A label volume as stored, like the official FLARE22 evaluation reads it.

    Returns:
        ``(labels, spacing, affine)``: int16 (X, Y, Z) in the file's own array order (not
        reoriented), the header zooms (mm) of the first three axes, and the 4x4 affine.

    Raises:
        InputError: the file cannot be read or is not one 3D volume.
    """
    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises several types for broken or foreign files
        raise InputError(path, f"cannot read as NIfTI ({exc.__class__.__name__}: {exc})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(path, f"expected a 3D label volume, got shape {data.shape}")
    if data.dtype.kind == "f":  # labels saved as floats (or scaled): round, don't truncate
        data = np.rint(data)
    spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
    return data.astype(np.int16), spacing, np.asarray(img.affine, dtype=float)


def _check_same_grid(
    pred_path: Path, pred: np.ndarray, pred_affine: np.ndarray, gt: np.ndarray, gt_affine: np.ndarray
) -> None:
    if pred.shape != gt.shape:
        raise InputError(pred_path, f"shape {pred.shape} does not match the ground truth's {gt.shape}")
    if not np.allclose(pred_affine, gt_affine, rtol=0, atol=_AFFINE_ATOL_MM):
        raise InputError(
            pred_path, "affine (orientation, spacing or origin) does not match the ground truth's"
        )


def score_folder(
    *, pred: Path, labels: Path, out: Path | None = None, missing_as_empty: bool = False
) -> pd.DataFrame:
    """Score every ground-truth case against its prediction with the FLARE22 rules.

    Args:
        pred: folder of predicted multi-label volumes ``<case>.nii.gz`` (FLARE22 ids, 0 = background),
            each on its ground truth's grid.
        labels: folder of ground-truth volumes ``<case>.nii.gz``. Their header zooms give the spacing.
        out: CSV to write (columns ``case, organ, dsc, nsd``); parent folders are created.
        missing_as_empty: score a case without a prediction as an empty prediction instead of failing.

    Returns:
        DataFrame with columns ``case, organ, dsc, nsd``: one row per case and organ (all 13, organ
        keys), cases in sorted order. The means (see :func:`~clipseg_bench.evaluation.metrics.summarize`)
        are printed.

    Raises:
        InputError: a folder is missing, there are no labels, a case has no prediction (without
            ``missing_as_empty``), a prediction has no ground truth, or a prediction's grid differs
            from its ground truth's.
    """
    pred, labels = Path(pred), Path(labels)
    gt_files, pred_files = list_cases(labels), list_cases(pred)
    if not gt_files:
        raise InputError(labels, "no <case>.nii.gz label volumes here")
    extra = sorted(set(pred_files) - set(gt_files))
    if extra:
        raise InputError(
            pred_files[extra[0]],
            f"no ground truth {extra[0]}.nii.gz in {labels} ({len(extra)} prediction(s) without one)",
        )
    missing = sorted(set(gt_files) - set(pred_files))
    if missing and not missing_as_empty:
        raise InputError(
            pred / f"{missing[0]}.nii.gz",
            f"missing prediction ({len(missing)} case(s) without "
            "one; --missing-as-empty scores them as empty)",
        )

    per_case = {}
    for case, gt_path in gt_files.items():
        gt, spacing, gt_affine = read_label_volume(gt_path)
        if case in pred_files:
            pr, _, pr_affine = read_label_volume(pred_files[case])
            _check_same_grid(pred_files[case], pr, pr_affine, gt, gt_affine)
        else:
            pr = np.zeros_like(gt)
        per_case[case] = score_case(pr, gt, spacing)

    table = pd.DataFrame(
        [
            {"case": c, "organ": k, "dsc": s["dsc"], "nsd": s["nsd"]}
            for c, organs in per_case.items()
            for k, s in organs.items()
        ],
        columns=["case", "organ", "dsc", "nsd"],
    )
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(out, index=False)
    _print_means(summarize(per_case), n_cases=len(per_case), n_missing=len(missing), out=out)
    return table


def _print_means(summary: dict, *, n_cases: int, n_missing: int, out: Path | None) -> None:
    width = max(len(k) for k in summary["per_organ"])
    print(f"{'organ':<{width}}  {'dsc':>6}  {'nsd':>6}")
    for key, s in summary["per_organ"].items():
        print(f"{key:<{width}}  {s['dsc']:>6.4f}  {s['nsd']:>6.4f}")
    note = f", {n_missing} scored as empty" if n_missing else ""
    print(f"{'mean':<{width}}  {summary['dsc']:>6.4f}  {summary['nsd']:>6.4f}  ({n_cases} cases{note})")
    if out is not None:
        print(f"-> {out}")
