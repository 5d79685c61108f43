"""Prompt embeddings (cached), token positions, and SDXL's extra conditioning.

* :func:`encode_prompt` turns prompts into the UNet's ``encoder_hidden_states`` and the
  unconditional (empty-prompt) ones, as diffusers' pipelines do, and caches them per prompt.
* :func:`cached_embeddings` is the cache as a decorator for any embedding builder.
* :func:`token_indices` finds a word's token positions in the padded sequence, which index the
  last axis of cross-attention maps ``(..., H*W, 77)``.
* :func:`sdxl_added_cond_kwargs` builds ``{"text_embeds", "time_ids"}`` for SDXL-style UNets.

The cache. A training loop calls ``encode_prompt`` every iteration with the same few prompts;
the text encoder is frozen, so each prompt is encoded once and its embeddings reused
(detached). An entry is keyed on the builder's plain arguments (strings, numbers, tuples) and on
the *identity* of its object arguments (tokenizer, text encoder), and it stores a fingerprint of
those objects: for a module the ``(data_ptr, _version)`` of every parameter and buffer (any
in-place update such as ``optimizer.step()`` or ``load_state_dict``, and any ``.to()``, changes
it), for a tensor the same, for other objects with a length (tokenizers) ``len(obj)`` (so added
tokens count). A changed fingerprint re-encodes and replaces the entry, so stale embeddings are
never served. Objects are held by weak reference: when a text encoder is garbage-collected its
entries go with it. The cache is a bounded LRU (``maxsize`` entries, 256 by default for
``encode_prompt``: about 60 MB for SD1.5's ``(1, 77, 768)`` float32 rows). Cached tensors are
shared between calls: treat them as read-only.
"""

from __future__ import annotations

import functools
import itertools
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeVar

import torch
from torch import nn

from ..errors import AttnPatchError

__all__ = [
    "PromptEmbeds",
    "encode_prompt",
    "cached_embeddings",
    "token_indices",
    "sdxl_added_cond_kwargs",
]

F = TypeVar("F", bound=Callable[..., Any])


class PromptEmbeds(NamedTuple):
    """Text conditioning for one batch of prompts.

    Attributes:
        cond: ``(B, L, D)`` ``encoder_hidden_states`` of the prompts (``L = 77`` for CLIP).
        uncond: ``(B, L, D)`` those of the negative prompt (the empty prompt by default). When
            one negative prompt serves the batch it is a stride-0 ``expand`` of one row.
        pooled: ``(B, P)`` pooled projection (SDXL's ``text_embeds``), ``None`` for SD1.x/2.x.
        uncond_pooled: ``(B, P)`` the negative prompt's pooled projection, or ``None``.
    """

    cond: torch.Tensor
    uncond: torch.Tensor
    pooled: torch.Tensor | None = None
    uncond_pooled: torch.Tensor | None = None


# ----------------------------------------------------------------------------- the cache

_PLAIN = (str, bytes, int, float, bool, type(None), torch.dtype, torch.device)


def _freeze(value: Any, owners: list[Any]) -> Any:
    """A hashable key for ``value``; non-plain objects become ``("obj", index)`` into owners."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_freeze(v, owners) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _freeze(v, owners)) for k, v in sorted(value.items())))
    for i, owner in enumerate(owners):
        if owner is value:
            return ("obj", i)
    owners.append(value)
    return ("obj", len(owners) - 1)


def _fingerprint(obj: Any) -> Any:
    """Something that changes when ``obj``'s content does (see the module docstring)."""
    if isinstance(obj, torch.Tensor):
        return (obj.data_ptr(), obj._version, tuple(obj.shape), obj.dtype)
    if isinstance(obj, nn.Module):
        tensors = itertools.chain(obj.parameters(), obj.buffers())
        return tuple((t.data_ptr(), t._version) for t in tensors)
    try:
        return len(obj)
    except TypeError:
        return None


