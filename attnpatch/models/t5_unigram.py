"""A T5-convention tokenizer built offline: SentencePiece's Unigram model, ``▁`` word starts.

SD3's third text encoder and Flux's second are Google's T5 (v1.1 XXL), whose tokenizer is a
SentencePiece Unigram model: the input is split on whitespace, each word gets a leading ``▁``
(U+2581), and each word is cut into the pieces of highest total log-probability. Its 32100-piece
vocabulary cannot be downloaded here, so :func:`tiny_t5_tokenizer` estimates a small one from
the shapes world's captions (:func:`attnpatch.data.shape_captions`) and the tiny CLIP
tokenizer's words (:data:`attnpatch.testing.VOCAB_WORDS`):

* every word of that corpus is one piece ``▁word``, scored by its log relative frequency;
* the same word without ``▁`` is a piece too (scored lower), for a word inside a longer one;
* every ASCII letter, digit and punctuation mark is a piece (scored far lower), so a word the
  corpus never saw splits into a lone ``▁`` and its characters, as T5 splits rare words into
  several pieces (``"goldfinch"`` -> ``▁``, ``g``, ``o``, ...); other characters are ``<unk>``.

The counting is that of a unigram language model whose segmentation of the corpus is fixed
(one piece per word), so the build is deterministic (the ``tokenizers`` library's
``UnigramTrainer`` gave a different, mostly single-letter vocabulary on each run of this small
corpus). The result is a ``transformers.T5TokenizerFast`` (the class SD3 / Flux folders load;
in transformers 5 it is ``T5Tokenizer``, backed by *tokenizers*) with T5's conventions: ``<pad>``
= 0, ``</s>`` = 1 appended to every sequence (no BOS), ``<unk>`` = 2, 100 ``<extra_id_N>``
sentinels at the end, case kept (T5 does not lowercase).

>>> tok = tiny_t5_tokenizer()
>>> tok.convert_ids_to_tokens(tok("a photo of a circle").input_ids)
['▁a', '▁photo', '▁of', '▁a', '▁circle', '</s>']
>>> tok.convert_ids_to_tokens(tok("two circles").input_ids)
['▁', 't', 'w', 'o', '▁circle', 's', '</s>']
"""

from __future__ import annotations

import functools
import math
import string
from collections import Counter

import torch

from ..data import SHAPE_CLASSES, shape_captions
from ..errors import InputError
from .tiny import VOCAB_WORDS

__all__ = ["T5_SPECIAL", "t5_unigram_vocab", "tiny_t5_tokenizer"]

#: T5's special pieces and their ids: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2.
T5_SPECIAL = ("<pad>", "</s>", "<unk>")
_SPACE = "\u2581"  # "▁": SentencePiece's word-start mark
_EXTRA_IDS = 100  # T5's sentinel pieces <extra_id_99> ... <extra_id_0>, at the end
_CORPUS_SIZE = 2000  # captions drawn from the shapes world


def _corpus() -> list[str]:
    """The shapes captions (seeded draws of labels and colours) and the tiny CLIP words."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, len(SHAPE_CLASSES), (_CORPUS_SIZE,), generator=g)
    colours = torch.rand(_CORPUS_SIZE, 3, 3, generator=g)
    captions = shape_captions(labels, SHAPE_CLASSES, colours, generator=g, p_empty=0.0)
    return captions + [" ".join(VOCAB_WORDS)]


@functools.lru_cache(maxsize=1)
def t5_unigram_vocab() -> tuple[tuple[str, float], ...]:
    """The ``(piece, log-probability)`` list of :func:`tiny_t5_tokenizer`, special pieces first
    (without the sentinels); computed once per process."""
    words = Counter(w for text in _corpus() for w in text.split())
    total = sum(words.values())
    pieces: dict[str, float] = {p: 0.0 for p in T5_SPECIAL}
    pieces[_SPACE] = math.log(1 / total)  # a lone word start, before a word with no piece
    # sorted: the ids do not depend on the corpus order; frequent words first
    ranked = sorted(words.items(), key=lambda kv: (-kv[1], kv[0]))
    for word, count in ranked:
        pieces[_SPACE + word] = math.log(count / total)
    for word, count in ranked:  # inside a longer word: a hundred times less likely
        pieces.setdefault(word, math.log(count / total / 100))
    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
    for ch in chars:  # the fallback: far below any word, so a known word stays one piece
        pieces.setdefault(ch, math.log(1 / total / 1000))
    return tuple(pieces.items())


def tiny_t5_tokenizer(model_max_length: int = 512):
    """A ``T5TokenizerFast`` with T5's conventions and a vocabulary estimated from the shapes
    captions (see the module docstring); no files, no downloads.

    Args:
        model_max_length: the tokenizer's length limit (512 as T5's; SD3's pipeline pads T5
            prompts to ``max_sequence_length=256`` and Flux's to 512 whatever this says).

    Returns:
        a ``transformers.T5TokenizerFast`` (``len(tok)`` pieces: the vocabulary and 100
        sentinels). ``save_pretrained`` / ``from_pretrained`` round-trip it.
    """
    from transformers import T5TokenizerFast

    if isinstance(model_max_length, bool) or not isinstance(model_max_length, int):
        raise InputError(
            f"model_max_length must be an int, got {model_max_length!r}; pass 512 (T5's limit)"
        )
    if model_max_length < 2:
        raise InputError(
            f"model_max_length={model_max_length} leaves no room for a token and </s>; pass 512"
        )
    sentinels = [(f"<extra_id_{i}>", 0.0) for i in range(_EXTRA_IDS - 1, -1, -1)]
    return T5TokenizerFast(
        vocab=list(t5_unigram_vocab()) + sentinels,
        extra_ids=_EXTRA_IDS,
        model_max_length=model_max_length,
    )
