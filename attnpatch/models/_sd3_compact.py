"""Training the ``"shapes-sd3"`` transformer on a compact text sequence, exactly.

SD3's text sequence for the shapes stack is ``[CLIP (77), T5 (256)]`` = 333 tokens, and most of
them are copies: the CLIP padding repeats the end token (the tiny tokenizer pads with it, and
the position embeddings are zero, so every copy has the same features) and the 256 T5
positions are all zeros. SD3 gives text tokens no positions, so copies stay identical through
every block, and in the joint softmax ``m`` identical keys weigh exactly as one key whose logit
is raised by ``log m``. Training therefore runs the transformer on the distinct tokens only
(``[BOS, words..., EOS]`` and one T5 token, about 14 instead of 333), each with its
multiplicity as an additive attention bias: the same function of the weights (the image
stream's output agrees with the full sequence's to float rounding; tests check it), about
four times less compute per step on a CPU. Inference uses the plain model and the full
sequence: nothing of this is saved with the weights.

The T5 multiplicity can also stand for another T5 length at no cost (``t5_lengths``): the
training draws it per caption (SD3's pipelines take any ``max_sequence_length``), so that early
in training, with few copies, the label word gets a share of the attention large enough to
learn from; with 256 copies it got 1/500 of it (the share of a uniform softmax over 64 image
and 333 text keys) and after 2500 steps the text was still unused (docs/models.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError

__all__ = ["compact_condition", "multiplicity_bias"]

_CLIP_LEN = 77


def compact_condition(
    cond: torch.Tensor,
    clip_ids: torch.Tensor,
    eos_id: int,
    t5_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct tokens of SD3 text sequences and their log multiplicities.

    Args:
        cond: ``(B, 77 + T, D)`` the sequence ``encode_prompt`` / ``sd3_condition`` builds.
        clip_ids: ``(B, 77)`` the CLIP token ids it came from (padded with ``eos_id``).
        eos_id: the end token (= the padding token).
        t5_lengths: ``(B,)`` T5 lengths to stand for, row by row (default: ``cond``'s ``T``):
            the row is then the sequence ``encode_prompt(..., max_sequence_length=m)`` builds,
            as the T5 part is constant (tests check it).

    Returns:
        ``(B, L, D)`` tokens ``[BOS, words..., EOS, T5]`` (shorter rows filled with copies
        whose bias is ``-inf``) and ``(B, L)`` biases ``log m``. Gradients flow into ``cond``.

    Raises :class:`~attnpatch.errors.InputError` if a row's claimed copies are not identical
    (another tokenizer's padding, trained positions, a non-zero T5): the compact sequence
    would not be equivalent.
    """
    b, s, _ = cond.shape
    real = []
    for i in range(b):
        ends = (clip_ids[i] == eos_id).nonzero()
        if len(ends) == 0:
            raise InputError("a CLIP row has no end token; pad with the end token")
        n = int(ends[0]) + 1
        with torch.no_grad():
            same_clip = (cond[i, n - 1 : _CLIP_LEN] == cond[i, n - 1]).all()
            same_t5 = (cond[i, _CLIP_LEN:] == cond[i, _CLIP_LEN]).all()
        if not (same_clip and same_t5):
            raise InputError(
                "the padding copies of an SD3 text sequence differ; compact training needs "
                "zero CLIP positions, end-token padding and a constant T5 part"
            )
        real.append(n)
    length = max(real) + 1
    index = torch.full((b, length), _CLIP_LEN, dtype=torch.long)
    bias = torch.full((b, length), float("-inf"))
    for i, n in enumerate(real):
        index[i, :n] = torch.arange(n)
        bias[i, :n] = 0.0
        bias[i, n - 1] = float(torch.log(torch.tensor(float(_CLIP_LEN - n + 1))))
        m = s - _CLIP_LEN if t5_lengths is None else int(t5_lengths[i])
        bias[i, n] = float(torch.log(torch.tensor(float(m))))
    tokens = torch.gather(cond, 1, index[..., None].expand(-1, -1, cond.shape[-1]))
    return tokens, bias


class _BiasedJointProcessor:
    """diffusers' ``JointAttnProcessor2_0`` with an additive bias on the text keys."""

    def __init__(self) -> None:
        self.bias: torch.Tensor | None = None  # (B, L_text)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        b, n = hidden_states.shape[:2]
        heads = attn.heads

        def split(x):
            return x.view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2)

        query, key, value = (split(f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        mask = None
        if encoder_hidden_states is not None:
            e = encoder_hidden_states
            eq, ek, ev = (split(f(e)) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            query = torch.cat([query, eq], dim=2)
            key = torch.cat([key, ek], dim=2)
            value = torch.cat([value, ev], dim=2)
            bias = self.bias.to(query.dtype)
            mask = torch.cat([bias.new_zeros(b, n), bias], dim=1)[:, None, None, :]
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
        out = out.transpose(1, 2).reshape(b, -1, heads * query.shape[-1]).to(query.dtype)
        text = None
        if encoder_hidden_states is not None:
            out, text = out[:, :n], out[:, n:]
            if not attn.context_pre_only:
                text = attn.to_add_out(text)
        out = attn.to_out[1](attn.to_out[0](out))
        return (out, text) if encoder_hidden_states is not None else out


@contextlib.contextmanager
def multiplicity_bias(transformer: nn.Module, bias: torch.Tensor) -> Iterator[None]:
    """Inside the block, every joint attention of ``transformer`` adds ``bias`` ``(B, L)`` to
    its text keys' logits (:func:`compact_condition`'s second output); the original
    processors are put back afterwards."""
    originals = dict(transformer.attn_processors)
    proc = _BiasedJointProcessor()
    proc.bias = bias
    transformer.set_attn_processor(proc)
    try:
        yield
    finally:
        transformer.set_attn_processor(originals)
