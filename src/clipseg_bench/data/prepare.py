"""`clipseg-bench prepare`: CT volumes -> axial slices, array cache, PNGs, manifest and dataset.json.

The stage runs in three steps, so that bad input never leaves anything half-written:

1. **Check** (nothing written): find and pair the cases, refuse duplicates, unpaired files and
   empty folders, split the cases (test, then train/val or folds, by patient: data/splits.py),
   check the output folder, and read every header
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

from clipseg_bench.data.channels import hu_slices
from clipseg_bench.data.io import (
    CHANNEL_SUFFIX,
    case_ids,
    check_same_grid,
    image_files,
    map_labels,
    nifti_files,
    read_header,
    read_label_volume,
    read_organ_masks,
    read_volume,
    strip_nifti_suffix,
)
from clipseg_bench.data.splits import Assignment, assign_cases, read_groups
from clipseg_bench.data.splits import split_cases as split_cases  # re-exported: prepare's split, as before
from clipseg_bench.data.volumes import CANONICAL, normalize, parse_window, volume_to_slices
from clipseg_bench.errors import FieldError, InputError, RunFailed
from clipseg_bench.organs import (
    BY_ID,
    ORGANS,
    LabelMap,
    label_map_from_names,
    labels_to_gray,
    load_label_map,
    organ_id_for_name,
    organ_table,
)
from clipseg_bench.provenance import (
    check_output_folder,
    folder_format,
    mark_folder,
    marker_name,
    output_lock,
    write_error,
    write_text_atomic,
)

FORMAT = "clipseg-bench-prepared/1"
MARKER = marker_name(FORMAT)  # ".clipseg-bench-prepared": "this folder is ours" from the first write on
WORK = ".work"
DONE = ".done"
LAYOUTS = ("msd", "per-organ")  # what --layout says a --dataset folder is
PER_ORGAN_CT_NAMES = ("ct.nii.gz", "ct.nii", "ct")  # "ct" = a folder holding one DICOM series
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
            "hu_cache": True,  # cache/<case>_hu.npy (input_channels: windows); absent before it existed
        }


@dataclass(frozen=True)
class CaseSource:
    """One case to prepare: its id, its image (NIfTI file or DICOM series folder) and its labels.

    ``label`` is a label volume, or for the per-organ layout the ``segmentations`` folder, whose
    mask files and their FLARE22 ids are ``organ_files``.
    """

    case: str
    image: Path
    label: Path
    organ_files: tuple[tuple[Path, int], ...] = ()

    def label_files(self) -> list[Path]:
        """Every label file this case reads."""
        return [p for p, _ in self.organ_files] if self.organ_files else [self.label]


# --- step 1: find, pair and split the cases --------------------------------------------------


def _pair(images: dict[str, Path], labels: dict[str, Path]) -> list[CaseSource]:
    """Pair image and label files by case id (:func:`~clipseg_bench.data.io.image_case_id`, for files
    and DICOM series folders alike); every file needs its partner."""
    by_case = case_ids(images)
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
    """FLARE22 / nnU-Net layout: ``images/<case>_0000.nii.gz`` (or ``images/<case>/``, a DICOM
    series) and ``labels/<case>.nii.gz``."""
    images_found, labels_found = image_files(images), nifti_files(labels)
    if not images_found:
        raise InputError(images, "empty input folder: no .nii/.nii.gz volumes or DICOM series folders")
    if not labels_found:
        raise InputError(labels, "empty input folder: no .nii/.nii.gz volumes")
    return _pair(images_found, labels_found)


def _read_dataset_json(root: Path) -> tuple[Path, dict]:
    meta = root / "dataset.json"
    if not meta.is_file():
        raise InputError(root, "no dataset.json: not an MSD/nnU-Net dataset folder")
    try:
        doc = json.loads(meta.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(meta, f"not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise InputError(meta, "not a dataset.json (expected a JSON object)")
    return meta, doc


def declared_label_names(root: str | Path) -> dict[int, str]:
    """The label names an MSD or nnU-Net dataset.json declares, as {label id: name} ({} if none).

    MSD v1 writes ``"labels": {"1": "liver"}``, nnU-Net v2 ``"labels": {"liver": 1}``.

    Raises:
        InputError: naming dataset.json when ``labels`` is neither form (nnU-Net v2 region lists
            such as ``"kidney": [1, 2]`` included: a region is not one label id).
    """
    meta, doc = _read_dataset_json(Path(root))
    labels = doc.get("labels")
    if not labels:
        return {}
    if not isinstance(labels, dict):
        raise InputError(meta, "'labels' must map ids to names (MSD) or names to ids (nnU-Net v2)")
    names: dict[int, str] = {}
    for key, value in labels.items():
        if str(key).strip().isdigit() and isinstance(value, str):  # MSD v1: {"1": "liver"}
            sid, name = int(key), value
        elif isinstance(value, int) and not isinstance(value, bool):  # nnU-Net v2: {"liver": 1}
            sid, name = value, str(key)
        else:
            raise InputError(
                meta, f"label {key!r}: {value!r} is not an id/name pair (region labels are not supported)"
            )
        if sid in names:
            raise InputError(meta, f"label id {sid} is named twice ({names[sid]!r}, {name!r})")
        names[sid] = name
    return names


def dataset_label_map(root: str | Path, explicit: LabelMap | None) -> LabelMap:
    """The label map of an MSD/nnU-Net dataset: from the names its dataset.json declares.

    Args:
        root: the dataset folder.
        explicit: the user's ``--label-map``, if given. It decides, but it must agree with every
            name this tool can map (a name it cannot map is the user's to decide).

    Returns:
        ``explicit`` when given; else the map built from the declared names; else FLARE22 ids.

    Raises:
        InputError: a declared name maps to nothing (without ``--label-map``), or ``--label-map``
            maps a named organ's id elsewhere.
    """
    names = declared_label_names(root)
    meta = Path(root) / "dataset.json"
    if not names:
        return explicit or load_label_map("flare22")
    if explicit is None:
        return label_map_from_names(names, source=str(meta))
    for sid, name in sorted(names.items()):
        named = 0 if sid == 0 else organ_id_for_name(name)
        given = explicit.mapping.get(sid, explicit.default)
        if named is not None and given is not None and given != named:
            what = BY_ID[named].name if named else "background"
            got = BY_ID[given].name if given else "background"
            raise FieldError(
                "label_map",
                f"{explicit.source} maps label {sid} to {given} ({got}), but {meta} names it {name!r} ({what})",
            )
    return explicit


def _dataset_layout(root: Path) -> list[CaseSource]:
    """An MSD or nnU-Net folder: ``dataset.json`` with ``training`` pairs, or imagesTr/labelsTr."""
    meta, doc = _read_dataset_json(root)
    training = doc.get("training")
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


def _per_organ_layout(root: Path, label_map: LabelMap) -> list[CaseSource]:
    """TotalSegmentator / AbdomenAtlas layout: ``<case>/ct.nii.gz`` (or ``<case>/ct/``, a DICOM
    series) and ``<case>/segmentations/<structure>.nii.gz``, one binary mask per structure.

    Mask names map to FLARE22 ids through ``label_map``'s names, then the built-in name table, then
    its ``default`` (:func:`~clipseg_bench.organs.organ_id_for_name`); masks that map to 0 are not
    read. A name nothing maps is an error: a label map with ``default: 0`` (``totalsegmentator``,
    ``abdomenatlas``) makes every structure that is not a FLARE22 organ background instead.
    """
    if not root.is_dir():
        raise InputError(root, "not a folder" if root.exists() else "not a folder: it does not exist")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise InputError(root, "no case folders (<case>/ct.nii.gz + <case>/segmentations/)")
    return [_per_organ_case(folder, label_map) for folder in folders]


def _per_organ_case(folder: Path, label_map: LabelMap) -> CaseSource:
    image = next((folder / n for n in PER_ORGAN_CT_NAMES if (folder / n).exists()), None)
    if image is None:
        raise InputError(folder, f"no CT: expected {' or '.join(PER_ORGAN_CT_NAMES)} (a DICOM folder)")
    masks = nifti_files(folder / "segmentations")
    organ_files = []
    for name, path in masks.items():
        organ_id = organ_id_for_name(name, label_map)
        if organ_id is None:
            raise InputError(
                path,
                "maps to no FLARE22 organ; --label-map totalsegmentator (or abdomenatlas) drops structures "
                "that are not FLARE22 organs, or give a label map with names: {" + name + ": ID}",
            )
        if organ_id:
            organ_files.append((path, organ_id))
    if not organ_files:
        raise InputError(folder / "segmentations", "no mask maps to a FLARE22 organ")
    return CaseSource(folder.name, image, folder / "segmentations", tuple(organ_files))


def find_cases(
    *, images=None, labels=None, dataset=None, layout: str = "msd", label_map: LabelMap | None = None
) -> list[CaseSource]:
    """The cases of a FLARE22-layout pair of folders, or of a dataset folder in ``layout``, by id.

    Args:
        layout: what ``dataset`` is: "msd" (MSD/nnU-Net, dataset.json) or "per-organ".
        label_map: maps per-organ mask names (default: the FLARE22 map, which knows no extra names).

    Raises:
        InputError: no input, empty folders, non-NIfTI files, unpaired files, duplicate case ids,
            per-organ masks that map to nothing.
    """
    if layout not in LAYOUTS:
        raise FieldError("layout", f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    if dataset is not None:
        if images is not None or labels is not None:
            raise FieldError("dataset", "give either --dataset or --images with --labels, not both")
        if layout == "per-organ":
            return _per_organ_layout(Path(dataset), label_map or load_label_map("flare22"))
        return _dataset_layout(Path(dataset))
    if layout != "msd":
        raise FieldError("layout", f"--layout {layout} needs --dataset DIR")
    if images is None or labels is None:
        raise FieldError(
            "images" if images is None else "labels", "needs --images and --labels (or --dataset)"
        )
    return _folder_layout(Path(images), Path(labels))


def _check_headers(sources: list[CaseSource]) -> None:
    """Read every header (cheap): readable, 3D, and the labels on the image's grid."""
    for src in sources:
        image = read_header(src.image)
        for label in src.label_files():
            check_same_grid(image, read_header(label))


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
    files = [f"cache/{case}_image.npy", f"cache/{case}_label.npy", f"cache/{case}_hu.npy"]
    return files + ([f"png/images/{case}", f"png/labels/{case}"] if png else [])


def _fingerprint(src: CaseSource, options: Options) -> str:
    """What a finished case's files depend on: its source files (path, size, mtime) and the options."""
    files = [src.image, *src.label_files()]
    if src.image.is_dir():  # a DICOM series: every slice file
        files = sorted(p for p in src.image.iterdir() if p.is_file()) + files[1:]
    stats = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    blob = json.dumps({"format": FORMAT, "sources": stats, **options.to_dict()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def slice_organ_pixels(label_slices: np.ndarray) -> np.ndarray:
    """(Z, H, W) FLARE ids -> (Z, 14) pixel counts per id (column 0 = background)."""
    return np.stack([np.bincount(s.ravel(), minlength=14)[:14] for s in label_slices]).astype(np.int64)


def _slice_case(src: CaseSource, window: dict, label_map: LabelMap) -> tuple[np.ndarray, ...]:
    """Read, validate and slice one case: (uint8 image slices, uint8 label slices, meta, int16 HU slices)."""
    image, affine, zooms = read_volume(src.image)
    labels = _read_labels(src, image.shape, label_map)
    image_slices, meta = volume_to_slices(image, affine)
    label_slices, _ = volume_to_slices(labels, affine)
    meta["spacing"] = [float(z) for z in zooms]  # the header's zooms, as FLARE22's evaluation reads them
    return normalize(image_slices, window), label_slices, meta, hu_slices(image_slices)


def _read_labels(src: CaseSource, shape: tuple[int, ...], label_map: LabelMap) -> np.ndarray:
    """The case's FLARE22 label volume (uint8, on the image grid), from one label file or per-organ masks."""
    if src.organ_files:
        return read_organ_masks(list(src.organ_files), shape)
    raw_labels, _, _ = read_label_volume(src.label)  # its affine was checked against the image's
    if raw_labels.shape != shape:
        raise InputError(src.label, f"label shape {raw_labels.shape} differs from image shape {shape}")
    return map_labels(raw_labels, label_map, src.label)


def _stage_case(src: CaseSource, options: Options, work: Path, fingerprint: str) -> tuple:
    """Prepare one case into ``work/<case>``. Returns ("ok", record) or ("error", path, problem).

    Errors are returned, not raised, so they cross the process boundary as plain tuples.
    """
    need = None
    try:
        png = options.png
        image, labels, meta, hu = _slice_case(src, options.window, options.label_map)
        need = image.nbytes + labels.nbytes + hu.nbytes
        px = slice_organ_pixels(labels)
        kept = (px[:, 1:].sum(axis=1) > 0) | options.keep_empty
        tmp = work / f"{src.case}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "cache").mkdir(parents=True)
        np.save(tmp / "cache" / f"{src.case}_image.npy", image)
        np.save(tmp / "cache" / f"{src.case}_label.npy", labels)
        np.save(tmp / "cache" / f"{src.case}_hu.npy", hu)  # int16 HU: what input_channels=windows reads
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
    except OSError as exc:  # a full disk, ulimit -f: this case's half-written files go
        shutil.rmtree(work / f"{src.case}.tmp-{os.getpid()}", ignore_errors=True)
        error = write_error(exc.filename or work, exc, need=need)
        return ("failed" if isinstance(error, RunFailed) else "error", error.path, error.problem)


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
    """manifest.csv: one row per slice; ``split`` is the case's (with folds: fold 0 is val)."""
    tmp = out / f".manifest.csv.tmp-{os.getpid()}"
    with tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(MANIFEST_COLUMNS)
        for rec in records:
            sy, sx, sz = (round(s, 6) for s in rec["meta"]["slice_spacing"])
            for z, (kept, px) in enumerate(zip(rec["kept"], rec["px"])):
                writer.writerow([rec["case"], z, splits[rec["case"]], kept, sx, sy, sz, *px])
    os.replace(tmp, out / "manifest.csv")


def _dataset_json(records: list[dict], assigned: Assignment, options: Options, split_info: dict) -> dict:
    """dataset.json: the options, how the cases were split, and per case its split (and fold), grid
    and organs."""
    cases = {}
    found: set[int] = set()
    for rec in records:
        ids = [o.id for o, n in zip(ORGANS, np.asarray(rec["px"]).sum(axis=0)) if n > 0]
        found.update(ids)
        cases[rec["case"]] = {
            "split": assigned.split[rec["case"]],
            **({"fold": assigned.fold[rec["case"]]} if assigned.n_folds else {}),
            "patient": split_info["patients"][rec["case"]],
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
    if s.get("fold_cases"):
        sides = f"{len(s['fold_cases'])} folds of {'/'.join(map(str, s['fold_cases']))} cases"
    else:
        sides = f"{s['train_cases']} train / {s['val_cases']} val"
    sides += f", {s['test_cases']} test" if s.get("test_cases") else ""
    return (
        f"prepared {s['cases']} cases ({sides}; "
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
    if result[0] == "failed":
        raise RunFailed(result[1], result[2])
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
    groups=None,
    folds: int | None = None,
    test_fraction: float = 0.0,
    keep_empty: bool = False,
    workers: int = 1,
    overwrite: bool = False,
    label_map: str | None = None,
    layout: str = "msd",
    png: bool = True,
) -> Path:
    """Prepare CT volumes and labels into a PREPARED folder (see the module docstring).

    Args:
        images, labels: FLARE22-layout folders (``<case>_0000.nii.gz`` or ``<case>/`` holding a
            DICOM series / ``<case>.nii.gz``).
        dataset: instead, a dataset folder in ``layout``.
        layout: "msd": MSD/nnU-Net (``dataset.json``, imagesTr/labelsTr; the label names it declares
            are mapped to FLARE22 organs, :func:`dataset_label_map`); "per-organ":
            ``<case>/ct.nii.gz`` + ``<case>/segmentations/<structure>.nii.gz`` (:func:`find_cases`).
        out: the PREPARED folder.
        window: "minmax" or "LEVEL,WIDTH" in HU (default abdominal window 40,400 -> [-160, 240]).
        val_fraction, seed, split_file: the patient-level train/val split (:func:`split_cases`).
        groups: CSV ``case, patient`` (:func:`read_groups`): a patient's cases stay on one side.
        folds: K folds instead of one train/val split (every non-test case in one fold).
        test_fraction: share of the patients set aside as the test split, before the folds
            (:func:`~clipseg_bench.data.splits.assign_cases`).
        keep_empty: also mark slices with no organ as kept (used for training, written as PNG).
        workers: cases processed in parallel processes.
        overwrite: write into a non-empty folder that is not ours; redo finished cases.
        label_map: built-in map name or YAML file mapping source ids (and per-organ mask names) to
            FLARE22 ids; default: the names a dataset.json declares, else FLARE22 ids.
        png: also write human-viewable PNGs of the kept slices.

    Returns:
        ``out`` as a Path.

    Raises:
        InputError: any bad input (the output is then left as it was), or another `prepare` writing
            into ``out`` right now.
        RunFailed: no room on the disk (the cases staged whole are kept for a re-run).
    """
    t0 = time.perf_counter()
    out = Path(out)
    if workers < 1:
        raise FieldError("workers", f"must be >= 1, got {workers}")
    window_dict, lmap, sources = _read_inputs(images, labels, dataset, layout, window, label_map)
    draw = {"val_fraction": val_fraction, "folds": folds, "test_fraction": test_fraction, "seed": seed}
    assigned, split_info = _split([s.case for s in sources], groups=groups, split_file=split_file, **draw)
    _check_output(out, overwrite, [images, labels, dataset])
    _check_headers(sources)

    options = Options(window=window_dict, label_map=lmap, keep_empty=bool(keep_empty), png=bool(png))
    prints = {s.case: _fingerprint(s, options) for s in sources}
    created, had_marker = not out.exists(), (out / MARKER).is_file()
    with output_lock(out, "prepare"):  # a second `prepare` into this folder is refused while this one runs
        records, counts = _stage(out, sources, options, prints, workers, overwrite, created, had_marker)
        try:
            _commit(out, [records[c] for c in sorted(records)], assigned, options, split_info, counts, t0)
        except OSError as exc:
            raise write_error(exc.filename or out, exc) from None
    return out


def _stage(out: Path, sources, options: Options, prints, workers: int, overwrite: bool, created, had_marker):
    """Stage every case not done yet; returns (every case's record, the processed/skipped counts).

    Bad input rolls the output back (nothing written); a full disk keeps the cases staged whole
    (a re-run after freeing space continues from them) and removes only the half-written one.
    """
    _open_output(out, had_marker)
    done, todo = _resume(out, sources, prints, overwrite)
    try:
        staged = _run_workers(todo, options, out / WORK, prints, workers)
    except RunFailed:
        raise
    except InputError:
        _roll_back(out, created=created, had_marker=had_marker)
        raise
    return {**done, **{r["case"]: r for r in staged}}, {"processed": len(staged), "skipped": len(done)}


def _split(case_ids: list[str], *, groups, split_file, **draw) -> tuple[Assignment, dict]:
    """Where the cases go (:func:`~clipseg_bench.data.splits.assign_cases`: test, then train/val or
    folds, by the patients of ``groups``) and dataset.json's ``split`` record of it.

    Args:
        draw: val_fraction, folds, test_fraction and seed.
    """
    patients = read_groups(groups, case_ids) if groups is not None else {c: c for c in case_ids}
    assigned = assign_cases(
        case_ids, split_file=split_file, groups=patients if groups is not None else None, **draw
    )
    info = {"val_fraction": draw["val_fraction"], "seed": draw["seed"], "split_file": split_file}
    info = {**info, "groups_file": groups}
    info = {
        **{k: str(v) if isinstance(v, Path) else v for k, v in info.items()},
        **assigned.info,  # folds, test_fraction, how they were drawn (val_fraction None with folds)
        "patients": patients,
    }
    return assigned, info


def _read_inputs(images, labels, dataset, layout: str, window: str, label_map: str | None):
    """(window, label map, case sources) of a prepare call, every input checked.

    Raises:
        FieldError: a bad window; InputError: a bad label map or case folder.
    """
    try:
        window_dict = parse_window(window)
    except ValueError as exc:
        raise FieldError("window", str(exc)) from None
    explicit = None if label_map is None else load_label_map(label_map)
    if dataset is not None and layout == "msd":
        lmap = dataset_label_map(dataset, explicit)
    else:
        lmap = explicit or load_label_map("flare22")
    sources = find_cases(images=images, labels=labels, dataset=dataset, layout=layout, label_map=lmap)
    return window_dict, lmap, sources


def _open_output(out: Path, had_marker: bool) -> None:
    """Create the output and staging folders, mark the output as ours, drop half-staged cases."""
    try:
        (out / WORK).mkdir(parents=True, exist_ok=True)
        if not had_marker:
            mark_folder(out, FORMAT)
        for stale in (out / WORK).glob("*.tmp-*"):  # half-written cases of an interrupted run
            shutil.rmtree(stale, ignore_errors=True)
    except OSError as exc:
        raise write_error(out, exc) from None


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
    out: Path,
    records: list[dict],
    assigned: Assignment,
    options: Options,
    split_info: dict,
    counts: dict,
    t0: float,
) -> None:
    """Move staged cases into place, then write manifest.csv and, last, dataset.json."""
    for rec in records:
        if (out / WORK / rec["case"]).is_dir():
            _commit_case(out, rec)
    splits = assigned.split
    _write_manifest(out, records, splits)
    doc = _dataset_json(records, assigned, options, split_info)
    doc["summary"] = {
        "cases": len(records),
        "train_cases": sum(1 for r in records if splits[r["case"]] == "train"),
        "val_cases": sum(1 for r in records if splits[r["case"]] == "val"),
        "test_cases": sum(1 for r in records if splits[r["case"]] == "test"),
        **({"fold_cases": assigned.fold_sizes()} if assigned.n_folds else {}),
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
