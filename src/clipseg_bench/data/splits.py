"""Which cases a PREPARED folder sets aside for testing, and how it splits the rest: train/val, or K folds.

Every assignment is by patient (``--groups``; without it each case is its own patient), so a
patient's scans never sit on two sides, and is drawn from the seed alone (not from the order the
cases were found in):

1. **test** (``--test-fraction F``): a share of the patients, drawn first from a stream of its own
   (the same seed sets the same patients aside whatever the folds), never read by training, a
   sweep, a fold or a choice (:class:`~clipseg_bench.data.dataset.PreparedData` refuses to open
   their arrays unless asked for the test split);
2. the other cases either get **one train/val split** (``--val-fraction``, today's split, drawn
   exactly as before test splits existed), or **K folds** (``--folds K``): every non-test case in
   one fold, patients dealt largest first to the fold with the fewest cases (balanced in cases,
   not only in patients). A run on fold k trains on the other folds and validates on fold k; a
   folder with folds also records fold 0 as its train/val ``split``, so that code that knows no
   folds reads it as one train/val split.

A split file (``--split-file``) decides instead: ``{"train": [...], "val": [...], "test": [...]}``
or ``{"folds": [[...], [...], ...], "test": [...]}`` (``test`` optional). It must name every case
once, no case the input lacks, and no patient on two sides. No library draws patient-grouped,
case-balanced folds with a separate test stream and reads these files (scikit-learn's GroupKFold
balances groups but takes no seed), so this is our own small code.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clipseg_bench.errors import FieldError, InputError

SPLITS = ("train", "val", "test")
_TEST_STREAM = 0x7E57  # the test draw's own random stream, so folds and val never shift it
_FOLD_STREAM = 0xF01D
_FILE_KEYS = ("train", "val", "test", "folds")


@dataclass(frozen=True)
class Assignment:
    """Where every case of a PREPARED folder goes.

    Attributes:
        split: case -> "train" | "val" | "test" (with folds: fold 0 is "val", the other folds "train").
        fold: case -> its fold (None for a test case); empty without folds.
        n_folds: the number of folds; None for one train/val split.
        info: how the assignment was made (dataset.json ``split``).
    """

    split: dict[str, str]
    fold: dict[str, int | None] = field(default_factory=dict)
    n_folds: int | None = None
    info: dict = field(default_factory=dict)

    def fold_sizes(self) -> list[int]:
        """Cases per fold, fold 0 first (empty without folds)."""
        counts = Counter(f for f in self.fold.values() if f is not None)
        return [counts.get(k, 0) for k in range(self.n_folds or 0)]


def assign_cases(
    case_ids: list[str],
    *,
    val_fraction: float = 0.2,
    folds: int | None = None,
    test_fraction: float = 0.0,
    seed: int = 0,
    split_file=None,
    groups: dict[str, str] | None = None,
) -> Assignment:
    """Set test cases aside, then split the rest into train/val or into ``folds`` folds.

    Args:
        case_ids: the cases.
        val_fraction: share of the non-test patients for validation (without ``folds``).
        folds: K >= 2: every non-test case gets a fold 0..K-1 (``val_fraction`` is then unused).
        test_fraction: share of the patients set aside for testing, in [0, 1); > 0 sets at least one.
        seed: seed of every draw.
        split_file: JSON that decides instead (see the module docstring).
        groups: case id -> patient id (:func:`read_groups`); without it each case is its own patient.

    Returns:
        The :class:`Assignment`.

    Raises:
        FieldError: a fraction or fold count out of range, or too few patients for it.
        InputError: naming the split file when it is malformed, leaves a case out, names a case the
            input lacks, or puts one patient on two sides.
    """
    ids = sorted(case_ids)
    patient = {c: c for c in ids} if groups is None else {c: groups[c] for c in ids}
    unit = "case" if groups is None else "patient"
    if split_file is not None:
        if test_fraction:
            raise FieldError("test_fraction", "a split file decides the test cases (its 'test' list)")
        return _from_file(Path(split_file), ids, patient, folds, unit)
    if folds is not None and folds < 2:
        raise FieldError("folds", f"needs 2 folds or more, got {folds}")
    _check_seed(seed)
    test = _draw_test(ids, patient, test_fraction, seed, need=folds or 1)
    rest = [c for c in ids if c not in test]
    info = {"method": "seeded draw", "unit": unit, "seed": seed, "test_fraction": test_fraction}
    if folds is None:
        split = split_cases(rest, val_fraction=val_fraction, seed=seed, groups=patient)
        assignment = Assignment(split, info={**info, "val_fraction": val_fraction, "folds": None})
    else:
        fold = draw_folds(rest, folds, seed=seed, groups=patient)
        split = {c: "val" if f == 0 else "train" for c, f in fold.items()}
        assignment = Assignment(split, dict(fold), folds, {**info, "val_fraction": None, "folds": folds})
    assignment.split.update({c: "test" for c in test})
    assignment.fold.update({c: None for c in test} if folds is not None else {})
    return assignment


def _check_seed(seed: int) -> None:
    if seed < 0:  # numpy's generators take no negative seed
        raise FieldError("seed", f"must be a whole number >= 0, got {seed}")


def _draw_test(ids: list[str], patient: dict[str, str], fraction: float, seed: int, *, need: int) -> set[str]:
    """The test cases: ``fraction`` of the patients (at least one when > 0), leaving ``need`` or more."""
    if not 0.0 <= fraction < 1.0:
        raise FieldError("test_fraction", f"must be in [0, 1), got {fraction}")
    patients = sorted(set(patient.values()))
    if fraction == 0:
        return set()
    n_test = max(1, int(round(fraction * len(patients))))
    if len(patients) - n_test < need:
        short = f"too few for {need} folds" if need > 1 else "none to train on"
        raise FieldError(
            "test_fraction",
            f"sets {n_test} of {len(patients)} patients aside, leaving {len(patients) - n_test}: {short}",
        )
    order = np.random.default_rng([seed, _TEST_STREAM]).permutation(len(patients))
    chosen = {patients[i] for i in order[:n_test]}
    return {c for c in ids if patient[c] in chosen}


def draw_folds(
    case_ids: list[str], k: int, *, seed: int, groups: dict[str, str] | None = None
) -> dict[str, int]:
    """Deal the cases' patients into ``k`` folds: drawn order from the seed, largest patients first,
    each to the fold with the fewest cases so far (ties: the lowest fold), so fold sizes differ by at
    most one patient's cases.

    Returns:
        case -> fold (0..k-1).

    Raises:
        FieldError: fewer patients than folds.
    """
    ids = sorted(case_ids)
    patient = {c: c for c in ids} if groups is None else {c: groups[c] for c in ids}
    patients = sorted(set(patient.values()))
    if len(patients) < k:
        raise FieldError(
            "folds", f"{k} folds need {k} patients or more outside the test split; there are {len(patients)}"
        )
    size = Counter(patient.values())
    order = [patients[i] for i in np.random.default_rng([seed, _FOLD_STREAM]).permutation(len(patients))]
    order.sort(key=lambda p: -size[p])  # stable: equal sizes keep the drawn order
    load, fold_of = [0] * k, {}
    for p in order:
        fold_of[p] = min(range(k), key=lambda i: (load[i], i))
        load[fold_of[p]] += size[p]
    return {c: fold_of[patient[c]] for c in ids}


def split_cases(
    case_ids: list[str],
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    split_file=None,
    groups: dict[str, str] | None = None,
) -> dict[str, str]:
    """Assign every case to "train" or "val" (or "test", from a split file), keeping each patient's
    cases on one side.

    Args:
        case_ids: the cases.
        val_fraction: share of patients for validation; with 2+ patients and a fraction > 0 at
            least one patient goes to each split.
        seed: seed of the random permutation of patients (independent of the order cases were
            found in).
        split_file: optional JSON that decides instead (:func:`assign_cases`).
        groups: case id -> patient id (:func:`read_groups`); without it each case is its own
            patient.

    Returns:
        case id -> "train" | "val" (| "test").
    """
    ids = sorted(case_ids)
    patient = {c: c for c in ids} if groups is None else {c: groups[c] for c in ids}
    if split_file is not None:
        return assign_cases(ids, split_file=split_file, groups=groups).split
    if not 0.0 <= val_fraction < 1.0:
        raise FieldError("val_fraction", f"must be in [0, 1), got {val_fraction}")
    _check_seed(seed)
    patients = sorted(set(patient.values()))
    n_val = int(round(val_fraction * len(patients)))
    if val_fraction > 0 and len(patients) >= 2:
        n_val = min(max(n_val, 1), len(patients) - 1)
    order = np.random.default_rng(seed).permutation(len(patients))
    val = {patients[i] for i in order[:n_val]}
    return {c: ("val" if patient[c] in val else "train") for c in ids}


def read_groups(path: str | Path, case_ids: list[str]) -> dict[str, str]:
    """Read a patient-groups CSV with columns ``case, patient`` (more columns are ignored).

    Every case we have must be listed once; the file may list cases we do not have.

    Returns:
        case id -> patient id.

    Raises:
        InputError: naming the file when it cannot be read, lacks a column, lists a case twice
            with different patients, or misses one of our cases.
    """
    path = Path(path)
    try:
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
            columns = set(rows[0]) if rows else set()
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(path, f"cannot read the groups CSV ({exc})") from None
    if not {"case", "patient"} <= columns:
        raise InputError(path, "a groups CSV needs the columns 'case' and 'patient'")
    groups: dict[str, str] = {}
    for i, row in enumerate(rows, start=2):
        case, patient = (row["case"] or "").strip(), (row["patient"] or "").strip()
        if not case or not patient:
            raise InputError(path, f"line {i}: empty case or patient")
        if groups.get(case, patient) != patient:
            raise InputError(path, f"case {case!r} is listed for patients {groups[case]!r} and {patient!r}")
        groups[case] = patient
    missing = [c for c in case_ids if c not in groups]
    if missing:
        raise InputError(path, f"cases missing from the groups file: {', '.join(sorted(missing)[:5])}")
    return {c: groups[c] for c in case_ids}


# --- split files ------------------------------------------------------------------------------

_FILE_FORMS = '{"train": [...], "val": [...], "test": [...]} or {"folds": [[...], ...], "test": [...]}'


def _from_file(
    path: Path, ids: list[str], patient: dict[str, str], folds: int | None, unit: str
) -> Assignment:
    """The assignment a split file gives, checked against the cases and the patients."""
    lists = _read_split_file(path)
    side: dict[str, str] = {}  # case -> "train" | "val" | "test" | "fold k"
    for name, cases in lists.items():
        for case in cases:
            if case in side:
                raise InputError(path, f"case {case!r} is listed twice ({side[case]} and {name})")
            side[case] = name
    unknown = sorted(set(side) - set(ids))
    if unknown:
        raise InputError(path, f"names case {unknown[0]!r}, which is not among the {len(ids)} input cases")
    missing = [c for c in ids if c not in side]
    if missing:
        raise InputError(path, f"cases missing from the split file: {', '.join(missing[:5])}")
    _check_patients_together(path, side, patient)
    n_folds = sum(1 for name in lists if name.startswith("fold "))
    if folds is not None and n_folds != folds:
        given = f"{n_folds} folds" if n_folds else "a train/val split"
        raise FieldError("folds", f"asks for {folds} folds, but the split file {path} gives {given}")
    info = {"method": "split file", "unit": unit, "folds": n_folds or None, "val_fraction": None}
    if not n_folds:
        return Assignment(dict(side), info=info)
    fold = {c: None if s == "test" else int(s.split()[1]) for c, s in side.items()}
    split = {c: "test" if f is None else ("val" if f == 0 else "train") for c, f in fold.items()}
    return Assignment(split, fold, n_folds, info)


def _read_split_file(path: Path) -> dict[str, list[str]]:
    """A split file's lists by side: "train", "val", "test" or "fold 0", "fold 1", ...

    Raises:
        InputError: naming the file when it is unreadable or not one of the two forms.
    """
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(path, f"not a split file {_FILE_FORMS} ({exc})") from None
    if not isinstance(doc, dict) or set(doc) - set(_FILE_KEYS):
        extra = sorted(set(doc) - set(_FILE_KEYS)) if isinstance(doc, dict) else []
        why = f"unknown key {extra[0]!r}" if extra else "not a JSON object"
        raise InputError(path, f"not a split file {_FILE_FORMS} ({why})")
    if "folds" in doc and ({"train", "val"} & set(doc)):
        raise InputError(path, "gives both folds and a train/val split; give one of them")
    if "folds" in doc:
        folds = doc["folds"]
        if not isinstance(folds, list) or len(folds) < 2:
            raise InputError(path, "'folds' must be a list of 2 or more case lists")
        lists = {f"fold {k}": cases for k, cases in enumerate(folds)}
    else:
        lists = {k: doc.get(k, []) for k in ("train", "val")}
    lists["test"] = doc.get("test", [])
    for name, cases in lists.items():
        if not isinstance(cases, list) or not all(isinstance(c, (str, int)) for c in cases):
            raise InputError(path, f"{name!r} must be a list of case ids")
        if name.startswith("fold ") and not cases:
            raise InputError(path, f"{name} is empty: every fold needs a case to validate on")
    return {name: [str(c) for c in cases] for name, cases in lists.items()}


def _check_patients_together(path: Path, side: dict[str, str], patient: dict[str, str]) -> None:
    """Refuse a split file that puts one patient's cases on two sides (train/val/test or folds)."""
    seen: dict[str, tuple[str, str]] = {}
    for case, name in sorted(side.items()):
        if case not in patient:
            continue
        other = seen.setdefault(patient[case], (case, name))
        if other[1] != name:
            raise InputError(
                path, f"patient {patient[case]!r} is on both sides ({other[0]}: {other[1]}, {case}: {name})"
            )
