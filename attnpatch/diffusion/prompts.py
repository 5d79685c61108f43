"""Prompt embeddings, token positions, the class prompt, and SDXL's extra conditioning.

* :func:`encode_prompt` turns prompts into the model's text conditioning and the
  unconditional (empty-prompt) one, as diffusers' pipelines do (SD1.x/2.x, SDXL, SD3, Flux;
  SD3's and Flux's in :mod:`._text_stack`). It is a plain function: encode a fixed set of
  prompts once where they are known (the trainer encodes its class prompts at construction)
  and index the rows (:meth:`PromptEmbeds.take`).
* :func:`token_indices` (in :mod:`.tokens`, re-exported here) finds a word's token positions
  in the padded sequence, which index the last axis of text-attention maps.
* :func:`class_prompt` fills a template such as :data:`PROMPT_TEMPLATE` with a class name.
* :func:`sdxl_added_cond_kwargs` builds ``{"text_embeds", "time_ids"}`` for SDXL-style UNets.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from ..errors import AttnPatchError
from ._text_stack import encode_dit, module_device, stack_kind
from .tokens import token_indices

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
        out = encoder(tokens.input_ids.to(module_device(encoder)), output_hidden_states=True)
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
    max_sequence_length: int | None = None,
) -> PromptEmbeds:
    """Prompt embeddings and unconditional embeddings, as diffusers' pipelines compute them.

    Args:
        tokenizer: a CLIP tokenizer, or all of a stack's tokenizers in the pipeline's order
            (``parts.tokenizers``; SDXL: ``(pipe.tokenizer, pipe.tokenizer_2)``, SD3: CLIP-L,
            CLIP-G, T5; Flux: CLIP-L, T5), one per text encoder.
        text_encoder: the matching text encoder(s). Frozen: run under ``no_grad``, nothing
            flows back into them.
        prompts: one prompt or ``B`` prompts.
        negative_prompt: the unconditional prompt, ``""`` by default (what SD1.x/2.x and SD3
            pipelines use; SDXL pipelines default to *zeros* instead,
            ``force_zeros_for_empty_prompt``; Flux's true CFG needs an explicit negative
            prompt); one string for the batch or ``B`` strings.
        max_sequence_length: SD3 / Flux: the padded length of the T5 part; default the
            pipelines' (SD3 256, Flux 512). Ignored by CLIP stacks.

    Each distinct text is encoded once, all in one text-encoder call per encoder.

    Returns:
        :class:`PromptEmbeds`. SD1.x / SD2.x (one ``CLIPTextModel``): ``cond`` and ``uncond``
        ``(B, 77, D)`` from the last layer (after its final layer norm), ``pooled=None``. SDXL
        (several encoders, or a ``CLIPTextModelWithProjection``): the penultimate layer of each
        encoder concatenated on the last axis, and ``pooled`` ``(B, P)`` the ``text_embeds`` of
        the first projecting encoder. SD3 (``StableDiffusion3Pipeline.encode_prompt``):
        ``(B, 77 + T, D_t5)``, both CLIPs' penultimate layers concatenated and zero-padded to
        T5's width, then T5's last layer (``T = max_sequence_length``); ``pooled`` ``(B,
        P_l + P_g)`` both CLIPs' ``text_embeds``. Flux (``FluxPipeline.encode_prompt``): T5's
        last layer ``(B, T, D_t5)``; ``pooled`` ``(B, D_clip)`` CLIP's ``pooler_output``.
        Tensors have no graph and sit on the (last) text encoder's device.

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
    kind = stack_kind(tokenizers)
    if kind == "clip":
        hidden, pooled = _encode(tokenizers, encoders, texts)
    else:
        hidden, pooled = encode_dit(kind, tokenizers, encoders, texts, max_sequence_length)
    row = {text: i for i, text in enumerate(texts)}
    embeds = PromptEmbeds(hidden, hidden, pooled, pooled)
    cond = embeds.take([row[t] for t in prompt_list])
    uncond = embeds.take([row[t] for t in negatives] * (b if len(negatives) == 1 else 1))
    return PromptEmbeds(cond.cond, uncond.uncond, cond.pooled, uncond.uncond_pooled)


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
