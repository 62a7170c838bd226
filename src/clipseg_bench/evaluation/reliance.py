"""Prompt reliance: does a tuned model still read its text prompt?

A text-prompted model that segments the liver equally well when prompted "right kidney" no longer
uses the text: it has become a set of fixed heads. `evaluate` therefore scores the val split three
ways, over the same (slice, organ) pairs and with the same 2D Dice as ``dice2d``
(:func:`~clipseg_bench.evaluation.metrics.present_pairs_dice`: pairs whose organ is present):

- with the right prompt (the run's own prompts): ``dice2d``;
- with a wrong prompt: each organ's ground truth against the mask predicted for another organ's
  name (:func:`wrong_organs`, a fixed derangement, the same in every run). ``prompt_reliance`` is
  ``dice2d`` minus that score: about 0 for a model that ignores the prompt, up to ``dice2d`` for
  one whose masks collapse under the wrong name;
- with reworded prompts (``prompt_variants``): each template of
  :data:`~clipseg_bench.organs.PROMPT_TEMPLATES`, and each organ's synonym
  (:data:`~clipseg_bench.organs.PROMPT_SYNONYMS`) in the run's own template. How far these fall
  below ``dice2d`` shows how brittle a model is to wording.

Every slice is encoded once and decoded once per distinct prompt set
(:meth:`~clipseg_bench.evaluation.predict.Segmenter.iter_prompt_sets`); a variant whose texts are
the run's own prompts reuses the right-prompt masks.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from clipseg_bench.evaluation.metrics import present_pairs_dice
from clipseg_bench.organs import PROMPT_TEMPLATES, Organ, prompts, synonym_prompts

RIGHT = "right"  # the run's own prompts
WRONG = "wrong"  # every organ prompted with another organ's name
SYNONYM = "synonym"


def wrong_organs(organs: list[Organ]) -> list[Organ] | None:
    """The organ whose name prompts each of ``organs`` in the wrong-prompt test.

    The fixed derangement: each organ takes the name of the next one in the run's organ list (FLARE22
    label order), the last the first's. For the 13 FLARE22 organs, as every benchmark run has them:
    liver -> "right kidney", right kidney -> "spleen", ..., left kidney -> "liver". A cyclic shift by one
    moves every organ and keeps the wrong names among the names the run was trained on, so the test
    asks "does it segment the organ it was asked for?" and not "what does an unseen word do?".

    Returns:
        One organ per input organ, never itself; None for a single organ (no derangement exists).
    """
    if len(organs) < 2:
        return None
    return [*organs[1:], organs[0]]


def prompt_sets(organs: list[Organ], template: str) -> dict[str, list[str]]:
    """The K prompt texts of the wrong-prompt set and of every wording variant.

    Args:
        organs: the run's K organs, in its output order.
        template: the run's prompt template (a name of PROMPT_TEMPLATES or a text with ``{organ}``).

    Returns:
        ``{"wrong": [...], "<template name>": [...] for each PROMPT_TEMPLATES entry, "synonym": [...]}``;
        no "wrong" entry for a single organ.
    """
    wrong = wrong_organs(organs)
    sets = {WRONG: prompts(template, wrong)} if wrong else {}
    sets.update({name: prompts(name, organs) for name in PROMPT_TEMPLATES})
    sets[SYNONYM] = synonym_prompts(template, organs)
    return sets


class PromptCheck:
    """Scores the right prompts, a wrong prompt and the wording variants over the same pairs.

    Use: pass :attr:`embeddings` to ``Segmenter.iter_prompt_sets``, feed every batch to
    :meth:`add`, then read :meth:`metrics`.

    Args:
        segmenter: the run's :class:`~clipseg_bench.evaluation.predict.Segmenter`.
        organs: its K organs, in output order.
        template: the run's prompt template.
        threshold: probability above which a pixel is foreground (the run's).
    """

    def __init__(self, segmenter, *, organs: list[Organ], template: str, threshold: float):
        self.organs, self.threshold = organs, threshold
        self.texts = {RIGHT: prompts(template, organs), **prompt_sets(organs, template)}
        # Sets with the same texts give the same masks: decode each distinct set once.
        first: dict[tuple[str, ...], str] = {}
        self.alias = {name: first.setdefault(tuple(t), name) for name, t in self.texts.items()}
        self.embeddings: dict[str, torch.Tensor] = {
            name: segmenter.prompt_embeddings(None if name == RIGHT else self.texts[name])
            for name in dict.fromkeys(self.alias.values())
        }
        k = len(organs)
        self._sums = {name: np.zeros(k) for name in self.embeddings}
        self._pairs = np.zeros(k, dtype=np.int64)

    def add(self, probabilities: dict[str, torch.Tensor], target: np.ndarray) -> None:
        """Add one batch.

        Args:
            probabilities: set name -> (b, K, H, W) probabilities, for every name of :attr:`embeddings`.
            target: (b, K, H, W) bool ground truth of the K organs.
        """
        present = target.any((2, 3))  # (b, K)
        organ_of_pair = np.nonzero(present)[1]  # present_pairs_dice keeps the present pairs in this order
        k = len(self.organs)
        self._pairs += np.bincount(organ_of_pair, minlength=k)
        pairs_shape = (-1, *target.shape[2:])
        for name, probs in probabilities.items():
            binary = (probs > self.threshold).numpy().reshape(pairs_shape)
            dice = present_pairs_dice(binary, target.reshape(pairs_shape))
            self._sums[name] += np.bincount(organ_of_pair, weights=dice, minlength=k)

    def _mean(self, name: str, organ: int | None = None) -> float:
        if name not in self.alias:  # no wrong prompt for a single organ
            return math.nan
        sums, pairs = self._sums[self.alias[name]], self._pairs
        total, n = (sums.sum(), pairs.sum()) if organ is None else (sums[organ], pairs[organ])
        return float(total / n) if n else math.nan

    def metrics(self) -> dict:
        """The metrics.json entries.

        Returns:
            ``dice2d``: the right prompts' mean Dice over the (slice, organ) pairs where the organ is
            present, and ``dice2d_pairs`` their number; ``prompt_reliance``: dice2d with the right
            prompt minus with the wrong one (all present pairs); ``dice2d_wrong_prompt``; ``prompt_reliance_per_organ``: organ key ->
            ``{dice2d, dice2d_wrong_prompt, prompt_reliance, pairs, wrong_prompt}`` (NaN scores for
            an organ never present); ``prompt_variants``: variant -> dice2d;
            ``prompt_variant_texts``: variant -> its K prompts. Empty splits give NaN.
        """
        per_organ = {}
        for i, o in enumerate(self.organs):
            right, wrong = self._mean(RIGHT, i), self._mean(WRONG, i)
            per_organ[o.key] = {
                "dice2d": right,
                "dice2d_wrong_prompt": wrong,
                "prompt_reliance": right - wrong,
                "pairs": int(self._pairs[i]),
                "wrong_prompt": self.texts[WRONG][i] if WRONG in self.texts else None,
            }
        variants = [n for n in self.texts if n not in (RIGHT, WRONG)]
        return {
            "dice2d": self._mean(RIGHT),
            "dice2d_pairs": int(self._pairs.sum()),
            "prompt_reliance": self._mean(RIGHT) - self._mean(WRONG),
            "dice2d_wrong_prompt": self._mean(WRONG),
            "prompt_reliance_per_organ": per_organ,
            "prompt_variants": {n: self._mean(n) for n in variants},
            "prompt_variant_texts": {n: self.texts[n] for n in variants},
        }
