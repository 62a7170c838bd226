"""Datasets as users have them: label names declared in dataset.json, per-organ mask folders, and
several scans of one patient (groups)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from data_helpers import AFFINE, save, small_case
from test_prepare_errors import assert_one_line_error, run

from clipseg_bench.data.prepare import prepare, read_groups, split_cases
from clipseg_bench.data.volumes import slices_to_volume
from clipseg_bench.errors import InputError
from clipseg_bench.organs import BY_KEY, label_map_from_names, load_label_map

LIVER, SPLEEN, LEFT_KIDNEY = BY_KEY["liver"].id, BY_KEY["spleen"].id, BY_KEY["left_kidney"].id


def restacked_labels(out: Path, case: str) -> np.ndarray:
    meta = json.loads((out / "dataset.json").read_text())["cases"][case]
    return slices_to_volume(np.load(out / "cache" / f"{case}_label.npy"), meta)


# --- 0. the label names a dataset.json declares ------------------------------------------------


def nnunet_dataset(root: Path, labels: dict, source_ids: dict[int, int]) -> tuple[Path, np.ndarray]:
    """An nnU-Net folder with one case whose label volume uses ``source_ids`` (FLARE id -> source id)."""
    image, flare = small_case()
    source = np.zeros_like(flare)
    for flare_id, sid in source_ids.items():
        source[flare == flare_id] = sid
    save(image, root / "imagesTr" / "c1_0000.nii.gz")
    save(source, root / "labelsTr" / "c1.nii.gz")
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": labels}))
    return root, flare


@pytest.mark.parametrize("form", ["nnunet_v2", "msd_v1"])
def test_dataset_json_label_names_decide_the_ids(tmp_path, form):
    """'liver': 3, 'left kidney': 1 in dataset.json: the liver is not read as FLARE id 3 (spleen)."""
    names = {"background": 0, "kidney_left": 1, "liver": 3}
    labels = names if form == "nnunet_v2" else {str(v): k for k, v in names.items()}
    root, flare = nnunet_dataset(tmp_path / "ds", labels, {LIVER: 3, LEFT_KIDNEY: 1})
    out = prepare(dataset=root, out=tmp_path / "out", png=False)
    np.testing.assert_array_equal(restacked_labels(out, "c1"), flare)
    doc = json.loads((out / "dataset.json").read_text())
    assert doc["label_map"]["map"] == {"0": 0, "1": LEFT_KIDNEY, "3": LIVER}
    assert doc["cases"]["c1"]["organs_found"] == [LIVER, LEFT_KIDNEY]


def test_dataset_json_unknown_name_and_label_map_disagreement(tmp_path, capsys):
    root, _ = nnunet_dataset(tmp_path / "ds", {"background": 0, "liver": 1, "liver tumour": 2}, {LIVER: 1})
    rc, _, err = run(["prepare", "--dataset", str(root), "--out", str(tmp_path / "o1")], capsys)
    line = assert_one_line_error(rc, err, str(root / "dataset.json"))
    assert "'liver tumour'" in line and "--label-map" in line
    assert not (tmp_path / "o1").exists()
    # the user decides the tumour is liver: accepted, as the map agrees with the names it can check
    ok = tmp_path / "ok.yaml"
    ok.write_text("map: {0: 0, 1: 1, 2: 1}\n")
    prepare(dataset=root, out=tmp_path / "o2", label_map=str(ok), png=False)
    # a map that sends the liver elsewhere contradicts dataset.json
    bad = tmp_path / "bad.yaml"
    bad.write_text("map: {0: 0, 1: 3, 2: 0}\n")
    rc, _, err = run(
        ["prepare", "--dataset", str(root), "--out", str(tmp_path / "o3"), "--label-map", str(bad)], capsys
    )
    line = assert_one_line_error(rc, err, "--label-map")
    assert "'liver'" in line and "spleen" in line
    assert not (tmp_path / "o3").exists()


# The label names of AMOS22's and BTCV's own dataset.json files (AMOS spells the aorta "arota").
AMOS_NAMES = (
    "background,spleen,right kidney,left kidney,gall bladder,esophagus,liver,stomach,arota,postcava,"
    "pancreas,right adrenal gland,left adrenal gland,duodenum,bladder,prostate/uterus"
).split(",")
BTCV_NAMES = (
    "background,spleen,right kidney,left kidney,gallbladder,esophagus,liver,stomach,aorta,"
    "inferior vena cava,portal vein and splenic vein,pancreas,right adrenal gland,left adrenal gland"
).split(",")


@pytest.mark.parametrize(("names", "builtin"), [(AMOS_NAMES, "amos"), (BTCV_NAMES, "btcv")])
def test_public_datasets_names_give_their_builtin_maps(names, builtin):
    """AMOS's and BTCV's own dataset.json names map exactly as the hand-written id maps do."""
    from_names = label_map_from_names(dict(enumerate(names)), source="dataset.json")
    assert from_names.mapping == load_label_map(builtin).mapping


def test_two_names_for_one_organ_is_an_error():
    with pytest.raises(InputError, match="both name liver"):
        label_map_from_names({0: "background", 1: "liver", 2: "Liver"}, source="dataset.json")


# --- 1. per-organ layout: <case>/ct.nii.gz + <case>/segmentations/<structure>.nii.gz ------------

# TotalSegmentator's file names for the FLARE22 organs.
TS_FILE_NAMES = (
    "liver,kidney_right,spleen,pancreas,aorta,inferior_vena_cava,adrenal_gland_right,"
    "adrenal_gland_left,gallbladder,esophagus,stomach,duodenum,kidney_left"
).split(",")
TS_NAMES = {name: flare_id for flare_id, name in enumerate(TS_FILE_NAMES, start=1)}


def per_organ_case(root: Path, case: str, ct: Path, flare: np.ndarray, affine, extra: dict | None = None):
    """Write ``root/case``: the CT (a link) and one binary mask per organ under its TotalSegmentator name."""
    seg = root / case / "segmentations"
    seg.mkdir(parents=True)
    (root / case / "ct.nii.gz").symlink_to(ct)
    for name, flare_id in TS_NAMES.items():
        nib.save(nib.Nifti1Image((flare == flare_id).astype(np.uint8), affine), seg / f"{name}.nii.gz")
    for name, mask in (extra or {}).items():
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), seg / f"{name}.nii.gz")
    return seg


def test_per_organ_layout_prepares_like_the_flare_layout(shared_ct, tmp_path):
    """The shared CT as TotalSegmentator ships cases: same slices and labels as its FLARE22 layout."""
    ct = shared_ct / "images" / "TS_0001_0000.nii.gz"
    label = nib.load(shared_ct / "labels" / "TS_0001.nii.gz")
    flare = np.asanyarray(label.dataobj)
    lung = np.zeros(flare.shape, bool)
    lung[:, :, 105:] = flare[:, :, 105:] == 0  # a structure FLARE22 does not score, beside the organs
    per_organ_case(tmp_path / "ts", "TS_0001", ct, flare, label.affine, {"lung_upper_lobe_left": lung})
    a = prepare(images=shared_ct / "images", labels=shared_ct / "labels", out=tmp_path / "a", png=False)
    b = prepare(
        dataset=tmp_path / "ts",
        layout="per-organ",
        label_map="totalsegmentator",
        out=tmp_path / "b",
        png=False,
    )
    for kind in ("image", "label"):
        np.testing.assert_array_equal(
            np.load(a / "cache" / f"TS_0001_{kind}.npy"), np.load(b / "cache" / f"TS_0001_{kind}.npy")
        )
    meta_a, meta_b = (json.loads((o / "dataset.json").read_text())["cases"]["TS_0001"] for o in (a, b))
    assert meta_a["affine"] == meta_b["affine"] and meta_a["organs_found"] == meta_b["organs_found"]


@pytest.fixture
def small_per_organ(tmp_path):
    """A small per-organ case (liver + left kidney masks, other organs' files empty)."""
    image, flare = small_case()
    ct = save(image, tmp_path / "ct_src.nii.gz")
    per_organ_case(tmp_path / "ds", "c1", ct, flare, AFFINE)
    return tmp_path / "ds", flare


def test_per_organ_unknown_name_is_an_error_unless_the_map_drops_it(small_per_organ, tmp_path, capsys):
    root, flare = small_per_organ
    extra = save(np.zeros(flare.shape, np.uint8), root / "c1" / "segmentations" / "colon.nii.gz")
    args = ["prepare", "--dataset", str(root), "--layout", "per-organ", "--out", str(tmp_path / "o1")]
    rc, _, err = run(args, capsys)
    assert "--label-map totalsegmentator" in assert_one_line_error(rc, err, str(extra))
    assert not (tmp_path / "o1").exists()
    names_map = tmp_path / "names.yaml"  # or name it: the colon counts as background
    names_map.write_text("names: {colon: 0}\n")
    out = prepare(dataset=root, layout="per-organ", label_map=str(names_map), out=tmp_path / "o2", png=False)
    np.testing.assert_array_equal(restacked_labels(out, "c1"), flare)


@pytest.mark.parametrize("bad", ["overlap", "other_grid", "not_binary"])
def test_per_organ_bad_masks(small_per_organ, tmp_path, capsys, bad):
    root, flare = small_per_organ
    seg = root / "c1" / "segmentations"
    if bad == "overlap":  # a spleen mask reaching into the liver
        mask = flare == LIVER
        mask[:, :, :4] = False
        culprit = save(mask.astype(np.uint8), seg / "spleen.nii.gz")
        expect = "overlaps"
    elif bad == "other_grid":
        culprit = save((flare == LIVER).astype(np.uint8), seg / "liver.nii.gz", np.diag([1.0, 1.0, 2.5, 1.0]))
        expect = "affine"
    else:
        culprit = save(
            np.where(flare == LIVER, 2, flare == LEFT_KIDNEY).astype(np.uint8), seg / "liver.nii.gz"
        )
        expect = "not a binary mask"
    rc, _, err = run(
        ["prepare", "--dataset", str(root), "--layout", "per-organ", "--out", str(tmp_path / "o")], capsys
    )
    assert expect in assert_one_line_error(rc, err, str(culprit))
    assert not (tmp_path / "o").exists()


def test_per_organ_layout_needs_a_ct(small_per_organ, tmp_path, capsys):
    root, _ = small_per_organ
    (root / "c1" / "ct.nii.gz").unlink()
    rc, _, err = run(
        ["prepare", "--dataset", str(root), "--layout", "per-organ", "--out", str(tmp_path / "o")], capsys
    )
    assert "no CT" in assert_one_line_error(rc, err, str(root / "c1"))


# --- 3. patient groups ----------------------------------------------------------------------


def test_groups_keep_each_patient_on_one_side_for_every_seed():
    cases = [f"p{p}_scan{s}" for p in range(6) for s in range(1 + p % 3)]
    groups = {c: c.split("_")[0] for c in cases}
    split_apart_without_groups = False
    for seed in range(20):
        splits = split_cases(cases, val_fraction=0.3, seed=seed, groups=groups)
        sides = {}
        for case, split in splits.items():
            sides.setdefault(groups[case], set()).add(split)
        assert all(len(s) == 1 for s in sides.values()), (seed, splits)
        assert {"train", "val"} == set(splits.values())
        alone = split_cases(cases, val_fraction=0.3, seed=seed)
        split_apart_without_groups |= any(alone["p2_scan0"] != alone[f"p2_scan{s}"] for s in (1, 2))
    assert split_apart_without_groups  # so the groups are what keeps them together


def test_groups_on_two_scans_of_the_real_patient(shared_ct, tmp_path):
    """TS_0001 and its top-30-slice rescan are one patient: one side for every seed, recorded."""
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    scans = {"TS_0001": shared_ct / "images", "TS_0001_top30": shared_ct / "quick"}
    for case, folder in scans.items():
        (images / f"{case}_0000.nii.gz").symlink_to(folder / f"{case}_0000.nii.gz")
        label_dir = shared_ct / ("labels" if folder.name == "images" else "quick")
        (labels / f"{case}.nii.gz").symlink_to(label_dir / f"{case}.nii.gz")
    for i in range(3):  # two more patients, so that a split has a choice
        image, flare = small_case(seed=i)
        save(image, images / f"other{i}_0000.nii.gz")
        save(flare, labels / f"other{i}.nii.gz")
    groups = tmp_path / "groups.csv"
    groups.write_text(
        "case,patient\nTS_0001,s0001\nTS_0001_top30,s0001\n" + "".join(f"other{i},o{i}\n" for i in range(3))
    )
    for seed in range(4):
        out = prepare(
            images=images,
            labels=labels,
            out=tmp_path / f"o{seed}",
            groups=groups,
            seed=seed,
            val_fraction=0.5,
            png=False,
        )
        doc = json.loads((out / "dataset.json").read_text())
        assert doc["cases"]["TS_0001"]["split"] == doc["cases"]["TS_0001_top30"]["split"]
        assert doc["cases"]["TS_0001"]["patient"] == doc["cases"]["TS_0001_top30"]["patient"] == "s0001"
        assert doc["split"]["groups_file"] == str(groups)
        assert doc["summary"]["val_cases"] in (1, 2, 3)
    # without groups each case is its own patient, as before
    out = prepare(images=images, labels=labels, out=tmp_path / "plain", png=False)
    doc = json.loads((out / "dataset.json").read_text())
    assert doc["cases"]["TS_0001_top30"]["patient"] == "TS_0001_top30" and doc["split"]["groups_file"] is None


@pytest.mark.parametrize("bad", ["no_column", "missing_case", "two_patients", "split_file_splits"])
def test_bad_groups(layout, tmp_path, capsys, bad):
    for case in ("a", "b", "c"):
        layout.add(case)
    groups = tmp_path / "groups.csv"
    extra = []
    if bad == "no_column":
        groups.write_text("case,subject\na,1\nb,1\nc,2\n")
    elif bad == "missing_case":
        groups.write_text("case,patient\na,1\nb,1\n")
    elif bad == "two_patients":
        groups.write_text("case,patient\na,1\nb,1\nc,2\na,2\n")
    else:
        groups.write_text("case,patient\na,1\nb,1\nc,2\n")
        split = tmp_path / "split.json"
        split.write_text(json.dumps({"train": ["a", "c"], "val": ["b"]}))
        extra = ["--split-file", str(split)]
    rc, _, err = run(layout.args(tmp_path / "out", "--groups", str(groups), *extra), capsys)
    culprit = str(tmp_path / "split.json") if bad == "split_file_splits" else str(groups)
    assert_one_line_error(rc, err, culprit)
    assert not (tmp_path / "out").exists()


def test_read_groups_ignores_cases_we_do_not_have(tmp_path):
    groups = tmp_path / "g.csv"
    groups.write_text("case,patient,site\na,1,x\nb,1,x\nzzz,9,y\n")
    assert read_groups(groups, ["a", "b"]) == {"a": "1", "b": "1"}
