"""Prompt reliance: a model that reads its prompt collapses under a wrong organ's name; one that
ignores it does not. Plus the bookkeeping on hand-made masks and the cost (one encoder pass)."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch

from clipseg_bench.config import load_config
from clipseg_bench.data.dataset import PreparedData
from clipseg_bench.evaluation import predict
from clipseg_bench.evaluation.evaluate import evaluate_run
from clipseg_bench.evaluation.reliance import RIGHT, WRONG, PromptCheck, prompt_sets, wrong_organs
from clipseg_bench.model.trained import load_run_model
from clipseg_bench.model.weights import save_weights
from clipseg_bench.organs import ORGANS, PROMPT_SYNONYMS, PROMPT_TEMPLATES, parse_organs
from clipseg_bench.train.loop import train

ORGANS_TRAINED = ["liver", "spleen"]  # big, on opposite sides: a tiny model tells them apart fast


@pytest.fixture(scope="module")
def reading_run(prepared_dir, tmp_path_factory):
    """The tiny model fully fine-tuned on phantoms for liver and spleen (~30 s on 2 loaded cores).

    Measured here: val dice2d 0.53 with the right prompt, 0.003 with the other organ's name.
    """
    run = tmp_path_factory.mktemp("reliance") / "full"
    cfg = load_config(
        None,
        {
            "data": str(prepared_dir),
            "out": str(run),
            "model": "tiny",
            "strategy": "full",
            "organs": ORGANS_TRAINED,
            "image_size": 128,
            "batch_size": 16,
            "lr": 1e-3,
            "max_steps": 300,
            "epochs": 1000,
            "val_every": 0,
            "threads": 1,
        },
    )
    return train(cfg)


def _ignore_the_prompt(run, out):
    """A copy of ``run`` whose decoder no longer reads the text: FiLM's prompt-dependent weights are
    zeroed and their mean effect over the run's prompts folded into the biases, so every prompt gets
    the same (average-organ) conditioning."""
    shutil.copytree(run, out)
    trained = load_run_model(out)
    model = trained.loaded.model
    with torch.no_grad():
        cond = trained.segmenter().prompt_embeddings().mean(0)
        for film in (model.decoder.film_mul, model.decoder.film_add):
            film.bias += film.weight @ cond
            film.weight.zero_()
    save_weights(model, out / "weights.safetensors", config=trained.cfg.model_dump(mode="json"))
    return out


def test_the_trained_tiny_model_reads_its_prompt(reading_run):
    m = evaluate_run(run=reading_run, show_progress=False)
    assert m["dice2d"] > 0.3, m["dice2d"]  # it learned the organs at all
    assert m["prompt_reliance"] > 0.25 and m["prompt_reliance"] > 0.6 * m["dice2d"], m
    assert m["prompt_reliance"] == pytest.approx(m["dice2d"] - m["dice2d_wrong_prompt"])
    assert m["prompt_reliance_norm"] > 0.8, m["prompt_reliance_per_organ"]
    per_organ = m["prompt_reliance_per_organ"]
    assert set(per_organ) == set(ORGANS_TRAINED)
    assert per_organ["liver"]["wrong_prompt"] == "spleen" and per_organ["spleen"]["wrong_prompt"] == "liver"
    # the per-organ scores cover exactly the pairs dice2d averages
    assert sum(o["pairs"] for o in per_organ.values()) == m["dice2d_pairs"]
    weighted = sum(o["dice2d"] * o["pairs"] for o in per_organ.values()) / m["dice2d_pairs"]
    assert weighted == pytest.approx(m["dice2d"])
    assert set(m["prompt_variants"]) == {*PROMPT_TEMPLATES, "synonym"}
    assert m["prompt_variants"]["name"] == pytest.approx(m["dice2d"])  # the run's own wording
    assert m["prompt_variant_texts"]["synonym"] == [PROMPT_SYNONYMS[k] for k in ORGANS_TRAINED]


def test_a_model_that_ignores_the_prompt_has_no_reliance(reading_run, tmp_path):
    m = evaluate_run(run=_ignore_the_prompt(reading_run, tmp_path / "deaf"), show_progress=False)
    assert m["dice2d"] > 0.05, m["dice2d"]  # it still segments something: the test is not vacuous
    assert abs(m["prompt_reliance"]) < 1e-9, m
    assert m["prompt_reliance_norm"] == pytest.approx(0.0, abs=1e-9)
    for organ in m["prompt_reliance_per_organ"].values():
        assert abs(organ["prompt_reliance"]) < 1e-9
    for score in m["prompt_variants"].values():  # no wording can matter either
        assert score == pytest.approx(m["dice2d"], abs=1e-12)


def test_each_slice_is_encoded_once_for_every_prompt_set(reading_run, monkeypatch):
    """The wrong-prompt and wording passes decode the slices' features again; they never re-encode."""
    encoded = []
    real = predict.encode_images

    def counting(model, pixel_values):
        encoded.append(len(pixel_values))
        return real(model, pixel_values)

    monkeypatch.setattr(predict, "encode_images", counting)
    m = evaluate_run(run=reading_run, show_progress=False)  # full fine-tuning: no feature cache
    assert len(m["prompt_variants"]) >= 3  # several prompt sets were decoded...
    prepared = PreparedData(load_run_model(reading_run).cfg.data)
    n_val_slices = sum(prepared.cases_meta[c]["n_slices"] for c in prepared.cases("val"))
    assert sum(encoded) == n_val_slices  # ...from one encoder pass per slice