def _detach(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.detach()
    if isinstance(out, tuple) and hasattr(out, "_make"):  # NamedTuple
        return out._make(_detach(v) for v in out)
    if isinstance(out, (tuple, list)):
        return type(out)(_detach(v) for v in out)
    if isinstance(out, dict):
        return {k: _detach(v) for k, v in out.items()}
    return out


class _EmbeddingCache:
    """LRU memo of an embedding builder; see :func:`cached_embeddings`."""

    def __init__(self, fn: Callable[..., Any], maxsize: int):
        if maxsize < 1:
            raise AttnPatchError(f"maxsize must be >= 1, got {maxsize}; pass e.g. maxsize=256")
        self.fn = fn
        self.maxsize = maxsize
        self._entries: OrderedDict[Any, tuple[Any, Any]] = OrderedDict()
        self._by_owner: dict[int, set[Any]] = {}
        self._strong: dict[int, Any] = {}  # owners that cannot be weakly referenced
        self.hits = 0
        self.misses = 0
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        owners: list[Any] = []
        key = (_freeze(args, owners), _freeze(kwargs, owners))
        key = (key, tuple(id(o) for o in owners))
        stamp = tuple(_fingerprint(o) for o in owners)
        entry = self._entries.get(key)
        if entry is not None and entry[0] == stamp:
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[1]
        self.misses += 1
        # Never cache inference tensors (a first call under torch.inference_mode() would make
        # them): later training code could not save them for backward.
        with torch.inference_mode(False):
            value = _detach(self.fn(*args, **kwargs))
        self._entries[key] = (stamp, value)
        self._entries.move_to_end(key)
        for owner in owners:
            self._watch(owner, key)
        while len(self._entries) > self.maxsize:
            self._drop(next(iter(self._entries)))
        return value

    def _watch(self, owner: Any, key: Any) -> None:
        oid = id(owner)
        keys = self._by_owner.get(oid)
        if keys is None:
            keys = self._by_owner[oid] = set()
            try:
                weakref.finalize(owner, self._forget_owner, oid)
            except TypeError:
                self._strong[oid] = owner  # keeps the id from being reused
        keys.add(key)

    def _drop(self, key: Any) -> None:
        self._entries.pop(key, None)
        for oid in key[1]:
            keys = self._by_owner.get(oid)
            if keys is not None:
                keys.discard(key)

    def _forget_owner(self, oid: int) -> None:
        for key in self._by_owner.pop(oid, set()):
            self._entries.pop(key, None)
        self._strong.pop(oid, None)

    def cache_clear(self) -> None:
        """Drop every entry (weak-reference callbacks then find nothing to do)."""
        self._entries.clear()
        self._by_owner.clear()
        self._strong.clear()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)


def cached_embeddings(fn: F | None = None, *, maxsize: int = 256) -> F:
    """Memoise an embedding builder; its outputs come back detached.

    Works on any function whose arguments are plain values (str, numbers, None, dtypes,
    devices, and tuples / lists / dicts of them) and objects (models, tokenizers, tensors). The
    key is the plain values plus the objects' identities; each entry also records the objects'
    fingerprints and is rebuilt when they change (see the module docstring). Use it bare or with
    arguments. The wrapper has ``cache_clear()``, ``hits``, ``misses`` and ``len()``.

    >>> calls = []
    >>> @cached_embeddings
    ... def build(encoder, text):
    ...     calls.append(text)
    ...     return encoder(torch.ones(1, 2))
    >>> enc = nn.Linear(2, 3)
    >>> a, b = build(enc, "cat"), build(enc, "cat")
    >>> a is b, calls, a.requires_grad
    (True, ['cat'], False)
    """
    if fn is None:
        return functools.partial(cached_embeddings, maxsize=maxsize)  # type: ignore[return-value]
    return _EmbeddingCache(fn, maxsize)  # type: ignore[return-value]


# ----------------------------------------------------------------------------- encode_prompt


def _as_list(obj: Any) -> list[Any]:
    return list(obj) if isinstance(obj, (list, tuple)) else [obj]


def _module_device(module: nn.Module) -> torch.device:
    for p in itertools.chain(module.parameters(), module.buffers()):
        return p.device
    return torch.device("cpu")


