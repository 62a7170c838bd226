"""Inference: CT slices in, per-organ probabilities out, one encoder pass per slice for all organs.

Training-time validation, `evaluate` and `segment` all go through :class:`Segmenter`, so the three
can never disagree about preprocessing, prompts or thresholds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from clipseg_bench.data.dataset import resize_slices
from clipseg_bench.model.forward import (
    decode,
    encode_images,
    encode_prompts,
    preprocess,
    stack_features,
    tokenize,
    unstack_features,
)
from clipseg_bench.model.precision import autocast
from clipseg_bench.organs import Organ


class Segmenter:
    """Predicts organ probabilities for batches of uint8 slices.

    Args:
        model: CLIPSegForImageSegmentation (with any strategy applied).
        tokenizer: its tokenizer.
        organs: the K organs to prompt, in output order.
        prompts: their K prompt texts.
        size, mean, std: the model's preprocessing (square side, channel mean/std).
        device: where to run.
        precision: the resolved autocast the model runs under (``no``, ``bf16``, ``fp16``:
            :func:`~clipseg_bench.model.precision.resolve_precision`), as in training.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        organs: list[Organ],
        prompts: list[str],
        size: int,
        mean,
        std,
        device,
        precision: str = "no",
    ):
        self.model, self.organs, self.size, self.mean, self.std = model, organs, size, mean, std
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.precision = precision
        self.tokens = self._tokens(prompts)

    @classmethod
    def of(
        cls, loaded, *, organs: list[Organ], prompts: list[str], device, precision: str = "no"
    ) -> Segmenter:
        """The segmenter of a :class:`~clipseg_bench.model.load.LoadedModel` (its preprocessing)."""
        return cls(
            loaded.model,
            loaded.tokenizer,
            organs=organs,
            prompts=prompts,
            size=loaded.image_size,
            mean=loaded.mean,
            std=loaded.std,
            device=device,
            precision=precision,
        )

    def _tokens(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in tokenize(self.tokenizer, prompts).items()}

    @contextlib.contextmanager
    def _eval_mode(self):
        """Inference mode (no dropout) for the duration; a model being trained goes back to training.

        A model already in eval mode is left alone: switching walks every module (about 10% of
        `evaluate`'s time for the tiny model, which decodes each batch once per prompt set).
        """
        if not any(m.training for m in self.model.modules()):
            yield
            return
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)

    @torch.no_grad()
    def prompt_embeddings(self, prompts: list[str] | None = None) -> torch.Tensor:
        """(K, D) prompt embeddings from the text encoder as it is *now*.

        Never computed once at construction: during training the text encoder may be learning,
        and stale embeddings would validate a model that no longer exists.

        Args:
            prompts: K other texts to embed (e.g. wrong or reworded organ prompts); default: the
                segmenter's own prompts.
        """
        tokens = self.tokens if prompts is None else self._tokens(prompts)
        with self._eval_mode(), autocast(self.device, self.precision):
            return encode_prompts(self.model, tokens["input_ids"], tokens["attention_mask"])

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(b, H, W) uint8 slices -> (b, L, T, D) vision activations, the layout the feature cache stores.

        Encode a batch once with this, then decode it for several prompt sets through
        :meth:`probabilities` (``features=``) without running the vision encoder again. The uint8
        slices go to the device before they are resized and normalised (a quarter of the bytes).
        """
        images = images.to(self.device, non_blocking=True)
        x = preprocess(resize_slices(images, self.size), size=self.size, mean=self.mean, std=self.std)
        with self._eval_mode(), autocast(self.device, self.precision):
            return stack_features(self.model, encode_images(self.model, x))

    @torch.no_grad()
    def probabilities(
        self,
        images: torch.Tensor,
        *,
        features: torch.Tensor | None = None,
        prompt_emb: torch.Tensor | None = None,
        on_device: bool = False,
    ) -> torch.Tensor:
        """(b, H, W) uint8 slices -> (b, K, H, W) float32 probabilities at the slices' own size.

        ``features`` are cached vision activations (b, L, T, D) for these slices, if any;
        ``prompt_emb`` the current :meth:`prompt_embeddings`, to skip recomputing them per batch.
        ``on_device``: leave them on the segmenter's device (threshold and count there; a batch of
        16 slices x 13 organs at 512 px is 218 MB of float32), else on the CPU.
        """
        if prompt_emb is None:
            prompt_emb = self.prompt_embeddings()
        if features is None:
            features = self.encode(images)
        acts = [a.to(self.device, torch.float32) for a in unstack_features(self.model, features)]
        with self._eval_mode(), autocast(self.device, self.precision):
            logits = decode(self.model, acts, prompt_emb)  # (b, K, S, S)
        h, w = images.shape[-2:]
        if logits.shape[-2:] != (h, w):
            logits = F.interpolate(logits.float(), size=(h, w), mode="bilinear", align_corners=False)
        probs = torch.sigmoid(logits.float())
        return probs if on_device else probs.cpu()

    def iter_probabilities(
        self,
        slices: np.ndarray,
        *,
        batch_size: int = 16,
        features: np.ndarray | None = None,
        on_device: bool = False,
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (start index, (b, K, H, W) probabilities) over an (N, H, W) uint8 stack (on the
        segmenter's device with ``on_device``, else on the CPU)."""
        prompt_emb = self.prompt_embeddings()  # once per pass: the model does not change within it
        for start, probs in self.iter_prompt_sets(
            slices,
            prompt_embs={"": prompt_emb},
            batch_size=batch_size,
            features=features,
            on_device=on_device,
        ):
            yield start, probs[""]

    def iter_prompt_sets(
        self,
        slices: np.ndarray,
        *,
        prompt_embs: dict[str, torch.Tensor],
        batch_size: int = 16,
        features: np.ndarray | None = None,
        on_device: bool = False,
    ) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """Yield (start index, {set name: (b, K, H, W) probabilities}) over an (N, H, W) uint8 stack.

        Each batch goes through the vision encoder once (or comes from ``features``, cached
        activations aligned with ``slices``) and is decoded once per prompt set.

        Args:
            prompt_embs: name -> (K, D) embeddings from :meth:`prompt_embeddings`; every set must
                have the segmenter's K prompts, in its organ order.
            on_device: yield the probabilities on the segmenter's device (see :meth:`probabilities`).
        """
        for start in range(0, len(slices), batch_size):
            imgs = torch.from_numpy(np.array(slices[start : start + batch_size]))
            if features is None:
                feats = self.encode(imgs)
            else:
                # on the device in float32 once per batch, not once per prompt set
                feats = torch.from_numpy(np.array(features[start : start + batch_size]))
                feats = feats.to(self.device, torch.float32)
            yield (
                start,
                {
                    name: self.probabilities(imgs, features=feats, prompt_emb=emb, on_device=on_device)
                    for name, emb in prompt_embs.items()
                },
            )


def probabilities_to_labels(
    probs: torch.Tensor, organ_ids: list[int], *, threshold: float = 0.5
) -> torch.Tensor:
    """(b, K, H, W) probabilities -> (b, H, W) uint8 FLARE ids, on the probabilities' device.

    Where organs overlap the most probable one wins; a pixel whose best probability is not above
    ``threshold`` is background (0).
    """
    best, idx = probs.max(dim=1)
    ids = torch.as_tensor(organ_ids, dtype=torch.uint8, device=probs.device)[idx]
    return torch.where(best > threshold, ids, torch.zeros_like(ids))