# --- the bookkeeping on hand-made masks ---------------------------------------------------------


def test_wrong_organs_is_a_fixed_derangement():
    wrong = wrong_organs(list(ORGANS))
    assert [o.name for o in wrong[:3]] == ["right kidney", "spleen", "pancreas"]
    assert wrong[-1].name == "liver"
    assert all(w.id != o.id for w, o in zip(wrong, ORGANS)) and len({w.id for w in wrong}) == len(ORGANS)
    assert wrong_organs(parse_organs("liver")) is None  # one organ: nothing to swap it with
    sets = prompt_sets(parse_organs("liver,spleen"), "ct")
    assert sets[WRONG] == ["a computerized tomography of a spleen", "a computerized tomography of a liver"]
    assert sets["synonym"] == [
        "a computerized tomography of a hepatic parenchyma",
        "a computerized tomography of a splenic parenchyma",
    ]


class _FakeSegmenter:
    def prompt_embeddings(self, prompts=None):
        return torch.zeros(2, 4)


def test_prompt_check_scores_by_hand():
    """Two organs, slices of 2 x 2 pixels. Slice 0: liver present (top row), spleen absent.
    Slice 1: nothing present."""
    check = PromptCheck(_FakeSegmenter(), organs=parse_organs("liver,spleen"), template="name", threshold=0.5)
    # "name" reuses RIGHT; the wrong names are the right prompts reordered: never decoded again
    assert set(check.embeddings) == {RIGHT, "photo", "ct", "synonym"}
    target = np.zeros((2, 2, 2, 2), bool)
    target[0, 0, 0, :] = True  # liver: the top row of slice 0
    probs = {name: torch.zeros(2, 2, 2, 2) for name in check.embeddings}
    probs[RIGHT][0, 0, 0, :] = 0.9  # "liver" on slice 0: exact, Dice 1
    probs[RIGHT][0, 1, :, 0] = 0.9  # "spleen" on slice 0: the left column, half on the liver: Dice 0.5
    probs[RIGHT][1, 0, 1, 1] = 0.9  # "liver" on slice 1 (nothing there): a false-positive slice
    probs["photo"][0, 0] = 0.9  # everything: Dice 2*2/(4+2)
    check.add(probs, target)
    check.add(probs, target)  # a second identical batch changes no mean
    m = check.metrics()
    # confusion: row = name, column = organ present; the spleen column never has its organ
    c = np.array(m["prompt_confusion"]["dice"])
    assert c[:, 0] == pytest.approx([1.0, 0.5]) and np.isnan(c[:, 1]).all()
    assert m["prompt_confusion"]["slices"] == [2, 0]
    # the older numbers, from the same masks: the wrong name for the liver is "spleen"
    assert m["dice2d"] == 1.0 and m["dice2d_wrong_prompt"] == pytest.approx(0.5)
    assert m["prompt_reliance"] == pytest.approx(0.5)
    # follows = 1, ignores = 0.5 (the other name's mask half on the liver): reliance 1 - 0.5/1
    liver, spleen = m["prompt_reliance_per_organ"]["liver"], m["prompt_reliance_per_organ"]["spleen"]
    assert (liver["follows"], liver["ignores"], liver["reliance"]) == pytest.approx((1.0, 0.5, 0.5))
    assert m["prompt_reliance_norm"] == pytest.approx(0.5)  # the spleen has no value: not averaged
    assert liver["pairs"] == 2 and spleen["pairs"] == 0 and math.isnan(spleen["dice2d"])
    # absent pairs: (slice 0, spleen) masked, (slice 1, liver) masked, (slice 1, spleen) empty
    assert (liver["absent_slices"], liver["fp_slice_rate"]) == (2, 1.0)
    assert (spleen["absent_slices"], spleen["fp_slice_rate"]) == (4, 0.5)
    assert m["fp_slice_rate"] == pytest.approx(4 / 6) and m["empty_specificity"] == pytest.approx(2 / 6)
    assert m["prompt_variants"]["name"] == pytest.approx(1.0)
    assert m["prompt_variants"]["photo"] == pytest.approx(2 / 3)
    assert m["prompt_variants"]["ct"] == 0.0


