"""`prepare` on phantoms and small volumes: the PREPARED/ contract, exact re-stacking, splits, resume."""

from __future__ import annotations

import csv
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from data_helpers import Layout
from PIL import Image

from clipseg_bench.cli import main
from clipseg_bench.data import prepare as prep
from clipseg_bench.data.prepare import MANIFEST_COLUMNS, prepare
from clipseg_bench.data.volumes import normalize, slices_to_volume
from clipseg_bench.organs import ORGANS, gray_to_labels


def read_manifest(out):
    with (out / "manifest.csv").open() as fh:
        return list(csv.DictReader(fh))


def cache(out, case, kind):
    return np.load(out / "cache" / f"{case}_{kind}.npy", mmap_mode="r")


def test_layout_and_manifest_contract(prepared_dir):
    doc = json.loads((prepared_dir / "dataset.json").read_text())
    assert doc["format"] == "clipseg-bench-prepared/1"
    assert doc["window"] == {"mode": "hu", "level": 40.0, "width": 400.0}
    assert [o["key"] for o in doc["organs"]] == [o.key for o in ORGANS]
    rows = read_manifest(prepared_dir)
    assert list(rows[0]) == MANIFEST_COLUMNS
    for case, meta in doc["cases"].items():
        image, labels = cache(prepared_dir, case, "image"), cache(prepared_dir, case, "label")
        assert image.dtype == np.uint8 and labels.dtype == np.uint8
        assert image.shape == labels.shape == (meta["n_slices"], *meta["slice_shape"])
        case_rows = [r for r in rows if r["case"] == case]
        assert [int(r["z"]) for r in case_rows] == list(range(meta["n_slices"]))
        for r in case_rows:  # pixel counts match the cached labels
            z = int(r["z"])
            assert [int(r[f"px_{o.key}"]) for o in ORGANS] == [int((labels[z] == o.id).sum()) for o in ORGANS]
            assert int(r["kept"]) == int(labels[z].any())
            assert float(r["spacing_z"]) == pytest.approx(meta["spacing"][2])


def test_pngs_are_the_cache_and_decode_to_labels(prepared_dir):
    rows = [r for r in read_manifest(prepared_dir) if r["kept"] == "1"]
    assert rows
    for r in rows[::7]:
        case, z = r["case"], int(r["z"])
        img = np.array(Image.open(prepared_dir / "png" / "images" / case / f"{z:04d}.png"))
        gray = np.array(Image.open(prepared_dir / "png" / "labels" / case / f"{z:04d}.png"))
        np.testing.assert_array_equal(img, cache(prepared_dir, case, "image")[z])
        np.testing.assert_array_equal(gray_to_labels(gray), cache(prepared_dir, case, "label")[z])
    n_png = sum(1 for _ in (prepared_dir / "png" / "labels").rglob("*.png"))
    assert n_png == len(rows)


def test_slices_restack_to_the_original_grid(prepared_dir, phantom_dir):
    doc = json.loads((prepared_dir / "dataset.json").read_text())
    for case, meta in doc["cases"].items():
        img = nib.load(phantom_dir / "images" / f"{case}_0000.nii.gz")
        lab = nib.load(phantom_dir / "labels" / f"{case}.nii.gz")
        np.testing.assert_allclose(meta["affine"], img.affine)
        np.testing.assert_array_equal(
            slices_to_volume(cache(prepared_dir, case, "label"), meta), lab.get_fdata()
        )
        windowed = normalize(img.get_fdata(), doc["window"])
        np.testing.assert_array_equal(slices_to_volume(cache(prepared_dir, case, "image"), meta), windowed)


def test_split_is_by_case_and_reproducible(prepared_dir):
    doc = json.loads((prepared_dir / "dataset.json").read_text())
    split_of = {}
    for r in read_manifest(prepared_dir):
        assert split_of.setdefault(r["case"], r["split"]) == r["split"]  # no case in two splits
    assert split_of == {c: m["split"] for c, m in doc["cases"].items()}
    cases = sorted(split_of)
    again = prep.split_cases(cases, val_fraction=0.25, seed=0)
    assert again == split_of
    other = [prep.split_cases(cases, val_fraction=0.25, seed=s) for s in range(10)]
    assert len({tuple(sorted(o.items())) for o in other}) > 1  # the seed matters


def test_split_file_decides(phantom_dir, tmp_path):
    split = tmp_path / "split.json"
    split.write_text(
        json.dumps({"train": ["phantomA_0000", "phantomA_0003"], "val": ["phantomA_0001", "phantomA_0002"]})
    )
    out = prepare(
        images=phantom_dir / "images",
        labels=phantom_dir / "labels",
        out=tmp_path / "o",
        split_file=split,
        png=False,
    )
    doc = json.loads((out / "dataset.json").read_text())
    assert {c: m["split"] for c, m in doc["cases"].items()} == {
        "phantomA_0000": "train",
        "phantomA_0001": "val",
        "phantomA_0002": "val",
        "phantomA_0003": "train",
    }
    assert not (out / "png").exists()


def test_rerun_skips_finished_cases_and_redoes_changed_options(phantom_dir, tmp_path, capsys):
    args = [
        "prepare",
        "--images",
        str(phantom_dir / "images"),
        "--labels",
        str(phantom_dir / "labels"),
        "--out",
        str(tmp_path / "o"),
        "--no-png",
    ]
    assert main(args) == 0
    assert "4 processed, 0 already done" in capsys.readouterr().out
    stamp = (tmp_path / "o" / "cache" / "phantomA_0000_image.npy").stat().st_mtime_ns
    assert main(args) == 0
    line = capsys.readouterr().out
    assert line.startswith("prepared 4 cases") and "0 processed, 4 already done" in line
    assert (tmp_path / "o" / "cache" / "phantomA_0000_image.npy").stat().st_mtime_ns == stamp
    assert main([*args, "--window", "minmax"]) == 0  # another window changes every case
    assert "4 processed, 0 already done" in capsys.readouterr().out
    image = cache(tmp_path / "o", "phantomA_0000", "image")
    assert (image.reshape(len(image), -1).max(axis=1) == 255).all()  # minmax stretches each slice


