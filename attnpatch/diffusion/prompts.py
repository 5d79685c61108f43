"""Prompt embeddings, token positions, the class prompt, and SDXL's extra conditioning.

* :func:`encode_prompt` turns prompts into the UNet's ``encoder_hidden_states`` and the
  unconditional (empty-prompt) ones, as diffusers' pipelines do. It is a plain function: encode
  a fixed set of prompts once where they are known (the trainer encodes its class prompts at
  construction) and index the rows (:meth:`PromptEmbeds.take`).
* :func:`token_indices` finds a word's token positions in the padded sequence, which index the
  last axis of cross-attention maps ``(..., H*W, 77)``.
* :func:`class_prompt` fills a template such as :data:`PROMPT_TEMPLATE` with a class name.
* :func:`sdxl_added_cond_kwargs` builds ``{"text_embeds", "time_ids"}`` for SDXL-style UNets.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from ..errors import AttnPatchError

__all__ = [
    "PROMPT_TEMPLATE",
    "class_prompt",
    "PromptEmbeds",
    "encode_prompt",
    "token_indices",
    "sdxl_added_cond_kwargs",
]

#: The prompt of a class when none is configured: ``{label}`` is replaced by the class name.
PROMPT_TEMPLATE = "a photo of a {label}"


def class_prompt(label: str, template: str = PROMPT_TEMPLATE) -> str:
    """The diffusion prompt of a class: ``template`` with ``{label}`` replaced by ``label``.

    The name is inserted verbatim (the attention losses look for its tokens in the prompt), so
    folder names such as ``golden_retriever`` should be renamed, or given as CSV labels, in the
    words the text encoder should read.

    >>> class_prompt("circle"), class_prompt("cat", "a close up view of a {label}")
    ('a photo of a circle', 'a close up view of a cat')
    """
    if "{label}" not in template:
        raise AttnPatchError(
            f"prompt template {template!r} has no '{{label}}' placeholder; write e.g. "
            f"{PROMPT_TEMPLATE!r}"
        )
    if not str(label).strip():
        raise AttnPatchError("label name is empty; give each class a name (its words)")
    return template.replace("{label}", str(label))


class PromptEmbeds(NamedTuple):
    """Text conditioning for one batch of prompts.

    Attributes:
        cond: ``(B, L, D)`` ``encoder_hidden_states`` of the prompts (``L = 77`` for CLIP).
        uncond: ``(B, L, D)`` those of the negative prompt (the empty prompt by default).
        pooled: ``(B, P)`` pooled projection (SDXL's ``text_embeds``), ``None`` for SD1.x/2.x.
        uncond_pooled: ``(B, P)`` the negative prompt's pooled projection, or ``None``.
    """

    cond: torch.Tensor
    uncond: torch.Tensor
    pooled: torch.Tensor | None = None
    uncond_pooled: torch.Tensor | None = None

    def take(self, index: torch.Tensor | Sequence[int]) -> PromptEmbeds:
        """The rows ``index`` (``(B,)`` ints) of every field: embeddings of ``B`` prompts from
        those of a prompt set, e.g. ``class_embeds.take(labels)``."""
        idx = torch.as_tensor(index, dtype=torch.long, device=self.cond.device)
        return PromptEmbeds(*(None if t is None else t[idx] for t in self))


# ----------------------------------------------------------------------------- encode_prompt


def _as_list(obj: Any) -> list[Any]:
    return list(obj) if isinstance(obj, (list, tuple)) else [obj]


def _module_device(module: nn.Module) -> torch.device:
    for p in itertools.chain(module.parameters(), module.buffers()):
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def _encode(
    tokenizers: tuple[Any, ...], text_encoders: tuple[nn.Module, ...], texts: list[str]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(N, L, sum D)`` hidden states and ``(N, P)`` pooled projection (or None) of ``texts``."""
    sdxl = len(text_encoders) > 1
    outputs = []
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        max_len = tokenizer.model_max_length
        for text in texts:
            if len(tokenizer(text).input_ids) > max_len:
                warnings.warn(
                    f"prompt {text!r} is longer than {max_len} tokens and was truncated, as "
                    "diffusers does; shorten it to condition on all of it",
                    stacklevel=3,
                )
        tokens = tokenizer(
            texts, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt"
        )
        out = encoder(tokens.input_ids.to(_module_device(encoder)), output_hidden_states=True)
        sdxl = sdxl or getattr(out, "text_embeds", None) is not None
        outputs.append(out)
    pooled = next(
        (o.text_embeds for o in outputs if getattr(o, "text_embeds", None) is not None), None
    )
    if sdxl:  # SDXL: penultimate layer of every encoder, no final layer norm, concatenated
        hidden = torch.cat([out.hidden_states[-2] for out in outputs], dim=-1)
    else:  # SD1.x / SD2.x: last layer after the final layer norm
        hidden = outputs[0].last_hidden_state
    return hidden, pooled


def encode_prompt(
    tokenizer: Any,
    text_encoder: nn.Module | Sequence[nn.Module],
    prompts: str | Sequence[str],
    *,
    negative_prompt: str | Sequence[str] = "",
) -> PromptEmbeds:
    """Prompt embeddings and unconditional embeddings, as diffusers' pipelines compute them.

    Args:
        tokenizer: a CLIP tokenizer, or a sequence of them (SDXL: ``(pipe.tokenizer,
            pipe.tokenizer_2)``), one per text encoder.
        text_encoder: the matching text encoder(s). Frozen: run under ``no_grad``, nothing
            flows back into them.
        prompts: one prompt or ``B`` prompts.
        negative_prompt: the unconditional prompt, ``""`` by default (what SD1.x/2.x pipelines
            use; SDXL pipelines default to *zeros* instead, ``force_zeros_for_empty_prompt``);
            one string for the batch or ``B`` strings.

    Each distinct text is encoded once, all in one text-encoder call per encoder.

    Returns:
        :class:`PromptEmbeds`. SD1.x / SD2.x (one ``CLIPTextModel``): ``cond`` and ``uncond``
        ``(B, 77, D)`` from the last layer (after its final layer norm), ``pooled=None``. SDXL
        (several encoders, or a ``CLIPTextModelWithProjection``): the penultimate layer of each
        encoder concatenated on the last axis, and ``pooled`` ``(B, P)`` the ``text_embeds`` of
        the first projecting encoder. Tensors have no graph and sit on the text encoder's
        device.

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
    texts = list(dict.fromkeys(prompt_list + negatives))  # each distinct text once
    hidden, pooled = _encode(tokenizers, encoders, texts)
    row = {text: i for i, text in enumerate(texts)}
    embeds = PromptEmbeds(hidden, hidden, pooled, pooled)
    cond = embeds.take([row[t] for t in prompt_list])
    uncond = embeds.take([row[t] for t in negatives] * (b if len(negatives) == 1 else 1))
    return PromptEmbeds(cond.cond, uncond.uncond, cond.pooled, uncond.uncond_pooled)


# ----------------------------------------------------------------------------- token_indices

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


def token_indices(
    tokenizer: Any, prompt: str, word: str, *, all_occurrences: bool = False
) -> list[int]:
    """Positions of ``word``'s tokens in ``prompt``'s padded token sequence.

    The positions index the token axis of the text embeddings ``(B, 77, D)`` and of
    cross-attention maps ``(..., H*W, 77)``: BOS is at 0, the prompt's first token at 1.

    Rules (checked on SD's real CLIP tokenizer, ``attnpatch.testing.clip_tokenizer()``):

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

    Raises :class:`AttnPatchError` when the word is not in the prompt (the message lists the
    prompt's words) or lies past the tokenizer's length limit.

    >>> from attnpatch.testing import tiny_tokenizer
    >>> token_indices(tiny_tokenizer(), "a photo of a cat", "cat")
    [5]
    """
    if not isinstance(word, str) or not word.strip():
        raise AttnPatchError(f"word must be a non-empty string, got {word!r}; pass e.g. 'cat'")
    full, spans = _ids_and_spans(tokenizer, prompt)  # with BOS and EOS
    target, _ = _ids_and_spans(tokenizer, word, add_special_tokens=False)
    if not target:
        raise AttnPatchError(f"word {word!r} has no tokens; pass a word of the prompt, e.g. 'cat'")
    tokens = tokenizer.convert_ids_to_tokens(full)
    special = set(getattr(tokenizer, "all_special_ids", ()))
    marks_word_end = tokenizer.convert_ids_to_tokens(target[-1]).endswith(_END_OF_WORD)
    n = len(target)
    starts = []
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
        starts.append(i)
    if not starts:
        raise AttnPatchError(
            f"word {word!r} is not in the prompt {prompt!r} (its words: {prompt.split()}); pass "
            "one of these words, spelled as in the prompt"
        )
    max_len = tokenizer.model_max_length
    kept = [s for s in starts if s + n - 1 < max_len - 1]  # the last slot holds EOS
    if not kept:  # starts ascend: the first occurrence is truncated, so are all
        raise AttnPatchError(
            f"word {word!r} sits at token position {starts[0] + n - 1}, past the {max_len}-token "
            "limit, and is truncated away; shorten the prompt or move the word forward"
        )
    if all_occurrences and len(kept) < len(starts):
        warnings.warn(
            f"{len(starts) - len(kept)} of the {len(starts)} occurrences of {word!r} lie past the "
            f"{max_len}-token limit and are truncated away; only the first {len(kept)} are "
            "returned",
            stacklevel=2,
        )
    positions = [s + j for s in (kept if all_occurrences else kept[:1]) for j in range(n)]
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
