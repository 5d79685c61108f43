"""Where a word's tokens sit in the text sequence a model attends to: :func:`token_indices`.

The positions index the token axis of the text embeddings (``PromptEmbeds.cond``) and the last
axis of the text-attention maps, for each kind of text stack (see
:mod:`attnpatch.diffusion._text_stack`):

* CLIP stacks (SD1.x / SD2.x / SDXL): positions in the padded 77-token CLIP sequence;
* SD3: the CLIP positions, then the T5 positions offset by the CLIP length (77), since SD3's
  text sequence is ``[CLIP (77), T5 (max_sequence_length)]``;
* Flux: positions in the T5 sequence (Flux attends to T5 only; CLIP is pooled).

(Not named ``token_indices.py``: a module of the function's name would shadow it.)
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from typing import Any

from ..errors import InputError
from ._text_stack import is_sentencepiece, stack_kind, t5_length

__all__ = ["token_indices"]

_END_OF_WORD = "</w>"  # CLIP's BPE marks the last piece of each pre-tokenized word


def _ids_and_spans(
    tokenizer: Any, text: str, **kwargs: Any
) -> tuple[list[int], list[tuple[int, int]] | None]:
    """Unpadded, untruncated ids of ``text`` and each token's ``(start, end)`` character span
    in it (``None`` from a tokenizer without offsets, i.e. a slow one)."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, return_offsets_mapping=True, verbose=False, **kwargs)
        return list(enc.input_ids), [tuple(span) for span in enc.offset_mapping]
    return list(tokenizer(text, verbose=False, **kwargs).input_ids), None


def _splits_a_word(text: str, start: int, end: int) -> bool:
    """Whether the character span ``[start, end)`` of ``text`` begins or ends between two
    letters or digits (``"cat"`` in ``"tomcat"``, ``"2"`` in ``"12"``)."""
    before = 0 < start < len(text) and text[start - 1].isalnum() and text[start].isalnum()
    after = 0 < end < len(text) and text[end - 1].isalnum() and text[end].isalnum()
    return before or after


def _is_mark(ch: str) -> bool:
    return not ch.isalnum() and not ch.isspace()


def _splits_a_mark_run(text: str, start: int, end: int) -> bool:
    """Whether ``[start, end)`` begins or ends inside a run of punctuation (``"cat."`` in
    ``"cat..."``), as CLIP's tokens, which keep such a run whole, would not match."""
    before = 0 < start < len(text) and _is_mark(text[start - 1]) and _is_mark(text[start])
    after = 0 < end < len(text) and _is_mark(text[end - 1]) and _is_mark(text[end])
    return before or after


def _not_found(prompt: str, word: str) -> InputError:
    return InputError(
        f"word {word!r} is not in the prompt {prompt!r} (its words: {prompt.split()}); pass "
        "one of these words, spelled as in the prompt"
    )


def _clip_occurrences(tokenizer: Any, prompt: str, word: str) -> list[list[int]]:
    """Every occurrence of ``word`` in ``prompt``'s CLIP tokens (BOS at 0), as positions."""
    full, spans = _ids_and_spans(tokenizer, prompt)  # with BOS and EOS
    target, _ = _ids_and_spans(tokenizer, word, add_special_tokens=False)
    if not target:
        raise InputError(f"word {word!r} has no tokens; pass a word of the prompt, e.g. 'cat'")
    tokens = tokenizer.convert_ids_to_tokens(full)
    special = set(getattr(tokenizer, "all_special_ids", ()))
    marks_word_end = tokenizer.convert_ids_to_tokens(target[-1]).endswith(_END_OF_WORD)
    n = len(target)
    found = []
    for i in range(len(full) - n + 1):
        if full[i : i + n] != target:
            continue
        mid_word = (  # the previous BPE piece does not end its word
            marks_word_end
            and i > 0
            and full[i - 1] not in special
            and not tokens[i - 1].endswith(_END_OF_WORD)
        )
        if mid_word or (
            spans is not None and _splits_a_word(prompt, spans[i][0], spans[i + n - 1][1])
        ):
            continue  # e.g. "cat" in "tomcat", "2" in "12"
        found.append(list(range(i, i + n)))
    return found


