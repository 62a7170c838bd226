"""Prompt reliance: does a tuned model still read its text prompt?

A text-prompted model that segments the liver equally well when prompted "right kidney" no longer
uses the text: it has become a set of fixed heads. FLARE labels never overlap, so "Dice under a
wrong name" alone cannot tell that apart from accuracy: a model that follows its prompt scores
about 0 under a wrong name whether it is good or bad. `evaluate` therefore measures where the mask
for each name lands.

**The prompt-confusion matrix** ``C`` (K x K, per run): row k is the organ *named* in the prompt,
column j the organ whose truth the mask is compared with; ``C[k, j]`` is the mean 2D Dice of the
mask for "organ k" against organ j's truth, over the val slices where organ j is present. Every
slice is decoded once for the K organ prompts, and those K masks *are* the rows: the mask for
prompt k on a slice is the same whichever organ is present there. From it, per organ j:

- ``follows[j] = C[j, j]``: the mask for j's name lands on j (the per-organ ``dice2d``);
- ``ignores[j] = mean over k != j of C[k, j]``: masks for *other* organs' names land on j;
- ``reliance[j] = clip(1 - ignores[j] / follows[j], 0, 1)``; NaN where ``follows[j]`` is 0 or
  undefined (no name finds organ j, so nothing says whether the text steers it).

A model that ignores the text gives every name the same mask, so each column of ``C`` is constant,
``ignores == follows`` and reliance is 0. A perfect follower's mask for k never touches another
organ, so ``ignores`` is 0 and reliance is 1, however poor its Dice. Between, reliance is the share
of the right name's overlap with organ j that other names do not also get. Averaging over the
K - 1 other names dilutes a confusion confined to one pair (in the demo "spleen" lands on the left
kidney as much as on the spleen, yet the spleen's reliance stays near 0.9): the matrix itself shows
such a pair (the report plots it). ``prompt_follows``,
``prompt_ignores`` and ``prompt_reliance_norm`` are the plain means over the organs with a value
(each organ counts once, whatever its number of slices).

The older numbers stay, computed from the same matrix: ``dice2d_wrong_prompt`` is the Dice of each
organ's truth against the mask for another organ's name (:func:`wrong_organs`, a fixed
derangement), pooled over (slice, organ) pairs as ``dice2d`` is, and ``prompt_reliance`` is
``dice2d`` minus that. Both are weighted by pairs (large, long organs dominate) and, as FLARE labels
never overlap, ``prompt_reliance`` is close to ``dice2d`` for any model that follows its prompt: it
restates accuracy. Read ``prompt_reliance_norm`` for reliance.

Reworded prompts (``prompt_variants``): each template of :data:`~clipseg_bench.organs.PROMPT_TEMPLATES`
and each organ's synonym (:data:`~clipseg_bench.organs.PROMPT_SYNONYMS`) in the run's own template;
how far they fall below ``dice2d`` shows how brittle a model is to wording. These are the only
extra decodes: every slice is encoded once and decoded once per distinct prompt set
(:meth:`~clipseg_bench.evaluation.predict.Segmenter.iter_prompt_sets`); a variant whose texts are the
run's own prompts reuses the right-prompt masks.

The same pass counts false-positive slices (:func:`~clipseg_bench.evaluation.metrics.false_positive_slices`),
which ``dice2d`` cannot see.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from clipseg_bench.evaluation.metrics import cross_dice, false_positive_slices, present_pairs_dice
from clipseg_bench.organs import PROMPT_TEMPLATES, Organ, prompts, synonym_prompts

RIGHT = "right"  # the run's own prompts
WRONG = "wrong"  # every organ prompted with another organ's name
SYNONYM = "synonym"


def wrong_organs(organs: list[Organ]) -> list[Organ] | None:
    """The organ whose name prompts each of ``organs`` in the wrong-prompt score.

    The fixed derangement: each organ takes the name of the next one in the run's organ list (FLARE22
    label order), the last the first's. For the 13 FLARE22 organs, as every benchmark run has them:
    liver -> "right kidney", right kidney -> "spleen", ..., left kidney -> "liver".

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
        no "wrong" entry for a single organ. The wrong set is the right set reordered, so it is never
        decoded: its masks are rows of the confusion matrix.
    """
    wrong = wrong_organs(organs)
    sets = {WRONG: prompts(template, wrong)} if wrong else {}
    sets.update({name: prompts(name, organs) for name in PROMPT_TEMPLATES})
    sets[SYNONYM] = synonym_prompts(template, organs)
    return sets


def prompt_following(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """Per organ: follows, ignores and the normalised reliance, from a prompt-confusion matrix.

    Args:
        confusion: (K, K) ``C[k, j]``, mean Dice of the mask for organ k's name against organ j's
            truth (NaN in a column whose organ was never present); see the module docstring.

    Returns:
        ``{"follows", "ignores", "reliance"}``, each (K,) float64; NaN where undefined.
    """
    c = np.asarray(confusion, dtype=np.float64)
    k = len(c)
    follows = np.diag(c).copy()
    off = ~np.eye(k, dtype=bool)
    ignores = np.array([c[off[:, j], j].mean() if k > 1 else math.nan for j in range(k)])
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(follows > 0, 1.0 - ignores / follows, math.nan)
    return {"follows": follows, "ignores": ignores, "reliance": np.clip(ratio, 0.0, 1.0)}


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(x[np.isfinite(x)].mean()) if np.isfinite(x).any() else math.nan


class PromptCheck:
    """Builds the prompt-confusion matrix, the false-positive slice counts and the wording variants.

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
        variants = {n: t for n, t in self.texts.items() if n != WRONG}  # WRONG: read off the matrix
        # Sets with the same texts give the same masks: decode each distinct set once.
        first: dict[tuple[str, ...], str] = {}
        self.alias = {name: first.setdefault(tuple(t), name) for name, t in variants.items()}
        self.embeddings: dict[str, torch.Tensor] = {
            name: segmenter.prompt_embeddings(None if name == RIGHT else self.texts[name])
            for name in dict.fromkeys(self.alias.values())
        }
        k = len(organs)
        self._sums = {name: np.zeros(k) for name in self.embeddings if name != RIGHT}
        self._confusion = np.zeros((k, k))  # sum of Dice(mask for k, truth j) over slices with j
        self._pairs = np.zeros(k, dtype=np.int64)  # slices where organ j is present
        self._absent = np.zeros(k, dtype=np.int64)
        self._false_positive = np.zeros(k, dtype=np.int64)

    def add(self, probabilities: dict[str, torch.Tensor], target) -> None:
        """Add one batch.

        Args:
            probabilities: set name -> (b, K, H, W) probabilities, for every name of :attr:`embeddings`
                (on any device: they are thresholded and counted there).
            target: (b, K, H, W) bool ground truth of the K organs (numpy, or a tensor on that device).
        """
        present = target.any((2, 3))  # (b, K)
        present = present.cpu().numpy() if isinstance(present, torch.Tensor) else present
        k = len(self.organs)
        right = probabilities[RIGHT] > self.threshold  # on the probabilities' device
        self._confusion += np.einsum("bkj,bj->kj", cross_dice(right, target), present)
        self._pairs += present.sum(0)
        absent, false_positive = false_positive_slices(right, target)
        self._absent += absent
        self._false_positive += false_positive
        organ_of_pair = np.nonzero(present)[1]  # present_pairs_dice keeps the present pairs in this order
        pairs_shape = (-1, *target.shape[2:])
        for name in self._sums:
            binary = (probabilities[name] > self.threshold).reshape(pairs_shape)
            dice = present_pairs_dice(binary, target.reshape(pairs_shape))
            self._sums[name] += np.bincount(organ_of_pair, weights=dice, minlength=k)

    def confusion(self) -> np.ndarray:
        """(K, K) prompt-confusion matrix ``C[k, j]`` (NaN columns for organs never present)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self._pairs > 0, self._confusion / np.maximum(self._pairs, 1), math.nan)

    def _pooled(self, sums: np.ndarray, organ: int | None = None) -> float:
        total, n = (sums.sum(), self._pairs.sum()) if organ is None else (sums[organ], self._pairs[organ])
        return float(total / n) if n else math.nan

    def _wrong_sums(self) -> np.ndarray | None:
        """Per organ j: summed Dice of the mask for its wrong name (:func:`wrong_organs`) on j."""
        wrong = wrong_organs(self.organs)
        if wrong is None:
            return None
        row = {o.id: i for i, o in enumerate(self.organs)}
        return np.array([self._confusion[row[w.id], j] for j, w in enumerate(wrong)])

    def metrics(self) -> dict:
        """The metrics.json entries.

        Returns:
            ``dice2d``: the right prompts' mean Dice over the (slice, organ) pairs where the organ is
            present, and ``dice2d_pairs`` their number; ``fp_slice_rate``: of the (slice, organ)
            pairs where the organ is absent, the share with a non-empty mask, and
            ``empty_specificity`` = 1 minus it; ``prompt_confusion``: ``{"organs": [keys],
            "dice": K x K, "slices": [K]}``; ``prompt_follows``, ``prompt_ignores``,
            ``prompt_reliance_norm``: organ means (module docstring); ``prompt_reliance``,
            ``dice2d_wrong_prompt`` (pair-weighted, the older numbers); ``prompt_reliance_per_organ``:
            organ key -> ``{dice2d, dice2d_wrong_prompt, prompt_reliance, follows, ignores,
            reliance, pairs, wrong_prompt, fp_slice_rate, absent_slices}``; ``prompt_variants``:
            variant -> dice2d; ``prompt_variant_texts``: variant -> its K prompts. NaN where a
            number has no slices.
        """
        diag = np.diag(self._confusion).copy()
        wrong = self._wrong_sums()
        confusion = self.confusion()
        following = prompt_following(confusion)
        per_organ = {}
        for i, o in enumerate(self.organs):
            right = self._pooled(diag, i)
            wrong_i = math.nan if wrong is None else self._pooled(wrong, i)
            per_organ[o.key] = {
                "dice2d": right,
                "dice2d_wrong_prompt": wrong_i,
                "prompt_reliance": right - wrong_i,
                **{k: float(v[i]) for k, v in following.items()},
                "pairs": int(self._pairs[i]),
                "wrong_prompt": self.texts[WRONG][i] if WRONG in self.texts else None,
                "fp_slice_rate": float(self._false_positive[i] / self._absent[i])
                if self._absent[i]
                else math.nan,
                "absent_slices": int(self._absent[i]),
            }
        dice2d = self._pooled(diag)
        wrong_all = math.nan if wrong is None else self._pooled(wrong)
        absent = int(self._absent.sum())
        fp_rate = float(self._false_positive.sum() / absent) if absent else math.nan
        variants = [n for n in self.texts if n not in (RIGHT, WRONG)]
        return {
            "dice2d": dice2d,
            "dice2d_pairs": int(self._pairs.sum()),
            "fp_slice_rate": fp_rate,
            "empty_specificity": 1.0 - fp_rate,
            "prompt_confusion": {
                "organs": [o.key for o in self.organs],
                "dice": confusion.tolist(),
                "slices": self._pairs.tolist(),
            },
            "prompt_follows": _nanmean(following["follows"]),
            "prompt_ignores": _nanmean(following["ignores"]),
            "prompt_reliance_norm": _nanmean(following["reliance"]),
            "prompt_reliance": dice2d - wrong_all,
            "dice2d_wrong_prompt": wrong_all,
            "prompt_reliance_per_organ": per_organ,
            "prompt_variants": {n: self._variant(n) for n in variants},
            "prompt_variant_texts": {n: self.texts[n] for n in variants},
        }

    def _variant(self, name: str) -> float:
        source = self.alias[name]
        return self._pooled(np.diag(self._confusion) if source == RIGHT else self._sums[source])
