"""`clipseg-bench prepare`: CT volumes -> axial slices, array cache, PNGs, manifest and dataset.json.

The stage runs in three steps, so that bad input never leaves anything half-written:

1. **Check** (nothing written): find and pair the cases, refuse duplicates, unpaired files and
   empty folders, split train/val by case, check the output folder, and read every header
   (3D, same shape and affine for image and label).
2. **Stage**: cases are read, validated (NaN/inf, non-integer or unknown labels, truncated data),
   sliced and written in parallel into ``OUT/.work/<case>.tmp-<pid>``, renamed to
   ``OUT/.work/<case>`` once complete. A bad case aborts the run and the whole ``.work`` (and the
   output folder, if this run created it) is removed: nothing is written.
3. **Commit**: staged cases move into place (``cache/``, ``png/``), each marked done by
   ``.done/<case>.json``, written last. Then ``manifest.csv`` and ``dataset.json`` are written
   through a temporary name and renamed.

An interrupted run leaves only complete staged or committed cases; a re-run with the same inputs
and options skips them. The layout and the slice convention are described in
``docs/architecture.md`` ("PREPARED/") and :mod:`clipseg_bench.data.volumes`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import multiprocessing
import os
import shutil
import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from clipseg_bench.data.io import (
    check_same_grid,
    map_labels,
    nifti_files,
    read_header,
    read_label_volume,
    read_volume,
    strip_nifti_suffix,
)
from clipseg_bench.data.volumes import CANONICAL, normalize, parse_window, volume_to_slices
from clipseg_bench.errors import InputError
from clipseg_bench.organs import ORGANS, LabelMap, labels_to_gray, load_label_map, organ_table
from clipseg_bench.provenance import (
    check_output_folder,
    folder_format,
    mark_folder,
    marker_name,
    write_text_atomic,
)

FORMAT = "clipseg-bench-prepared/1"
MARKER = marker_name(FORMAT)  # ".clipseg-bench-prepared": "this folder is ours" from the first write on
WORK = ".work"
DONE = ".done"
CHANNEL_SUFFIX = "_0000"  # nnU-Net/FLARE22 channel suffix of CT images
SLICE_CONVENTION = (
    "RAS+ canonical volume cut along S (z from inferior to superior); "
    "image row 0 = most anterior, column 0 = patient's right (radiological display)"
)
MANIFEST_COLUMNS = ["case", "z", "split", "kept", "spacing_x", "spacing_y", "spacing_z"] + [
    f"px_{o.key}" for o in ORGANS
]


@dataclass(frozen=True)
class Options:
    """What each case's prepared files depend on, besides its source files."""

    window: dict
    label_map: LabelMap
    keep_empty: bool
    png: bool

    def to_dict(self) -> dict:
        """JSON form, for dataset.json and the resume fingerprint."""
        return {
            "window": self.window,
            "label_map": self.label_map.to_dict(),
            "keep_empty": self.keep_empty,
            "png": self.png,
        }


@dataclass(frozen=True)
class CaseSource:
    """One case to prepare: its id and its image and label files."""

    case: str
    image: Path
    label: Path


# --- step 1: find, pair and split the cases --------------------------------------------------


def _image_case_id(stem: str) -> str:
    return stem[: -len(CHANNEL_SUFFIX)] if stem.endswith(CHANNEL_SUFFIX) else stem


def _pair(images: dict[str, Path], labels: dict[str, Path]) -> list[CaseSource]:
    """Pair image and label files by case id; every file needs its partner."""
    by_case: dict[str, Path] = {}
    for stem, path in images.items():
        case = _image_case_id(stem)
        if case in by_case:
            raise InputError(path, f"duplicate case id {case!r} (also {by_case[case].name})")
        by_case[case] = path
    for case, path in by_case.items():
        if case not in labels:
            raise InputError(path, f"image has no label (expected {case}.nii.gz beside the labels)")
    for case, path in labels.items():
        if case not in by_case:
            raise InputError(
                path, f"label has no image (expected {case}{CHANNEL_SUFFIX}.nii.gz beside the images)"
            )
    return [CaseSource(c, by_case[c], labels[c]) for c in sorted(by_case)]


