"""The real CLIP tokenizer of Stable Diffusion, built offline from open_clip's BPE vocabulary.

SD1.x, SD2.x and SDXL all tokenize with OpenAI CLIP's 49408-token byte-level BPE: the 256 byte
symbols, their end-of-word (``</w>``) forms, the first 48894 merges of OpenAI's merge list, and
``<|startoftext|>`` (49406) / ``<|endoftext|>`` (49407). The merge list ships, gzipped, inside
the ``open-clip-torch`` package (``open_clip/bpe_simple_vocab_16e6.txt.gz``, 1.3 MB); only that
file is read, so ``pip install --no-deps open-clip-torch`` is enough and ``open_clip`` itself is
never imported (its ``__init__`` needs torchvision).

:func:`clip_tokenizer` returns a ``transformers.CLIPTokenizer``, the class diffusers' pipelines
and :func:`attnpatch.models.load_diffusers_folder` load (in transformers 5 it is the
*tokenizers*-backed tokenizer; ``CLIPTokenizerFast`` is the same class), so its ids are the
ones an SD stack sees. Use it for tests that need real tokenisation (multi-token words,
punctuation, the 77-token limit) without downloading a model.

Example (needs open-clip-torch, so not a doctest; tests/models/test_clip_tokenizer.py runs
it)::

    tok = clip_tokenizer()                      # SD1.x: pads with <|endoftext|> (49407)
    tok("a photo of a cat").input_ids           # [49406, 320, 1125, 539, 320, 2368, 49407]
    clip_tokenizer(pad_token="!").pad_token_id  # 0: SD2.x's tokenizer, SDXL's tokenizer_2
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os
from pathlib import Path
from typing import Any

from ..errors import InputError, ModelError
from .tiny import _bytes_to_unicode

__all__ = ["CLIP_VOCAB_SIZE", "clip_bpe_path", "clip_tokenizer"]

#: Tokens in CLIP's vocabulary: 2 x 256 byte symbols + 48894 merges + BOS + EOS.
CLIP_VOCAB_SIZE = 49408
_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
_N_MERGES = CLIP_VOCAB_SIZE - 2 * 256 - 2  # 48894: CLIP keeps this many merges of the list
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
_INSTALL = "pip install --no-deps open-clip-torch"


def clip_bpe_path() -> Path:
    """The BPE merge list shipped by the installed ``open-clip-torch``, found without importing
    ``open_clip`` (whose ``__init__`` imports torchvision).

    Raises :class:`~attnpatch.errors.ModelError` when open-clip-torch is not installed or lacks the file.
    """
    spec = importlib.util.find_spec("open_clip")  # a top-level find: nothing is executed
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / _BPE_FILE
        if path.is_file():
            return path
    where = f" (looked in {folders})" if folders else ""
    raise ModelError(
        f"CLIP's BPE vocabulary {_BPE_FILE} was not found: open-clip-torch is not installed"
        f"{where}; run `{_INSTALL}` (only its vocabulary file is read), or pass "
        "clip_tokenizer(path=...) the merges file (.txt or .txt.gz)"
    )


@functools.lru_cache(maxsize=4)
def _vocab_and_merges(
    path: str, mtime_ns: int
) -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    """CLIP's ``(token, id)`` pairs and merges from the merge list at ``path`` (read once per
    file version: ``mtime_ns`` is part of the cache key)."""
    opener: Any = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise ModelError(
            f"cannot read the BPE merges file {path}: {exc}; pass the bpe_simple_vocab_16e6"
            f".txt.gz of open-clip-torch (or `{_INSTALL}` and leave path unset)"
        ) from exc
    merges = tuple(tuple(line.split()) for line in lines[1 : _N_MERGES + 1])  # line 0: #version
    if len(merges) < _N_MERGES or any(len(m) != 2 for m in merges):
        raise ModelError(
            f"{path} is not CLIP's BPE merge list (a '#version' line, then at least "
            f"{_N_MERGES} lines of two symbols; got {len(lines)} lines); pass open_clip's "
            f"{_BPE_FILE}"
        )
    alphabet = list(_bytes_to_unicode().values())  # CLIP's byte order: printable bytes first
    tokens = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges]
    tokens += [_BOS, _EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise ModelError(
            f"{path} gives {len(vocab)} distinct tokens, not CLIP's {CLIP_VOCAB_SIZE}; pass "
            f"open_clip's {_BPE_FILE}"
        )
    return tuple(vocab.items()), merges  # immutable: each tokenizer gets its own copies


def clip_tokenizer(
    path: str | os.PathLike | None = None,
    model_max_length: int = 77,
    pad_token: str = _EOS,
):
    """CLIP's 49408-token tokenizer, as SD1.x / SD2.x / SDXL load it, built offline.

    Args:
        path: CLIP's BPE merge list (``.txt.gz`` or ``.txt``); default the
            ``bpe_simple_vocab_16e6.txt.gz`` of the installed open-clip-torch
            (:func:`clip_bpe_path`).
        model_max_length: the padded/truncated length, 77 for every SD text encoder.
        pad_token: ``"<|endoftext|>"`` (id 49407) as in SD1.x's tokenizer (``openai/clip-vit-
            large-patch14``), or ``"!"`` (id 0) as in SD2.x's ``tokenizer`` and SDXL's
            ``tokenizer_2`` (open_clip pads with 0). With ``"!"`` the pad token is a special
            token, so a ``"!"`` *in a prompt* becomes id 0 too (``"!!"`` is two 0s, not token
            748), exactly as with those models' own files (diffusers issue #4153).

    Returns:
        a ``transformers.CLIPTokenizer`` (the *tokenizers*-backed class that
        :func:`attnpatch.models.load_diffusers_folder` and diffusers load; ``CLIPTokenizerFast``
        is the same class in transformers 5). It lowercases, normalises Unicode to NFC, splits
        words, numbers (one digit per token) and punctuation runs apart, and marks each word's
        last BPE piece with ``</w>``. Ids equal open_clip's ``SimpleTokenizer`` except where
        that one first runs ftfy and HTML unescaping (curly quotes, ``&amp;``), which SD's
        tokenizers do not.

    The vocabulary is built in memory (0.07 s; the parsed merge list is kept per file, so
    later calls skip the 0.05 s read) — faster than loading a saved ``tokenizer.json`` (0.4 s),
    so nothing is cached on disk. ``tok.save_pretrained(folder)`` writes a diffusers-style
    ``tokenizer/`` folder that ``CLIPTokenizer.from_pretrained`` reads back.

    Raises :class:`~attnpatch.errors.ModelError` when open-clip-torch is missing and no ``path`` is given
    (install it with ``pip install --no-deps open-clip-torch``), when ``path`` is not CLIP's
    merge list, or on a bad ``model_max_length`` / ``pad_token``.
    """
    from transformers import CLIPTokenizer

    if isinstance(model_max_length, bool) or not isinstance(model_max_length, int):
        raise InputError(
            f"model_max_length must be an int, got {model_max_length!r}; pass 77 (SD's length)"
        )
    if model_max_length < 2:
        raise InputError(
            f"model_max_length={model_max_length} leaves no room for BOS and EOS; pass 77"
        )
    bpe = Path(path) if path is not None else clip_bpe_path()
    if not bpe.is_file():
        raise ModelError(
            f"BPE merges file {bpe} does not exist; pass an existing bpe_simple_vocab_16e6"
            f".txt.gz, or `{_INSTALL}` and leave path unset"
        )
    pairs, merges = _vocab_and_merges(str(bpe.resolve()), bpe.stat().st_mtime_ns)
    vocab = dict(pairs)
    if pad_token not in vocab:
        raise InputError(
            f"pad_token {pad_token!r} is not in CLIP's vocabulary; pass '<|endoftext|>' (SD1.x) "
            "or '!' (SD2.x, SDXL's tokenizer_2)"
        )
    return CLIPTokenizer(
        vocab=vocab,
        merges=list(merges),
        model_max_length=model_max_length,
        pad_token=pad_token,
    )