def test_interrupted_run_leaves_no_half_written_case(layout, tmp_path, monkeypatch):
    for i, case in enumerate(["a", "b", "c"]):
        layout.add(case, seed=i)
    out = tmp_path / "o"
    real = prep._write_pngs
    calls = []

    def dies_on_second_case(root, case, *args):
        calls.append(case)
        real(root, case, *args)
        if len(calls) == 2:
            raise KeyboardInterrupt  # mid-case: its PNGs are written, its record is not

    monkeypatch.setattr(prep, "_write_pngs", dies_on_second_case)
    with pytest.raises(KeyboardInterrupt):
        prepare(images=layout.images, labels=layout.labels, out=out)
    assert not (out / "dataset.json").exists()
    assert not (out / "cache").exists()  # nothing reached its final place
    assert sorted(p.name for p in (out / ".work").iterdir() if "tmp" not in p.name) == ["a"]
    monkeypatch.setattr(prep, "_write_pngs", real)
    prepare(images=layout.images, labels=layout.labels, out=out)
    doc = json.loads((out / "dataset.json").read_text())
    assert doc["summary"]["skipped"] == 1 and doc["summary"]["processed"] == 2
    assert not (out / ".work").exists()
    fresh = prepare(images=layout.images, labels=layout.labels, out=tmp_path / "fresh")
    for case in "abc":
        np.testing.assert_array_equal(cache(out, case, "image"), cache(fresh, case, "image"))
        assert sorted(p.name for p in (out / "png" / "labels" / case).iterdir()) == sorted(
            p.name for p in (fresh / "png" / "labels" / case).iterdir()
        )


def test_parallel_workers_give_the_same_result(phantom_dir, tmp_path):
    one = prepare(
        images=phantom_dir / "images", labels=phantom_dir / "labels", out=tmp_path / "one", png=False
    )
    two = prepare(
        images=phantom_dir / "images",
        labels=phantom_dir / "labels",
        out=tmp_path / "two",
        png=False,
        workers=2,
    )
    assert (one / "manifest.csv").read_text() == (two / "manifest.csv").read_text()
    for case in json.loads((one / "dataset.json").read_text())["cases"]:
        for kind in ("image", "label"):
            np.testing.assert_array_equal(cache(one, case, kind), cache(two, case, kind))


def test_msd_and_nnunet_dataset_folders(phantom_dir, tmp_path):
    cases = ["phantomA_0000", "phantomA_0001"]
    msd = tmp_path / "Task01"
    (msd / "imagesTr").mkdir(parents=True)
    (msd / "labelsTr").mkdir()
    for c in cases:  # MSD names the image like the label, without the channel suffix
        shutil.copy(phantom_dir / "images" / f"{c}_0000.nii.gz", msd / "imagesTr" / f"{c}.nii.gz")
        shutil.copy(phantom_dir / "labels" / f"{c}.nii.gz", msd / "labelsTr" / f"{c}.nii.gz")
    training = [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in cases]
    (msd / "dataset.json").write_text(json.dumps({"name": "phantom", "training": training}))
    nnunet = tmp_path / "Dataset001"
    (nnunet / "imagesTr").mkdir(parents=True)
    (nnunet / "labelsTr").mkdir()
    for c in cases:
        shutil.copy(phantom_dir / "images" / f"{c}_0000.nii.gz", nnunet / "imagesTr")
        shutil.copy(phantom_dir / "labels" / f"{c}.nii.gz", nnunet / "labelsTr")
    (nnunet / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "file_ending": ".nii.gz"}))
    outs = [prepare(dataset=d, out=tmp_path / f"out{i}", png=False) for i, d in enumerate([msd, nnunet])]
    for out in outs:
        assert sorted(json.loads((out / "dataset.json").read_text())["cases"]) == cases
    np.testing.assert_array_equal(cache(outs[0], cases[1], "label"), cache(outs[1], cases[1], "label"))


def test_keep_empty_and_custom_label_map(layout, tmp_path):
    """A YAML map from another dataset's ids; empty slices kept only on request."""
    from data_helpers import small_case

    image, labels = small_case()
    source = np.where(labels == 1, 7, np.where(labels == 13, 4, 0)).astype(
        np.uint8
    )  # "7 = liver, 4 = kidney"
    source[0, 0, 0] = 9  # a structure FLARE22 does not score, dropped by the map
    Layout(layout.root).add("x", image=image, labels=source)
    yaml_map = tmp_path / "map.yaml"
    yaml_map.write_text("map:\n  0: 0\n  7: 1\n  4: 13\n  9: 0\n")
    out = prepare(images=layout.images, labels=layout.labels, out=tmp_path / "o", label_map=str(yaml_map))
    restacked = slices_to_volume(
        cache(out, "x", "label"), json.loads((out / "dataset.json").read_text())["cases"]["x"]
    )
    np.testing.assert_array_equal(restacked, labels)
    rows = read_manifest(out)
    kept = sum(int(r["kept"]) for r in rows)
    assert kept == int(labels.any(axis=(0, 1)).sum()) < len(rows)
    out2 = prepare(
        images=layout.images,
        labels=layout.labels,
        out=tmp_path / "o2",
        label_map=str(yaml_map),
        keep_empty=True,
    )
    assert all(r["kept"] == "1" for r in read_manifest(out2))
    assert len(list((out2 / "png" / "images" / "x").iterdir())) == len(rows)