def _sentencepiece_occurrences(tokenizer: Any, prompt: str, word: str) -> list[list[int]]:
    """Every occurrence of ``word`` in ``prompt``'s T5 tokens (no BOS: the first token at 0).

    Found in the characters (whole words, any case, any whitespace between the words of a
    phrase), then mapped to the tokens whose character spans overlap the occurrence: a word's
    first piece carries its ``▁`` (or is a lone ``▁`` before its characters).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise InputError(
            f"token_indices needs a fast (tokenizers-backed) T5 tokenizer for its character "
            f"offsets, got {type(tokenizer).__name__}; load it with T5TokenizerFast"
        )
    ids, spans = _ids_and_spans(tokenizer, prompt)
    special = set(getattr(tokenizer, "all_special_ids", ()))
    pattern = r"\s+".join(re.escape(w) for w in word.split())
    found = []
    for match in re.finditer(pattern, prompt, flags=re.IGNORECASE):
        start, end = match.span()
        if _splits_a_word(prompt, start, end) or _splits_a_mark_run(prompt, start, end):
            continue
        positions = [
            i
            for i, (a, b) in enumerate(spans or ())
            if ids[i] not in special and a < b and a < end and b > start
        ]
        if positions:
            found.append(positions)
    return found


def _keep(found: list[list[int]], limit: int, all_occurrences: bool) -> tuple[list[int], int]:
    """The positions of the first (or every) occurrence that survives truncation to ``limit``
    positions (the last slot holds EOS), and how many occurrences were truncated away."""
    kept = [occ for occ in found if occ[-1] < limit - 1]
    chosen = kept if all_occurrences else kept[:1]  # they ascend: if the first is cut, all are
    return [p for occ in chosen for p in occ], len(found) - len(kept)


def _one_part(found: list[list[int]], limit: int, word: str, all_occurrences: bool) -> list[int]:
    positions, dropped = _keep(found, limit, all_occurrences)
    if not positions:  # found is not empty: the first occurrence is truncated, so are all
        raise InputError(
            f"word {word!r} sits at token position {found[0][-1]}, past the {limit}-token "
            "limit, and is truncated away; shorten the prompt or move the word forward"
        )
    if all_occurrences and dropped:
        warnings.warn(
            f"{dropped} of the {len(found)} occurrences of {word!r} lie past the {limit}-token "
            f"limit and are truncated away; only the first {len(found) - dropped} are returned",
            stacklevel=3,
        )
    return positions


def token_indices(
    tokenizer: Any | Sequence[Any],
    prompt: str,
    word: str,
    *,
    all_occurrences: bool = False,
    max_sequence_length: int | None = None,
) -> list[int]:
    """Positions of ``word``'s tokens in the text sequence the model attends to.

    ``tokenizer`` is one tokenizer or all of a stack's, in the pipeline's order
    (``parts.tokenizers``). The positions index the token axis of ``PromptEmbeds.cond`` and the
    last axis of the text-attention maps:

    * **CLIP** (SD1.x / SD2.x; SDXL's two tokenizers give the first one's positions): the padded
      77-token sequence, BOS at 0, the prompt's first token at 1.
    * **SD3** (CLIP-L, CLIP-G, T5): the CLIP positions, then the T5 positions plus 77: SD3's
      sequence is ``[CLIP (77), T5 (max_sequence_length)]``, as ``encode_prompt`` builds it.
    * **Flux** (CLIP-L, T5): the T5 positions (no BOS: the prompt's first token at 0).
    * A T5 tokenizer on its own: its positions.

    Rules for CLIP tokens (checked on SD's real CLIP tokenizer,
    ``attnpatch.testing.clip_tokenizer()``):

    * **Several tokens**: a word CLIP splits into BPE pieces (``"goldfinch"`` -> ``gold``,
      ``finch</w>``) or a phrase (``"traffic light"``, ``"tabby cat"``) returns all its
      positions, in order.
    * **Case and spacing** do not matter: the word is tokenized as the prompt is (CLIP
      lowercases and collapses whitespace), so ``"Cat"`` finds ``"cat"``.
    * **Punctuation** is its own token in CLIP, so ``"cat"`` is found in ``"a cat."``,
      ``"cat,"`` and ``"cat's"`` (the ``.``, ``,``, ``'s`` positions are not returned); a word
      given with punctuation (``"cat."``) must match the prompt's punctuation run exactly.
    * **Whole words**: the tokens must match *and* the match must start and end at word
      boundaries, so ``"cat"`` is not found in ``"tomcat"`` (``tom``, ``cat</w>``) and ``"2"``
      is not found in ``"12"``. The boundary is read from the character offsets of a fast
      tokenizer (the class SD loads): a match that starts or ends between two letters or digits
      of the prompt is inside a word. (The end-of-word mark ``</w>`` alone is not enough:
      CLIP gives every digit its own ``</w>``, so ``"2"`` used to be found inside ``"12"``.)
      Slow tokenizers, which have no offsets, use the ``</w>`` rule only.
    * **Repeated words**: the first occurrence by default; ``all_occurrences=True`` returns the
      positions of every occurrence, concatenated in order.
    * **The length limit** (77 for CLIP): :func:`encode_prompt` truncates as diffusers does, to
      BOS, the first ``model_max_length - 2`` tokens, EOS, so positions 1..75 survive and a
      word whose tokens reach position 76 or beyond (even partly) is truncated away. For the
      first occurrence that is an error; with ``all_occurrences=True`` the truncated
      occurrences are left out with a warning (an error if none is left).

    Rules for T5 (SentencePiece) tokens, which mark a word's *start* with ``▁`` and keep case:
    the word is found in the prompt's characters, whole (not inside a longer word, nor inside a
    run of punctuation), in any case and with any whitespace between a phrase's words; its
    positions are those of the tokens whose character spans overlap it (a word T5 splits
    returns all its pieces, a lone ``▁`` piece before its characters included; punctuation
    after it is not returned). The limit is ``max_sequence_length`` (default: SD3's pipeline's
    256, Flux's 512, a lone tokenizer's ``model_max_length``), the last slot holding ``</s>``.
    For SD3 a word truncated away in one part but not the other returns the surviving part's
    positions with a warning.

    Raises :class:`~attnpatch.errors.InputError` when the word is not in the prompt (the message
    lists the prompt's words) or lies past the length limit.

    >>> from attnpatch.testing import tiny_tokenizer, tiny_t5_tokenizer
    >>> token_indices(tiny_tokenizer(), "a photo of a cat", "cat")
    [5]
    >>> token_indices(tiny_t5_tokenizer(), "a photo of a cat", "cat")
    [4]
    >>> token_indices((tiny_tokenizer(), tiny_tokenizer(), tiny_t5_tokenizer()),
    ...               "a photo of a cat", "cat")
    [5, 81]
    """
    if not isinstance(word, str) or not word.strip():
        raise InputError(f"word must be a non-empty string, got {word!r}; pass e.g. 'cat'")
    if not isinstance(prompt, str):
        raise InputError(f"prompt must be a string, got {type(prompt).__name__}")
    tokenizers = list(tokenizer) if isinstance(tokenizer, (list, tuple)) else [tokenizer]
    if not tokenizers:
        raise InputError("token_indices got no tokenizer; pass parts.tokenizers")
    if len(tokenizers) == 1 and is_sentencepiece(tokenizers[0]):
        kind = "t5"
    else:
        kind = stack_kind(tokenizers)
    if kind == "clip":
        found = _clip_occurrences(tokenizers[0], prompt, word)
        if not found:
            raise _not_found(prompt, word)
        return _one_part(found, tokenizers[0].model_max_length, word, all_occurrences)
    t5 = tokenizers[-1]
    t5_limit = t5_length(kind, t5, max_sequence_length)
    t5_found = _sentencepiece_occurrences(t5, prompt, word)
    if kind != "sd3":
        if not t5_found:
            raise _not_found(prompt, word)
        return _one_part(t5_found, t5_limit, word, all_occurrences)
    clip_limit = int(tokenizers[0].model_max_length)
    clip_found = _clip_occurrences(tokenizers[0], prompt, word)
    if not clip_found and not t5_found:
        raise _not_found(prompt, word)
    clip_pos, clip_cut = _keep(clip_found, clip_limit, all_occurrences)
    t5_pos, t5_cut = _keep(t5_found, t5_limit, all_occurrences)
    if not clip_pos and not t5_pos:
        raise InputError(
            f"word {word!r} lies past both SD3 length limits (CLIP {clip_limit}, T5 {t5_limit}) "
            "and is truncated away; shorten the prompt or move the word forward"
        )
    if (clip_found and not clip_pos) or (t5_found and not t5_pos) or clip_cut or t5_cut:
        warnings.warn(
            f"some occurrences of {word!r} lie past CLIP's {clip_limit}-token or T5's "
            f"{t5_limit}-token limit and are truncated away there; the positions returned are "
            f"{len(clip_pos)} in the CLIP part and {len(t5_pos)} in the T5 part",
            stacklevel=2,
        )
    return clip_pos + [clip_limit + p for p in t5_pos]
