"""``clipseg-bench score``: FLARE22 DSC/NSD of a folder of predicted label volumes.

Modelled on nnU-Net's ``evaluate_folder``: every ground-truth volume ``LABELS/<case>.nii.gz`` needs a
prediction ``PRED/<case>.nii.gz`` (``.nii`` works on either side) on the same grid. Each case goes
through :func:`clipseg_bench.evaluation.metrics.score_case`, the code path ``evaluate`` uses too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from clipseg_bench.data.io import (
    PROBABILITIES_SUFFIX,
    Header,
    check_same_grid,
    map_labels,
    nifti_files,
    read_label_volume,
    written_by_segment,
)
from clipseg_bench.errors import InputError
from clipseg_bench.evaluation.metrics import score_case, summarize
from clipseg_bench.evaluation.postprocess import check_postprocess_mode, postprocess
from clipseg_bench.organs import load_label_map
from clipseg_bench.provenance import check_output_file, replacing

FLARE22_IDS = load_label_map("flare22")  # identity on 0-13; anything else is refused


CSV_HEADER = "case,organ,dsc,nsd"


def read_labels(path: Path) -> tuple[np.ndarray, Header]:
    """A label volume as stored, like the official FLARE22 evaluation reads it: the file's own array
    order (not reoriented) and its header (zooms give the spacing), through the one reader of
    :mod:`clipseg_bench.data.io` and its rules (integer values, 3D, readable), holding FLARE22 ids
    only (0-13: an unknown id would silently score as background)."""
    labels, affine, zooms = read_label_volume(path)
    labels = map_labels(labels, FLARE22_IDS, path)
    return labels, Header(path=Path(path), shape=labels.shape, affine=affine, zooms=zooms)


def prediction_files(pred: Path) -> dict[str, Path]:
    """The masks of a prediction folder by case id: its NIfTI files, less what `segment` writes beside
    its masks (``<case>_probabilities.nii.gz``, marked as segment's in the header; its per-organ
    ``<case>/segmentations/`` folders are folders, which :func:`nifti_files` skips already)."""
    found = nifti_files(pred, ignore_other_files=True)
    return {
        case: path
        for case, path in found.items()
        if not (case.endswith(PROBABILITIES_SUFFIX) and written_by_segment(path))
    }


def _written_by_score(path: Path) -> bool:
    """Whether ``path`` is a CSV this command wrote (its header line is ours)."""
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.readline().strip() == CSV_HEADER
    except (OSError, UnicodeDecodeError):
        return False


def score_folder(
    *,
    pred: Path,
    labels: Path,
    out: Path | None = None,
    missing_as_empty: bool = False,
    postprocess_mode: str = "none",
    overwrite: bool = False,
) -> pd.DataFrame:
    """Score every ground-truth case against its prediction with the FLARE22 rules.

    Args:
        pred: folder of predicted multi-label volumes ``<case>.nii.gz`` (FLARE22 ids, 0 = background),
            each on its ground truth's grid.
        labels: folder of ground-truth volumes ``<case>.nii.gz``. Their header zooms give the spacing.
        out: CSV to write (columns ``case, organ, dsc, nsd``); parent folders are created.
        missing_as_empty: score a case without a prediction as an empty prediction instead of failing.
        postprocess_mode: ``none``, or ``lcc``: clean each prediction (per organ the largest 3D
            component, paired organs on their side; evaluation.postprocess) before scoring it, so
            any tool's masks are cleaned the way ``evaluate`` and ``segment`` clean ours.
        overwrite: replace an existing ``out`` that score did not write.

    Returns:
        DataFrame with columns ``case, organ, dsc, nsd``: one row per case and organ (all 13, organ
        keys), cases in sorted order. The means (see :func:`~clipseg_bench.evaluation.metrics.summarize`)
        are printed.

    Raises:
        InputError: a folder is missing, there are no labels, a case has no prediction (without
            ``missing_as_empty``), a prediction has no ground truth, a prediction's grid differs
            from its ground truth's, a volume holds an id outside 0-13, or ``out`` is one of the
            inputs, a folder, or a file score did not write (without ``overwrite``).
    """
    check_postprocess_mode(postprocess_mode)
    pred, labels = Path(pred), Path(labels)
    gt_files = nifti_files(labels, ignore_other_files=True)
    pred_files = prediction_files(pred)
    if pred.resolve() == labels.resolve():
        raise InputError(
            pred, "--pred and --labels are the same folder: predictions would score against themselves"
        )
    if out is not None:
        inputs = [pred, labels, *gt_files.values(), *pred_files.values()]
        check_output_file(out, command="score", ours=_written_by_score, inputs=inputs, overwrite=overwrite)
    missing = _check_pairs(gt_files, pred_files, pred=pred, labels=labels, missing_as_empty=missing_as_empty)
    per_case = {}
    for case, gt_path in gt_files.items():
        gt, gt_header = read_labels(gt_path)
        if case in pred_files:
            pr, pr_header = read_labels(pred_files[case])
            check_same_grid(gt_header, pr_header, names=("ground truth", "prediction"))
            pr = postprocess(pr, pr_header.affine, postprocess_mode)
        else:
            pr = np.zeros_like(gt)
        per_case[case] = score_case(pr, gt, gt_header.zooms)

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
        with replacing(out) as tmp:
            table.to_csv(tmp, index=False)
    _print_means(summarize(per_case), n_cases=len(per_case), n_missing=len(missing), out=out)
    return table


def _check_pairs(
    gt_files: dict, pred_files: dict, *, pred: Path, labels: Path, missing_as_empty: bool
) -> list:
    """The label cases without a prediction (allowed with ``missing_as_empty``).

    Raises:
        InputError: no labels, a prediction without ground truth, or a missing prediction.
    """
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
    return missing


def _print_means(summary: dict, *, n_cases: int, n_missing: int, out: Path | None) -> None:
    width = max(len(k) for k in summary["per_organ"])
    print(f"{'organ':<{width}}  {'dsc':>6}  {'nsd':>6}")
    for key, s in summary["per_organ"].items():
        print(f"{key:<{width}}  {s['dsc']:>6.4f}  {s['nsd']:>6.4f}")
    note = f", {n_missing} scored as empty" if n_missing else ""
    print(f"{'mean':<{width}}  {summary['dsc']:>6.4f}  {summary['nsd']:>6.4f}  ({n_cases} cases{note})")
    if out is not None:
        print(f"-> {out}")
