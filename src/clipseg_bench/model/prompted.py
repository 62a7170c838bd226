"""A model with its organ prompts behind one ``forward``: the module the trainer optimises."""

from __future__ import annotations

import torch
from torch import nn

from clipseg_bench.model.forward import decode, encode_images, encode_prompts


class PromptedModule(nn.Module):
    """A model of any family behind one ``forward`` so Accelerate/DDP see every trainable parameter used.

    Images go through the vision encoder once per step for all their prompts; prompts go through
    the text encoder only when it trains (otherwise their embeddings are passed in, computed once).

    Args:
        model: the model (any family), strategy applied.
        input_ids, attention_mask: (K, L) the tokenized organ prompts.
    """

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("input_ids", input_ids, persistent=False)
        self.register_buffer("attention_mask", attention_mask, persistent=False)

    def forward(self, pixel_values=None, *, activations=None, prompt_emb=None, pairs=None) -> torch.Tensor:
        """Logits (B, K, S, S), or (P, S, S) for ``pairs`` (P, 2) of (image, prompt) indices.

        Args:
            pixel_values: (B, 3, S, S) preprocessed images; or ``activations``, the cached
                vision-encoder outputs the decoder reads (then the image encoder is skipped).
            prompt_emb: precomputed prompt features (frozen text encoder), else computed.
        """
        if prompt_emb is None:
            prompt_emb = encode_prompts(self.model, self.input_ids, self.attention_mask)
        if activations is None:
            activations = encode_images(self.model, pixel_values)
        return decode(self.model, activations, prompt_emb, pairs=pairs)