# --- reliance on synthetic "models": probabilities built by hand -------------------------------

K_SYN = 4


def _slices(n: int = 12, size: int = 32, seed: int = 0, presence: float = 0.7) -> np.ndarray:
    """(n, K, size, size) truth: four organs in fixed quadrants, each present on a random share
    ``presence`` of slices, never overlapping (as FLARE labels)."""
    rng = np.random.default_rng(seed)
    target = np.zeros((n, K_SYN, size, size), bool)
    half = size // 2
    for k in range(K_SYN):
        y, x = divmod(k, 2)
        target[:, k, y * half + 2 : y * half + half - 2, x * half + 2 : x * half + half - 2] = True
    target &= (rng.random((n, K_SYN)) < presence)[:, :, None, None]
    return target


def _check_with(masks: np.ndarray, target: np.ndarray) -> dict:
    check = PromptCheck(
        _FakeSegmenter(),
        organs=parse_organs("liver,right kidney,spleen,pancreas"),
        template="name",
        threshold=0.5,
    )
    probs = {name: torch.from_numpy(masks.astype(np.float32)) for name in check.embeddings}
    check.add(probs, target)
    return check.metrics()


def test_a_model_that_ignores_the_text_has_reliance_zero():
    """Every name gets the same mask: the organs present on the slice (a 'segment everything' head)
    or always the first organ's region (a fixed liver head)."""
    target = _slices()
    for shared in (target.any(1), np.broadcast_to(target[:, :1].any(0), target[:, 0].shape)):
        masks = np.repeat(shared[:, None], K_SYN, axis=1)
        m = _check_with(masks, target)
        assert m["prompt_reliance_norm"] == pytest.approx(0.0, abs=1e-12), m["prompt_reliance_norm"]
        assert m["prompt_follows"] == pytest.approx(m["prompt_ignores"])
        assert m["dice2d"] > 0.1  # it does find organs: reliance is not accuracy


@pytest.mark.parametrize("keep", [1.0, 0.1])
def test_a_perfect_follower_has_reliance_one_whatever_its_dice(keep):
    """The mask for organ k covers a part of organ k only (all of it, or the first tenth of its
    rows): Dice 1 or 0.15, reliance 1 either way. The pair-weighted prompt_reliance restates dice2d."""
    target = _slices()
    masks = np.zeros_like(target)
    for k in range(K_SYN):
        rows = np.flatnonzero(target[:, k].any((0, 2)))
        kept = rows[: max(1, round(len(rows) * keep))]
        masks[:, k, kept] = target[:, k, kept]
    share = len(kept) / len(rows)  # every organ is a 12 x 12 square: 1 or 1/12 of it
    m = _check_with(masks, target)
    assert m["prompt_reliance_norm"] == pytest.approx(1.0)
    assert m["prompt_ignores"] == 0.0
    assert m["prompt_follows"] == pytest.approx(2 * share / (1 + share))
    assert m["prompt_reliance"] == pytest.approx(m["dice2d"])  # the old number cannot tell


def test_a_half_follower_is_in_between():
    """The mask for k is organ k plus organ k+1 (equal squares, always present): each organ j gets
    Dice 2/3 from its own name, 2/3 from organ j-1's name and 0 from the two others, so
    ignores = (2/3) / 3 and reliance = 1 - 1/3."""
    target = _slices(presence=1.0)
    m = _check_with(target | np.roll(target, -1, axis=1), target)
    for organ in m["prompt_reliance_per_organ"].values():
        assert (organ["follows"], organ["ignores"]) == pytest.approx((2 / 3, 2 / 9))
    assert m["prompt_reliance_norm"] == pytest.approx(2 / 3)