def _folder_layout(images: Path, labels: Path) -> list[CaseSource]:
    """FLARE22 / nnU-Net layout: ``images/<case>_0000.nii.gz`` and ``labels/<case>.nii.gz``."""
    image_files, label_files = nifti_files(images), nifti_files(labels)
    if not image_files:
        raise InputError(images, "empty input folder: no .nii/.nii.gz volumes")
    if not label_files:
        raise InputError(labels, "empty input folder: no .nii/.nii.gz volumes")
    return _pair(image_files, label_files)


def _dataset_layout(root: Path) -> list[CaseSource]:
    """An MSD or nnU-Net folder: ``dataset.json`` with ``training`` pairs, or imagesTr/labelsTr."""
    meta = root / "dataset.json"
    if not meta.is_file():
        raise InputError(root, "no dataset.json: not an MSD/nnU-Net dataset folder")
    try:
        doc = json.loads(meta.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(meta, f"not valid JSON ({exc})") from None
    training = doc.get("training") if isinstance(doc, dict) else None
    if not training:  # nnU-Net v2 lists no files: they are whatever imagesTr/labelsTr hold
        return _folder_layout(root / "imagesTr", root / "labelsTr")
    cases: dict[str, CaseSource] = {}
    for entry in training:
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise InputError(meta, f"'training' entry {entry!r} needs 'image' and 'label'")
        image, label = root / entry["image"], root / entry["label"]
        stem = strip_nifti_suffix(image.name)
        if not image.exists() and stem is not None:  # nnU-Net v1 lists x.nii.gz, stores x_0000.nii.gz
            alt = image.with_name(image.name.replace(stem, stem + CHANNEL_SUFFIX, 1))
            image = alt if alt.exists() else image
        for path in (image, label):
            if not path.is_file():
                raise InputError(path, "listed in dataset.json but not found")
        case = strip_nifti_suffix(label.name)
        if case is None:
            raise InputError(label, "not a NIfTI file (expected .nii or .nii.gz)")
        if case in cases:
            raise InputError(label, f"duplicate case id {case!r} in {meta}")
        cases[case] = CaseSource(case, image, label)
    return [cases[c] for c in sorted(cases)]


def find_cases(*, images=None, labels=None, dataset=None) -> list[CaseSource]:
    """The cases of a FLARE22-layout pair of folders or of an MSD/nnU-Net dataset folder, by id.

    Raises:
        InputError: no input, empty folders, non-NIfTI files, unpaired files, duplicate case ids.
    """
    if dataset is not None:
        if images is not None or labels is not None:
            raise InputError("--dataset", "give either --dataset or --images with --labels, not both")
        return _dataset_layout(Path(dataset))
    if images is None or labels is None:
        raise InputError(
            "--images" if images is None else "--labels", "needs --images and --labels (or --dataset)"
        )
    return _folder_layout(Path(images), Path(labels))


def split_cases(
    case_ids: list[str], *, val_fraction: float = 0.2, seed: int = 0, split_file=None
) -> dict[str, str]:
    """Assign every case (= patient) to "train" or "val"; a case's slices never straddle splits.

    Args:
        case_ids: the cases.
        val_fraction: share of cases for validation; with 2+ cases and a fraction > 0 at least one
            case goes to each split.
        seed: seed of the random permutation (independent of the order cases were found in).
        split_file: optional JSON ``{"train": [...], "val": [...]}`` that decides instead. It may
            name cases we do not have, but every case we have must be in exactly one list.

    Returns:
        case id -> "train" | "val".
    """
    ids = sorted(case_ids)
    if split_file is not None:
        return _split_from_file(Path(split_file), ids)
    if not 0.0 <= val_fraction < 1.0:
        raise InputError("--val-fraction", f"must be in [0, 1), got {val_fraction}")
    n_val = int(round(val_fraction * len(ids)))
    if val_fraction > 0 and len(ids) >= 2:
        n_val = min(max(n_val, 1), len(ids) - 1)
    order = np.random.default_rng(seed).permutation(len(ids))
    val = {ids[i] for i in order[:n_val]}
    return {c: ("val" if c in val else "train") for c in ids}


def _split_from_file(path: Path, ids: list[str]) -> dict[str, str]:
    try:
        doc = json.loads(path.read_text())
        train, val = set(map(str, doc.get("train", []))), set(map(str, doc.get("val", [])))
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        raise InputError(path, f'not a split file {{"train": [...], "val": [...]}} ({exc})') from None
    both = sorted(train & val)
    if both:
        raise InputError(path, f"cases in both train and val: {', '.join(both[:5])}")
    missing = [c for c in ids if c not in train and c not in val]
    if missing:
        raise InputError(path, f"cases missing from the split file: {', '.join(missing[:5])}")
    return {c: ("val" if c in val else "train") for c in ids}


def _check_headers(sources: list[CaseSource]) -> None:
    """Read every header (cheap): readable, 3D, and the label on the image's grid."""
    for src in sources:
        check_same_grid(read_header(src.image), read_header(src.label))


# --- the output folder ------------------------------------------------------------------------


def is_prepared_folder(out: Path) -> bool:
    """True if ``out`` was written by this version of `prepare` (a finished run or an interrupted one).

    A folder marked by another format version is not ours: its files may mean something else.
    """
    marked = folder_format(out, FORMAT)
    if marked is not None:
        return marked == FORMAT
    try:
        return json.loads((out / "dataset.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _check_output(out: Path, overwrite: bool, inputs: list) -> None:
    """Refuse an output that is an input, cannot be written, or is a non-empty folder not ours."""
    check_output_folder(
        out,
        command="prepare",
        ours=is_prepared_folder,
        overwrite=overwrite,
        inputs=[Path(p) for p in inputs if p is not None],
    )


# --- step 2: one case (runs in a worker process) --------------------------------------------


def _case_files(case: str, png: bool) -> list[str]:
    """Paths (relative to OUT) a case owns; PNG entries are folders."""
    files = [f"cache/{case}_image.npy", f"cache/{case}_label.npy"]
    return files + ([f"png/images/{case}", f"png/labels/{case}"] if png else [])


def _fingerprint(src: CaseSource, options: Options) -> str:
    """What a finished case's files depend on: its source files (path, size, mtime) and the options."""
    stats = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in (src.image, src.label)]
    blob = json.dumps({"format": FORMAT, "sources": stats, **options.to_dict()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def slice_organ_pixels(label_slices: np.ndarray) -> np.ndarray:
    """(Z, H, W) FLARE ids -> (Z, 14) pixel counts per id (column 0 = background)."""
    return np.stack([np.bincount(s.ravel(), minlength=14)[:14] for s in label_slices]).astype(np.int64)


def _slice_case(src: CaseSource, window: dict, label_map: LabelMap) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read, validate and slice one case: (uint8 image slices, uint8 label slices, meta)."""
    image, affine, zooms = read_volume(src.image)
    raw_labels, _, _ = read_label_volume(src.label)  # its affine was checked against the image's
    if raw_labels.shape != image.shape:
        raise InputError(src.label, f"label shape {raw_labels.shape} differs from image shape {image.shape}")
    labels = map_labels(raw_labels, label_map, src.label)
    del raw_labels
    image_slices, meta = volume_to_slices(image, affine)
    label_slices, _ = volume_to_slices(labels, affine)
    meta["spacing"] = [float(z) for z in zooms]  # the header's zooms, as FLARE22's evaluation reads them
    return normalize(image_slices, window), label_slices, meta


def _stage_case(src: CaseSource, options: Options, work: Path, fingerprint: str) -> tuple:
    """Prepare one case into ``work/<case>``. Returns ("ok", record) or ("error", path, problem).

    Errors are returned, not raised, so they cross the process boundary as plain tuples.
    """
    try:
        png = options.png
        image, labels, meta = _slice_case(src, options.window, options.label_map)
        px = slice_organ_pixels(labels)
        kept = (px[:, 1:].sum(axis=1) > 0) | options.keep_empty
        tmp = work / f"{src.case}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "cache").mkdir(parents=True)
        np.save(tmp / "cache" / f"{src.case}_image.npy", image)
        np.save(tmp / "cache" / f"{src.case}_label.npy", labels)
        if png:
            _write_pngs(tmp / "png", src.case, image, labels, kept)
        record = {
            "case": src.case,
            "fingerprint": fingerprint,
            "files": _case_files(src.case, png),
            "meta": {
                **meta,
                "n_slices": int(image.shape[0]),
                "slice_shape": [int(s) for s in image.shape[1:]],
                "image": os.path.abspath(src.image),
                "label": os.path.abspath(src.label),
            },
            "kept": kept.astype(int).tolist(),
            "px": px[:, 1:].tolist(),
        }
        (tmp / "record.json").write_text(json.dumps(record))
        final = work / src.case
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        return ("ok", record)
    except InputError as exc:
        return ("error", exc.path, exc.problem)
    except OSError as exc:
        return ("error", exc.filename or str(work), f"cannot write ({exc.strerror or exc})")


def _write_pngs(root: Path, case: str, image: np.ndarray, labels: np.ndarray, kept: np.ndarray) -> None:
    """PNGs of the kept slices: the windowed image and the gray-encoded labels (20*k, 13 -> 255)."""
    (root / "images" / case).mkdir(parents=True)
    (root / "labels" / case).mkdir(parents=True)
    for z in np.flatnonzero(kept):
        name = f"{z:04d}.png"
        Image.fromarray(image[z]).save(root / "images" / case / name, compress_level=1)
        Image.fromarray(labels_to_gray(labels[z])).save(root / "labels" / case / name, compress_level=1)


def _staged_record(work: Path, case: str, fingerprint: str) -> dict | None:
    """The record of a complete staged case with this fingerprint, else None."""
    return _complete_record(work / case / "record.json", work / case, fingerprint)


def _complete_record(record_path: Path, root: Path, fingerprint: str) -> dict | None:
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return None
    if record.get("fingerprint") != fingerprint or not all((root / f).exists() for f in record["files"]):
        return None
    return record


# --- step 3: commit ---------------------------------------------------------------------------


def _commit_case(out: Path, record: dict) -> None:
    """Move a staged case into place. The done marker goes first and comes back last, so an
    interrupted commit leaves a case that the next run redoes, never one it wrongly trusts."""
    case = record["case"]
    done = out / DONE / f"{case}.json"
    done.unlink(missing_ok=True)
    for rel in _case_files(case, True):  # clear what an earlier run (maybe with PNGs) left
        target = out / rel
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    for rel in record["files"]:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(out / WORK / case / rel, out / rel)
    done.parent.mkdir(exist_ok=True)
    write_text_atomic(done, json.dumps(record))
    shutil.rmtree(out / WORK / case, ignore_errors=True)


def _write_manifest(out: Path, records: list[dict], splits: dict[str, str]) -> None:
    tmp = out / f".manifest.csv.tmp-{os.getpid()}"
    with tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(MANIFEST_COLUMNS)
        for rec in records:
            sy, sx, sz = (round(s, 6) for s in rec["meta"]["slice_spacing"])
            for z, (kept, px) in enumerate(zip(rec["kept"], rec["px"])):
                writer.writerow([rec["case"], z, splits[rec["case"]], kept, sx, sy, sz, *px])
    os.replace(tmp, out / "manifest.csv")


def _dataset_json(records: list[dict], splits: dict[str, str], options: Options, split_info: dict) -> dict:
    cases = {}
    found: set[int] = set()
    for rec in records:
        ids = [o.id for o, n in zip(ORGANS, np.asarray(rec["px"]).sum(axis=0)) if n > 0]
        found.update(ids)
        cases[rec["case"]] = {
            "split": splits[rec["case"]],
            **rec["meta"],
            "n_kept": int(sum(rec["kept"])),
            "organs_found": ids,
        }
    return {
        "format": FORMAT,
        "canonical_orientation": "".join(CANONICAL),
        "slice_convention": SLICE_CONVENTION,
        "organs": organ_table(),
        **options.to_dict(),
        "split": split_info,
        "cases": cases,
        "organs_found": sorted(found),
    }


def summary_line(out: str | Path) -> str:
    """One line about a PREPARED folder, from its dataset.json (the CLI prints it)."""
    doc = json.loads((Path(out) / "dataset.json").read_text())
    s = doc["summary"]
    missing = [o.key for o in ORGANS if o.id not in set(doc["organs_found"])]
    return (
        f"prepared {s['cases']} cases ({s['train_cases']} train / {s['val_cases']} val; "
        f"{s['processed']} processed, {s['skipped']} already done), {s['slices']} slices "
        f"({s['kept_slices']} kept), organs found {len(doc['organs_found'])}/{len(ORGANS)}"
        + (f" (none of: {', '.join(missing)})" if missing else "")
        + f", {s['seconds']:.1f} s -> {out}"
    )


# --- the stage --------------------------------------------------------------------------------


def _run_workers(
    todo: list[CaseSource], options: Options, work: Path, prints: dict, workers: int
) -> list[dict]:
    """Stage every case, in ``workers`` processes; raise the first InputError after stopping."""
    records: list[dict] = []
    bar = tqdm(total=len(todo), desc="prepare", unit="case", disable=None, leave=False)
    try:
        if workers <= 1 or len(todo) <= 1:
            for src in todo:
                records.append(_unwrap(_stage_case(src, options, work, prints[src.case])))
                bar.update()
            return records
        ctx = multiprocessing.get_context("spawn")  # no fork of a (possibly threaded) parent
        with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx) as pool:
            pending = {pool.submit(_stage_case, s, options, work, prints[s.case]) for s in todo}
            try:
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_EXCEPTION, timeout=None)
                    for fut in finished:
                        records.append(_unwrap(fut.result()))
                        bar.update()
            except BaseException:
                for fut in pending:
                    fut.cancel()
                raise
        return records
    finally:
        bar.close()


def _unwrap(result: tuple) -> dict:
    if result[0] == "error":
        raise InputError(result[1], result[2])
    return result[1]


def prepare(
    *,
    images=None,
    labels=None,
    dataset=None,
    out,
    window: str = "40,400",
    val_fraction: float = 0.2,
    seed: int = 0,
    split_file=None,
    keep_empty: bool = False,
    workers: int = 1,
    overwrite: bool = False,
    label_map: str = "flare22",
    png: bool = True,
) -> Path:
    """Prepare CT volumes and labels into a PREPARED folder (see the module docstring).

    Args:
        images, labels: FLARE22-layout folders (``<case>_0000.nii.gz`` / ``<case>.nii.gz``).
        dataset: instead, an MSD/nnU-Net folder with ``dataset.json`` and imagesTr/labelsTr.
        out: the PREPARED folder.
        window: "minmax" or "LEVEL,WIDTH" in HU (default abdominal window 40,400 -> [-160, 240]).
        val_fraction, seed, split_file: the patient-level train/val split (:func:`split_cases`).
        keep_empty: also mark slices with no organ as kept (used for training, written as PNG).
        workers: cases processed in parallel processes.
        overwrite: write into a non-empty folder that is not ours; redo finished cases.
        label_map: built-in map name or YAML file mapping source ids to FLARE22 ids.
        png: also write human-viewable PNGs of the kept slices.

    Returns:
        ``out`` as a Path.

    Raises:
        InputError: any bad input (the output is then left as it was).
    """
    t0 = time.perf_counter()
    out = Path(out)
    try:
        window_dict = parse_window(window)
    except ValueError as exc:
        raise InputError("--window", str(exc)) from None
    lmap = load_label_map(label_map)
    if workers < 1:
        raise InputError("--workers", f"must be >= 1, got {workers}")
    sources = find_cases(images=images, labels=labels, dataset=dataset)
    splits = split_cases(
        [s.case for s in sources], val_fraction=val_fraction, seed=seed, split_file=split_file
    )
    _check_output(out, overwrite, [images, labels, dataset])
    _check_headers(sources)

    options = Options(window=window_dict, label_map=lmap, keep_empty=bool(keep_empty), png=bool(png))
    prints = {s.case: _fingerprint(s, options) for s in sources}
    created, had_marker = not out.exists(), (out / MARKER).is_file()
    _open_output(out, had_marker)
    done, todo = _resume(out, sources, prints, overwrite)
    try:
        staged = _run_workers(todo, options, out / WORK, prints, workers)
    except InputError:
        _roll_back(out, created=created, had_marker=had_marker)
        raise
    records = {**done, **{r["case"]: r for r in staged}}
    split_info = {
        "val_fraction": val_fraction,
        "seed": seed,
        "split_file": str(split_file) if split_file else None,
    }
    counts = {"processed": len(staged), "skipped": len(done)}
    try:
        _commit(out, [records[c] for c in sorted(records)], splits, options, split_info, counts, t0)
    except OSError as exc:
        raise InputError(exc.filename or out, f"cannot write ({exc.strerror or exc})") from None
    return out


def _open_output(out: Path, had_marker: bool) -> None:
    """Create the output and staging folders, mark the output as ours, drop half-staged cases."""
    try:
        (out / WORK).mkdir(parents=True, exist_ok=True)
        if not had_marker:
            mark_folder(out, FORMAT)
        for stale in (out / WORK).glob("*.tmp-*"):  # half-written cases of an interrupted run
            shutil.rmtree(stale, ignore_errors=True)
    except OSError as exc:
        raise InputError(out, f"cannot write the output folder ({exc.strerror or exc})") from None


def _resume(out: Path, sources: list[CaseSource], prints: dict[str, str], overwrite: bool):
    """Split the cases into finished ones (committed or staged, same inputs and options) and the rest."""
    done: dict[str, dict] = {}
    todo: list[CaseSource] = []
    for src in sources:
        fp = prints[src.case]
        rec = None
        if not overwrite:
            rec = _complete_record(out / DONE / f"{src.case}.json", out, fp) or _staged_record(
                out / WORK, src.case, fp
            )
        if rec is None:
            todo.append(src)
        else:
            done[src.case] = rec
    return done, todo


def _commit(
    out: Path, records: list[dict], splits: dict, options: Options, split_info: dict, counts: dict, t0: float
) -> None:
    """Move staged cases into place, then write manifest.csv and, last, dataset.json."""
    for rec in records:
        if (out / WORK / rec["case"]).is_dir():
            _commit_case(out, rec)
    _write_manifest(out, records, splits)
    doc = _dataset_json(records, splits, options, split_info)
    doc["summary"] = {
        "cases": len(records),
        "train_cases": sum(1 for r in records if splits[r["case"]] == "train"),
        "val_cases": sum(1 for r in records if splits[r["case"]] == "val"),
        "slices": sum(len(r["kept"]) for r in records),
        "kept_slices": sum(sum(r["kept"]) for r in records),
        **counts,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    write_text_atomic(out / "dataset.json", json.dumps(doc, indent=1))
    shutil.rmtree(out / WORK, ignore_errors=True)


def _roll_back(out: Path, *, created: bool, had_marker: bool) -> None:
    """Undo this run's writes after bad input: the staging area, our marker, a folder we made."""
    shutil.rmtree(out / WORK, ignore_errors=True)
    if created:
        shutil.rmtree(out, ignore_errors=True)
    elif not had_marker:
        (out / MARKER).unlink(missing_ok=True)
