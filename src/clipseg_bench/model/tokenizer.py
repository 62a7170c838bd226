"""The tokenizer of the `tiny` model: a real ``CLIPTokenizer`` over a small vocabulary we build here.

The tiny model must work with no network at all, so it cannot borrow CLIP's 49k-token vocabulary.
We hand ``CLIPTokenizer`` (byte-level BPE, exactly CLIP's normalisation and pre-tokenisation) a
vocabulary of the 256 byte symbols, each also with CLIP's end-of-word mark ``</w>``, plus BPE
merges learned on a short word list, so every organ name and prompt-template word is a single token
and any other text still tokenizes without an unknown token.

The merges are learned by a few lines of our own, not by ``tokenizers.trainers.BpeTrainer``: the
tiny model's token embedding is indexed by these ids, so the vocabulary must be identical in every
process and on every machine, and the library does not promise a deterministic tie order.
"""

from __future__ import annotations

from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from clipseg_bench.organs import ORGANS, PROMPT_TEMPLATES

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
EOW = "</w>"  # CLIP's end-of-word suffix
MAX_LENGTH = 77  # CLIP's context length; the tiny text config keeps it

# Words that get a token of their own besides the organ names and the template words.
COMMON_WORDS = (
    "a an the of and or in on at with without to from for is this that no not image picture scan slice "
    "axial coronal sagittal ct mri computed computerized tomography abdomen abdominal organ organs tissue "
    "background body segment segmentation mask left right upper lower small large kidney kidneys gland "
    "vein artery vessel bone spine vertebra rib lung heart bowel colon intestine bladder muscle fat tumor "
    "lesion cyst photo"
).split()


def tiny_words() -> list[str]:
    """The words that become single tokens, in a fixed order (organ names, templates, common words)."""
    text = " ".join([o.name for o in ORGANS] + list(PROMPT_TEMPLATES.values()) + list(COMMON_WORDS))
    words = text.replace("{organ}", " ").lower().split()
    return list(dict.fromkeys(words))  # unique, first-seen order


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Byte-pair merges learned on ``words`` until each word is a single symbol.

    Plain BPE training (Sennrich et al. 2016): repeatedly merge the most frequent adjacent pair,
    ties broken by the pair itself so the result never depends on hash order. Encoding a training
    word replays exactly these merges, so each word of ``words`` becomes one token.
    """
    spelled = [tuple(w[:-1]) + (w[-1] + EOW,) for w in words]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for sym in spelled:
            for pair in zip(sym, sym[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        spelled = [_merge(sym, best) for sym in spelled]


def _merge(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if symbols[i : i + 2] == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def tiny_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and BPE merges of the tiny tokenizer.

    Returns:
        (vocab, merges): ``vocab`` maps token -> id: the 256 byte symbols, the same with ``</w>``, the
        merged pieces in merge order, then BOS and EOS last, as in CLIP. ``merges`` come from
        :func:`learn_merges` over :func:`tiny_words`.
    """
    symbols = list(bytes_to_unicode().values())
    merges = learn_merges(tiny_words())
    tokens = symbols + [s + EOW for s in symbols] + [a + b for a, b in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}, merges


def build_tiny_tokenizer(max_length: int = MAX_LENGTH) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` over :func:`tiny_vocab`; EOS doubles as padding, as in CLIP.

    The unknown token is never produced (every byte has a symbol), so EOS appears only at the end
    of a prompt and the text model's EOS pooling finds the right position.

    Args:
        max_length: longest token sequence (prompts are truncated to it): CLIP's 77, or the text
            model's own number of positions (SAM 3's is 32).
    """
    vocab, merges = tiny_vocab()
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=EOS,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        model_max_length=max_length,
    )
