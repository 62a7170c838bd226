"""Folds and the held-out test split (issue 22): how `prepare` assigns cases, what dataset.json
records, and how PreparedData serves a fold, the old train/val split and (only when asked) the test
cases."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from clipseg_bench.cli import main
from clipseg_bench.data.dataset import PreparedData
from clipseg_bench.data.prepare import prepare
from clipseg_bench.data.splits import assign_cases, draw_folds, split_cases
from clipseg_bench.errors import FieldError, InputError

CASES = [f"c{i:02d}" for i in range(23)]
# 9 patients with 1 to 4 scans each (23 cases).
PATIENT_OF = {c: f"p{i % 9}" for i, c in enumerate(CASES)}


def test_every_case_is_in_exactly_one_fold_and_folds_are_balanced():
    for k in (2, 3, 5):
        for seed in range(10):
            fold = draw_folds(CASES, k, seed=seed)
            assert sorted(fold) == CASES  # every case, once
            sizes = Counter(fold.values())
            assert set(sizes) == set(range(k))
            assert max(sizes.values()) - min(sizes.values()) <= 1


def test_a_patients_cases_share_a_fold_and_the_test_side():
    largest = max(Counter(PATIENT_OF.values()).values())
    for seed in range(10):
        a = assign_cases(CASES, folds=3, test_fraction=0.2, seed=seed, groups=PATIENT_OF)
        sides = {}
        for case in CASES:
            sides.setdefault(PATIENT_OF[case], set()).add((a.split[case], a.fold[case]))
        assert all(len(s) == 1 for s in sides.values()), seed
        sizes = a.fold_sizes()
        assert sum(sizes) + sum(s == "test" for s in a.split.values()) == len(CASES)
        assert max(sizes) - min(sizes) <= largest  # balanced in cases, up to one patient


def test_the_same_seed_gives_the_same_folds_and_test_cases():
    first = assign_cases(CASES, folds=4, test_fraction=0.25, seed=7, groups=PATIENT_OF)
    again = assign_cases(list(reversed(CASES)), folds=4, test_fraction=0.25, seed=7, groups=PATIENT_OF)
    assert (first.split, first.fold) == (again.split, again.fold)
    others = [assign_cases(CASES, folds=4, seed=s).fold for s in range(5)]
    assert len({tuple(sorted(o.items())) for o in others}) > 1  # the seed matters to the folds too
    # the test draw has a stream of its own: the folds (or no folds) never move it
    test = {c for c, s in first.split.items() if s == "test"}
    for folds in (None, 2, 3):
        a = assign_cases(CASES, folds=folds, test_fraction=0.25, seed=7, groups=PATIENT_OF)
        assert {c for c, s in a.split.items() if s == "test"} == test


def test_no_test_case_gets_a_fold_or_a_train_val_side():
    a = assign_cases(CASES, folds=3, test_fraction=0.3, seed=1)
    test = [c for c in CASES if a.split[c] == "test"]
    assert len(test) == 7  # round(0.3 * 23)
    assert all(a.fold[c] is None for c in test)
    assert all(isinstance(a.fold[c], int) for c in CASES if c not in test)
    # with folds, fold 0 is the folder's val split for code that knows no folds
    assert all((a.split[c] == "val") == (a.fold[c] == 0) for c in CASES if c not in test)


def test_without_test_and_folds_the_split_is_drawn_as_before():
    for seed in range(5):
        assert assign_cases(CASES, val_fraction=0.3, seed=seed).split == split_cases(
            CASES, val_fraction=0.3, seed=seed
        )
        # the pre-issue-22 draw, written out: one permutation of the patients from the seed
        order = np.random.default_rng(seed).permutation(len(CASES))
        val = {sorted(CASES)[i] for i in order[: round(0.3 * len(CASES))]}
        assert {c for c, s in split_cases(CASES, val_fraction=0.3, seed=seed).items() if s == "val"} == val


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"folds": 1}, "folds"),
        ({"folds": 30}, "folds"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"folds": 5, "test_fraction": 0.9}, "test_fraction"),
    ],
)
def test_impossible_folds_and_fractions_name_their_field(kwargs, field):
    with pytest.raises(FieldError) as err:
        assign_cases(CASES, **kwargs)
    assert err.value.field == field


def _split_file(tmp_path, doc) -> str:
    path = tmp_path / "split.json"
    path.write_text(json.dumps(doc))
    return str(path)


def test_split_files_give_folds_or_train_val_with_test(tmp_path):
    cases = ["a", "b", "c", "d", "e"]
    folds = assign_cases(
        cases, split_file=_split_file(tmp_path, {"folds": [["a", "b"], ["c"]], "test": ["d", "e"]})
    )
    assert folds.n_folds == 2 and folds.fold == {"a": 0, "b": 0, "c": 1, "d": None, "e": None}
    assert folds.split == {"a": "val", "b": "val", "c": "train", "d": "test", "e": "test"}
    tv = assign_cases(
        cases, split_file=_split_file(tmp_path, {"train": ["a", "b"], "val": ["c"], "test": ["d", "e"]})
    )
    assert tv.n_folds is None and tv.split == {
        "a": "train",
        "b": "train",
        "c": "val",
        "d": "test",
        "e": "test",
    }


@pytest.mark.parametrize(
    ("doc", "words"),
    [
        ({"train": ["a", "b", "zz"], "val": ["c"]}, "'zz'"),  # a case the input lacks
        ({"folds": [["a"], ["b"]], "test": ["a", "c"]}, "'a' is listed twice"),
        ({"folds": [["a", "b", "c"], []]}, "fold 1 is empty"),
        ({"train": ["a"], "val": ["b"], "folds": [["c"]]}, "both folds and a train/val"),
        ({"train": ["a"], "vall": ["b", "c"]}, "'vall'"),
        ({"folds": [["a"], ["b"]], "test": ["c2"], "train": []}, "both folds"),
        ({"train": ["a"], "val": ["b"]}, "missing"),
    ],
)
def test_bad_split_files_name_the_file_and_the_problem(tmp_path, doc, words):
    path = _split_file(tmp_path, doc)
    with pytest.raises(InputError) as err:
        assign_cases(["a", "b", "c"], split_file=path)
    assert str(err.value.path) == path and words in err.value.problem


def test_a_split_file_may_not_split_a_patient_over_folds(tmp_path):
    path = _split_file(tmp_path, {"folds": [["a"], ["b", "c"]]})
    with pytest.raises(InputError, match="patient 'p' is on both sides"):
        assign_cases(["a", "b", "c"], split_file=path, groups={"a": "p", "b": "p", "c": "q"})


def test_an_unknown_case_in_a_split_file_is_one_line_naming_file_and_case(layout, tmp_path, capsys):
    layout.add("a").add("b", seed=1)
    split = _split_file(tmp_path, {"train": ["a"], "val": ["b", "ghost"]})
    out = tmp_path / "out"
    rc = main(layout.args(out, "--split-file", split))
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert split in err and "'ghost'" in err
    assert not out.exists()


# --- a prepared folder with folds and a test split ---------------------------------------------


@pytest.fixture(scope="module")
def folds_dir(phantom_dir, tmp_path_factory):
    """The 4 session phantoms: 1 test case, the other 3 in 2 folds."""
    out = tmp_path_factory.mktemp("folds") / "p"
    prepare(
        images=phantom_dir / "images",
        labels=phantom_dir / "labels",
        out=out,
        folds=2,
        test_fraction=0.25,
        seed=0,
        png=False,
    )
    return out


def test_dataset_json_records_folds_test_and_how(folds_dir):
    doc = json.loads((folds_dir / "dataset.json").read_text())
    assert doc["split"]["folds"] == 2 and doc["split"]["test_fraction"] == 0.25
    assert doc["split"]["method"] == "seeded draw" and doc["split"]["unit"] == "case"
    entries = doc["cases"].values()
    assert Counter(e["split"] for e in entries) == {"test": 1, "val": 2, "train": 1}  # fold 0 = val
    assert sorted(e["fold"] for e in entries if e["split"] != "test") == [0, 0, 1]
    assert doc["summary"]["fold_cases"] == [2, 1] and doc["summary"]["test_cases"] == 1
    manifest = pd.read_csv(folds_dir / "manifest.csv", dtype={"case": str})
    assert manifest.groupby("case")["split"].first().to_dict() == {
        c: e["split"] for c, e in doc["cases"].items()
    }


def test_a_fold_trains_on_the_other_folds_and_never_on_a_test_case(folds_dir):
    data = PreparedData(folds_dir)
    assert data.n_folds == 2
    test = data.cases("test")
    everyone = set(data.cases_meta)
    seen_in_val = []
    for fold in (0, 1):
        train, val = data.cases("train", fold), data.cases("val", fold)
        assert not set(train) & set(val) and set(train) | set(val) == everyone - set(test)
        assert set(data.slices("train", fold=fold)["case"]) == set(train)
        seen_in_val += val
    assert sorted(seen_in_val) == sorted(everyone - set(test))  # each non-test case validated once
    assert data.cases("val") == data.cases("val", 0)  # no fold: the recorded split, fold 0 as val
    with pytest.raises(FieldError, match="folds 0..1, not 2"):
        data.check_fold(2)


def test_test_arrays_are_never_opened_unless_asked(folds_dir, tmp_path):
    copy = tmp_path / "p"
    shutil.copytree(folds_dir, copy)
    (test_case,) = PreparedData(copy).cases("test")
    for kind in ("image", "label", "hu"):  # unreadable: root reads a chmod-000 file, so take them away
        (copy / "cache" / f"{test_case}_{kind}.npy").unlink()
    data = PreparedData(copy)  # checks every other array, not the test case's
    assert test_case not in set(data.manifest["case"])
    with pytest.raises(InputError, match="held-out test split"):
        data.array(test_case, "image")
    with pytest.raises(InputError, match="held out"):
        data.slices("test")
    with pytest.raises(InputError, match="missing from the prepared array cache"):
        PreparedData(copy, test=True)


def test_a_folder_prepared_before_folds_reads_as_one_split(prepared_dir):
    data = PreparedData(prepared_dir)
    assert data.n_folds is None and data.held_out == set()
    manifest = pd.read_csv(prepared_dir / "manifest.csv", dtype={"case": str})
    for split in ("train", "val"):
        old = manifest[manifest["split"] == split]  # how slices() read it before folds existed
        old = old[old["kept"].astype(bool)].sort_values(["case", "z"]).reset_index(drop=True)
        pd.testing.assert_frame_equal(data.slices(split), old)
        assert data.cases(split) == sorted(set(old["case"]))
    with pytest.raises(FieldError, match="without folds"):
        data.cases("val", 0)
