"""Which text stack a model has, and how SD3's and Flux's pipelines encode prompts with it.

A stack is named by its tokenizers, in the pipeline's order (``parts.tokenizers``):

* ``"clip"`` — CLIP tokenizers only: SD1.x / SD2.x (one), SDXL (two);
* ``"sd3"`` — CLIP-L, CLIP-G, T5 (``StableDiffusion3Pipeline``'s ``tokenizer``,
  ``tokenizer_2``, ``tokenizer_3``);
* ``"flux"`` — CLIP-L, T5 (``FluxPipeline``'s ``tokenizer``, ``tokenizer_2``).

A tokenizer is of T5's kind when it follows SentencePiece's convention (a word's first piece
starts with ``▁``), of CLIP's when it marks word ends (``</w>``); :func:`encode_dit` computes
what those pipelines' ``encode_prompt`` computes, under ``no_grad``.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import InputError, ModelError

__all__ = [
    "STACKS",
    "T5_LENGTHS",
    "is_sentencepiece",
    "stack_kind",
    "t5_length",
    "encode_dit",
    "module_device",
]

STACKS = ("clip", "sd3", "flux")
#: The pipelines' default ``max_sequence_length`` of the T5 prompt (the padded T5 length).
T5_LENGTHS = {"sd3": 256, "flux": 512}
_WORD_START = "\u2581"  # "▁"


def is_sentencepiece(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` marks word starts with ``▁`` (T5, SentencePiece) rather than word
    ends with ``</w>`` (CLIP's BPE)."""
    ids = tokenizer("a", add_special_tokens=False).input_ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    return bool(tokens) and tokens[0].startswith(_WORD_START)


def stack_kind(tokenizers: Sequence[Any]) -> str:
    """``"clip"``, ``"sd3"`` or ``"flux"`` from a stack's tokenizers, in the pipeline's order."""
    kinds = ["t5" if is_sentencepiece(t) else "clip" for t in tokenizers]
    if "t5" not in kinds:
        return "clip"
    if kinds == ["clip", "clip", "t5"]:
        return "sd3"
    if kinds == ["clip", "t5"]:
        return "flux"
    raise ModelError(
        f"unsupported text stack {kinds} (tokenizers in order); attnpatch knows CLIP stacks "
        "(SD1.x/2.x: one, SDXL: two), SD3's (CLIP-L, CLIP-G, T5) and Flux's (CLIP-L, T5): pass "
        "parts.tokenizers / parts.text_encoders in the pipeline's order"
    )


def t5_length(kind: str, tokenizer: Any, max_sequence_length: int | None) -> int:
    """The padded T5 length: ``max_sequence_length`` if given, else the pipeline's default
    (SD3 256, Flux 512), else the tokenizer's limit (a T5 tokenizer on its own)."""
    if max_sequence_length is not None:
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int):
            raise InputError(
                f"max_sequence_length must be an int, got {max_sequence_length!r}; pass e.g. 256"
            )
        if max_sequence_length < 2:
            raise InputError(
                f"max_sequence_length={max_sequence_length} leaves no room for a token and "
                "</s>; pass e.g. 256 (SD3's default) or 512 (Flux's)"
            )
        return max_sequence_length
    return T5_LENGTHS.get(kind, int(tokenizer.model_max_length))


def module_device(module: nn.Module) -> torch.device:
    """Where ``module``'s first parameter or buffer lives (the CPU if it has none)."""
    for p in itertools.chain(module.parameters(), module.buffers()):
        return p.device
    return torch.device("cpu")


def _warn_truncated(tokenizer: Any, texts: list[str], max_len: int) -> None:
    for text in texts:
        if len(tokenizer(text).input_ids) > max_len:
            warnings.warn(
                f"prompt {text!r} is longer than {max_len} tokens and was truncated, as "
                "diffusers does; shorten it to condition on all of it",
                stacklevel=4,
            )


def _ids(tokenizer: Any, texts: list[str], max_len: int, encoder: nn.Module) -> torch.Tensor:
    _warn_truncated(tokenizer, texts, max_len)
    tokens = tokenizer(
        texts, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt"
    )
    return tokens.input_ids.to(module_device(encoder))


def _check_clip(encoder: nn.Module, kind: str, projecting: bool) -> None:
    model_type = str(getattr(encoder.config, "model_type", ""))
    if not model_type.startswith("clip"):
        raise ModelError(
            f"the {kind} stack's CLIP text encoder is a {type(encoder).__name__} "
            f"(model_type {model_type!r}); pass parts.text_encoders in the pipeline's order"
        )
    if projecting and not hasattr(encoder, "text_projection"):
        raise ModelError(
            f"SD3 needs CLIPTextModelWithProjection text encoders (their text_embeds are the "
            f"pooled projection), got {type(encoder).__name__}; load text_encoder and "
            "text_encoder_2 with CLIPTextModelWithProjection"
        )


@torch.no_grad()
def encode_dit(
    kind: str,
    tokenizers: Sequence[Any],
    encoders: Sequence[nn.Module],
    texts: list[str],
    max_sequence_length: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, L, D)`` text sequence and ``(N, P)`` pooled projection of ``texts``, as
    ``StableDiffusion3Pipeline.encode_prompt`` (``kind="sd3"``) or ``FluxPipeline.encode_prompt``
    (``"flux"``) compute them.

    SD3: each CLIP's penultimate hidden state (77 tokens), concatenated on the feature axis and
    zero-padded to T5's width, then T5's last hidden state appended on the token axis
    (``L = 77 + max_sequence_length``); pooled: the two CLIPs' ``text_embeds`` concatenated.
    Flux: T5's last hidden state (``L = max_sequence_length``); pooled: CLIP's
    ``pooler_output``.
    """
    t5_tok, t5 = tokenizers[-1], encoders[-1]
    length = t5_length(kind, t5_tok, max_sequence_length)
    t5_states = t5(_ids(t5_tok, texts, length, t5))[0]
    clip_len = int(tokenizers[0].model_max_length)  # the pipelines' tokenizer_max_length
    if kind == "flux":
        _check_clip(encoders[0], kind, projecting=False)
        out = encoders[0](_ids(tokenizers[0], texts, clip_len, encoders[0]))
        return t5_states, out.pooler_output
    hidden, pooled = [], []
    for tokenizer, encoder in zip(tokenizers[:2], encoders[:2]):
        _check_clip(encoder, kind, projecting=True)
        out = encoder(_ids(tokenizer, texts, clip_len, encoder), output_hidden_states=True)
        hidden.append(out.hidden_states[-2].to(t5_states.device))
        pooled.append(out[0].to(t5_states.device))
    clip_states = torch.cat(hidden, dim=-1)
    width = t5_states.shape[-1]
    if clip_states.shape[-1] > width:
        raise ModelError(
            f"SD3's CLIP features ({clip_states.shape[-1]} wide) do not fit T5's width "
            f"({width}); load the text encoders of one SD3 model"
        )
    clip_states = nn.functional.pad(clip_states, (0, width - clip_states.shape[-1]))
    return torch.cat([clip_states, t5_states], dim=-2), torch.cat(pooled, dim=-1)