def _encode_one(
    tokenizers: tuple[Any, ...], text_encoders: tuple[nn.Module, ...], prompt: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(1, L, sum D)`` hidden states and ``(1, P)`` pooled projection (or None) of one prompt."""
    sdxl = len(text_encoders) > 1
    outputs = []
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        max_len = tokenizer.model_max_length
        tokens = tokenizer(
            prompt, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt"
        )
        if len(tokenizer(prompt).input_ids) > max_len:
            warnings.warn(
                f"prompt {prompt!r} is longer than {max_len} tokens and was truncated, as "
                "diffusers does; shorten it to condition on all of it",
                stacklevel=4,
            )
        out = encoder(tokens.input_ids.to(_module_device(encoder)), output_hidden_states=True)
        sdxl = sdxl or getattr(out, "text_embeds", None) is not None
        outputs.append(out)
    pooled = None
    for out in outputs:
        if getattr(out, "text_embeds", None) is not None:
            pooled = out.text_embeds
            break
    if sdxl:  # SDXL: penultimate layer of every encoder, no final layer norm, concatenated
        hidden = torch.cat([out.hidden_states[-2] for out in outputs], dim=-1)
    else:  # SD1.x / SD2.x: last layer after the final layer norm
        hidden = outputs[0].last_hidden_state
    return hidden, pooled


_encode_one_cached = cached_embeddings(_encode_one, maxsize=256)


def encode_prompt(
    tokenizer: Any,
    text_encoder: nn.Module | Sequence[nn.Module],
    prompts: str | Sequence[str],
    *,
    negative_prompt: str | Sequence[str] = "",
    cache: bool = True,
) -> PromptEmbeds:
    """Prompt embeddings and unconditional embeddings, as diffusers' pipelines compute them.

    Args:
        tokenizer: a CLIP tokenizer, or a sequence of them (SDXL: ``(pipe.tokenizer,
            pipe.tokenizer_2)``), one per text encoder.
        text_encoder: the matching text encoder(s). Frozen: nothing flows back into them.
        prompts: one prompt or ``B`` prompts.
        negative_prompt: the unconditional prompt, ``""`` by default (what SD1.x/2.x pipelines
            use; SDXL pipelines default to *zeros* instead, ``force_zeros_for_empty_prompt``);
            one string for the batch or ``B`` strings.
        cache: reuse embeddings of prompts seen before (see the module docstring). Each distinct
            prompt is encoded once, on its own; a cache hit costs no text-encoder call.

    Returns:
        :class:`PromptEmbeds`. SD1.x / SD2.x (one ``CLIPTextModel``): ``cond`` and ``uncond``
        ``(B, 77, D)`` from the last layer (after its final layer norm), ``pooled=None``. SDXL
        (several encoders, or a ``CLIPTextModelWithProjection``): the penultimate layer of each
        encoder concatenated on the last axis, and ``pooled`` ``(B, P)`` the ``text_embeds`` of
        the first projecting encoder. Tensors are detached, on the text encoder's device.

    >>> from attnpatch.testing import tiny_text_encoder, tiny_tokenizer
    >>> e = encode_prompt(tiny_tokenizer(), tiny_text_encoder(), ["a cat", "a dog"])
    >>> tuple(e.cond.shape), tuple(e.uncond.shape), e.pooled
    ((2, 77, 8), (2, 77, 8), None)
    """
    tokenizers, encoders = tuple(_as_list(tokenizer)), tuple(_as_list(text_encoder))
    if len(tokenizers) != len(encoders) or not encoders:
        raise AttnPatchError(
            f"got {len(tokenizers)} tokenizer(s) for {len(encoders)} text encoder(s); pass one "
            "tokenizer per encoder, e.g. (pipe.tokenizer, pipe.tokenizer_2) with "
            "(pipe.text_encoder, pipe.text_encoder_2)"
        )
    prompt_list = _as_list(prompts)
    negatives = _as_list(negative_prompt)
    if not prompt_list or not all(isinstance(p, str) for p in prompt_list + negatives):
        raise AttnPatchError(
            f"prompts must be a string or a non-empty list of strings, got {prompts!r} "
            f"(negative_prompt {negative_prompt!r}); pass e.g. ['a photo of a cat']"
        )
    b = len(prompt_list)
    if len(negatives) not in (1, b):
        raise AttnPatchError(
            f"got {len(negatives)} negative prompts for {b} prompts; pass one negative prompt "
            f"(a string) or {b}"
        )
    encode = _encode_one_cached if cache else _encode_one

    def rows(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        done = {text: encode(tokenizers, encoders, text) for text in dict.fromkeys(texts)}
        hidden = torch.cat([done[t][0] for t in texts]) if len(texts) > 1 else done[texts[0]][0]
        pooled_rows = [done[t][1] for t in texts]
        if pooled_rows[0] is None:
            return hidden, None
        pooled = torch.cat(pooled_rows) if len(texts) > 1 else pooled_rows[0]
        return hidden, pooled

    cond, pooled = rows(prompt_list)
    uncond, uncond_pooled = rows(negatives)
    if len(negatives) == 1 and b > 1:
        uncond = uncond.expand(b, -1, -1)
        if uncond_pooled is not None:
            uncond_pooled = uncond_pooled.expand(b, -1)
    return PromptEmbeds(cond, uncond, pooled, uncond_pooled)


encode_prompt.cache_clear = _encode_one_cached.cache_clear  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------- token_indices


def _input_ids(tokenizer: Any, text: str, **kwargs: Any) -> list[int]:
    return list(tokenizer(text, **kwargs).input_ids)


def token_indices(
    tokenizer: Any, prompt: str, word: str, *, all_occurrences: bool = False
) -> list[int]:
    """Positions of ``word``'s tokens in ``prompt``'s padded token sequence.

    The positions index the token axis of the text embeddings ``(B, 77, D)`` and of
    cross-attention maps ``(..., H*W, 77)``: BOS is at 0, the prompt's first token at 1. A word
    that the tokenizer splits into several tokens (a rare word, or a phrase such as
    ``"gold fish"``) returns all its positions, in order. The match is on whole words: ``"cat"``
    is not found inside ``"bobcat"``.

    Repeated words: the first occurrence by default; ``all_occurrences=True`` returns the
    positions of every occurrence, concatenated in order.

    Raises :class:`AttnPatchError` when the word is not in the prompt (the message lists the
    prompt's words) or lies past the tokenizer's length limit (truncated away).

    >>> from attnpatch.testing import tiny_tokenizer
    >>> token_indices(tiny_tokenizer(), "a photo of a cat", "cat")
    [5]
    """
    if not isinstance(word, str) or not word.strip():
        raise AttnPatchError(f"word must be a non-empty string, got {word!r}; pass e.g. 'cat'")
    full = _input_ids(tokenizer, prompt)  # with BOS and EOS, unpadded, untruncated
    target = _input_ids(tokenizer, word, add_special_tokens=False)
    tokens = tokenizer.convert_ids_to_tokens(full)
    special = set(getattr(tokenizer, "all_special_ids", ()))
    end_of_word = "</w>"  # CLIP's BPE marks a word's last token
    check_boundary = tokenizer.convert_ids_to_tokens(target[-1]).endswith(end_of_word)
    n = len(target)
    starts = []
    for i in range(len(full) - n + 1):
        if full[i : i + n] != target:
            continue
        inside_word = (
            check_boundary
            and i > 0
            and full[i - 1] not in special
            and not tokens[i - 1].endswith(end_of_word)
        )
        if inside_word:  # e.g. "cat" in "bobcat"
            continue
        starts.append(i)
    if not starts:
        raise AttnPatchError(
            f"word {word!r} is not in the prompt {prompt!r} (its words: {prompt.split()}); pass "
            "one of these words, spelled as in the prompt"
        )
    max_len = tokenizer.model_max_length
    if not all_occurrences:
        starts = starts[:1]
    positions = [s + j for s in starts for j in range(n)]
    if positions[-1] >= max_len - 1:  # the last slot holds EOS after truncation
        raise AttnPatchError(
            f"word {word!r} sits at token position {positions[-1]}, past the {max_len}-token "
            "limit, and is truncated away; shorten the prompt or move the word forward"
        )
    return positions


# ----------------------------------------------------------------------------- SDXL


def sdxl_added_cond_kwargs(
    pooled: torch.Tensor,
    size: int | tuple[int, int],
    *,
    uncond_pooled: torch.Tensor | None = None,
    batch_size: int | None = None,
    original_size: tuple[int, int] | None = None,
    crops_coords_top_left: tuple[int, int] = (0, 0),
    target_size: tuple[int, int] | None = None,
    unet: nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """SDXL's ``added_cond_kwargs = {"text_embeds", "time_ids"}`` for images of ``size``.

    ``time_ids`` is ``original_size + crops_coords_top_left + target_size`` (6 numbers, pixels,
    each size ``(height, width)``; both sizes default to ``size``), as diffusers'
    ``StableDiffusionXLPipeline._get_add_time_ids`` builds it.

    Args:
        pooled: ``(1, P)`` or ``(B, P)`` pooled text projection (``PromptEmbeds.pooled``).
        size: the image size in pixels, ``(height, width)`` or one int (latents ``* 8``).
        uncond_pooled: the negative prompt's ``(1 or B, P)`` pooled projection. With it the
            result has ``2B`` rows, ``[uncond; cond]`` (diffusers' order), which ``ddim_invert``
            / ``ddim_denoise`` use as the two halves of classifier-free guidance (and from which
            they take one half when only one half runs).
        batch_size: ``B``, the number of latents; defaults to ``pooled``'s batch.
        unet: optionally the UNet, to check that ``6 * addition_time_embed_dim + P`` matches its
            ``add_embedding`` input width.

    Returns:
        ``{"text_embeds": (n, P), "time_ids": (n, 6)}`` with ``n = B`` or ``2B``, on
        ``pooled``'s device and dtype.

    >>> kw = sdxl_added_cond_kwargs(torch.zeros(1, 16), 64, batch_size=2)
    >>> tuple(kw["text_embeds"].shape), kw["time_ids"][0].tolist()
    ((2, 16), [64.0, 64.0, 0.0, 0.0, 64.0, 64.0])
    """
    if not isinstance(pooled, torch.Tensor) or pooled.ndim != 2:
        raise AttnPatchError(
            f"pooled must be a (B, P) tensor, got "
            f"{tuple(pooled.shape) if isinstance(pooled, torch.Tensor) else type(pooled)}; pass "
            "PromptEmbeds.pooled from encode_prompt with SDXL's projecting text encoder"
        )
    hw = (size, size) if isinstance(size, int) else tuple(size)
    original = tuple(original_size) if original_size is not None else hw
    target = tuple(target_size) if target_size is not None else hw
    time_ids = list(original) + list(crops_coords_top_left) + list(target)
    if len(time_ids) != 6:
        raise AttnPatchError(
            f"time ids need (height, width) sizes and a (top, left) crop, got {time_ids}; pass "
            "size=(h, w), original_size=(h, w), crops_coords_top_left=(top, left)"
        )
    if unet is not None:
        per_id = unet.config.addition_time_embed_dim
        expected = unet.add_embedding.linear_1.in_features
        if per_id * 6 + pooled.shape[-1] != expected:
            raise AttnPatchError(
                f"the UNet's add_embedding takes {expected} features but 6 time ids x "
                f"{per_id} + pooled width {pooled.shape[-1]} = {per_id * 6 + pooled.shape[-1]}; "
                "pass the pooled output of the text encoder that belongs to this UNet"
            )
    b = pooled.shape[0] if batch_size is None else batch_size

    def rows(t: torch.Tensor, name: str) -> torch.Tensor:
        if t.shape[0] not in (1, b):
            raise AttnPatchError(
                f"{name} has batch {t.shape[0]} for batch_size {b}; pass 1 row or {b} rows"
            )
        return t.expand(b, -1)

    text_embeds = rows(pooled, "pooled")
    if uncond_pooled is not None:
        text_embeds = torch.cat([rows(uncond_pooled, "uncond_pooled"), text_embeds])
    ids = torch.tensor([time_ids], dtype=pooled.dtype, device=pooled.device)
    return {"text_embeds": text_embeds, "time_ids": ids.expand(text_embeds.shape[0], -1)}
