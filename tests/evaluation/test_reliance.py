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
    """Two organs, one slice of 4 pixels: liver present (pixels 0-1), spleen absent."""
    check = PromptCheck(_FakeSegmenter(), organs=parse_organs("liver,spleen"), template="name", threshold=0.5)
    assert set(check.embeddings) == {RIGHT, WRONG, "photo", "ct", "synonym"}  # "name" reuses RIGHT
    target = np.zeros((1, 2, 2, 2), bool)
    target[0, 0, 0, :] = True  # liver: the top row
    probs = {name: torch.zeros(1, 2, 2, 2) for name in check.embeddings}
    probs[RIGHT][0, 0, 0, :] = 0.9  # exact liver: Dice 1
    probs[WRONG][0, 0, :, 0] = 0.9  # the left column: overlaps one of two pixels, Dice 2*1/(2+2) = 0.5
    probs["photo"][0, 0] = 0.9  # everything: Dice 2*2/(4+2)
    check.add(probs, target)
    check.add(probs, target)  # a second identical batch changes no mean
    m = check.metrics()
    assert m["dice2d_wrong_prompt"] == pytest.approx(0.5)
    assert m["prompt_reliance"] == pytest.approx(0.5)
    assert m["prompt_variants"]["name"] == pytest.approx(1.0)
    assert m["prompt_variants"]["photo"] == pytest.approx(2 / 3)
    assert m["prompt_variants"]["ct"] == 0.0
    liver, spleen = m["prompt_reliance_per_organ"]["liver"], m["prompt_reliance_per_organ"]["spleen"]
    assert liver["pairs"] == 2 and liver["prompt_reliance"] == pytest.approx(0.5)
    assert spleen["pairs"] == 0 and math.isnan(spleen["dice2d"])  # never present: no score
