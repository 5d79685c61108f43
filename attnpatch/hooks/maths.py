"""The maths the controlled processors share: the probabilities, the float16 boundary, and
the saved-tensor rule that makes any controller checkpoint-safe."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from ..families import Projection

__all__ = [
    "attention_probs",
    "projection_probs",
    "softmax_probs",
    "half_cast",
    "FP16_GRAD_SCALE",
    "own_saved_tensors",
]


def attention_probs(
    attn: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """softmax(Q Kᵀ · attn.scale + mask) as diffusers' ``Attention.get_attention_scores`` does.

    Args:
        query: ``(B, heads, L, d)``; key: ``(B, heads, S, d)``.
        attention_mask: additive, broadcastable to ``(B, heads, L, S)``.
        dtype: the result's dtype (default: the query's). ``torch.float32`` computes the
            scores and the softmax in float32, outside any autocast region.

    Returns:
        ``(B, heads, L, S)`` rows summing to 1; ``upcast_attention`` computes the scores in
        float32, ``upcast_softmax`` the softmax.
    """
    return softmax_probs(
        query,
        key,
        attn.scale,
        attention_mask,
        upcast_attention=attn.upcast_attention,
        upcast_softmax=attn.upcast_softmax,
        dtype=dtype,
    )


def softmax_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None = None,
    *,
    upcast_attention: bool = False,
    upcast_softmax: bool = False,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """softmax(Q Kᵀ · scale + mask): ``(B, heads, L, S)`` in ``dtype`` (default: the
    query's; ``torch.float32`` computes scores and softmax in float32, outside autocast)."""
    out_dtype = query.dtype if dtype is None else dtype
    full = upcast_attention or out_dtype == torch.float32
    device = query.device.type
    no_autocast = full and torch.is_autocast_enabled(device)
    with torch.autocast(device, enabled=False) if no_autocast else contextlib.nullcontext():
        if full:
            query, key = half_cast(query, torch.float32), half_cast(key, torch.float32)
        scores = torch.matmul(query, key.transpose(-1, -2)) * scale
        if mask is not None:
            scores = scores + mask
        if upcast_softmax or out_dtype == torch.float32:
            scores = scores.float()
        return scores.softmax(dim=-1).to(out_dtype)


def projection_probs(proj: Projection) -> torch.Tensor:
    """The probabilities of a family's :class:`~attnpatch.families.Projection`: float32 when
    the layer runs in half precision (what a controller reads keeps float32 precision)."""
    half = proj.query.dtype in (torch.float16, torch.bfloat16)
    return softmax_probs(
        proj.query,
        proj.key,
        proj.scale,
        proj.mask,
        upcast_attention=proj.upcast_attention,
        upcast_softmax=proj.upcast_softmax,
        dtype=torch.float32 if half else None,
    )


#: Gradients crossing into a float16 region are multiplied by this, and divided by it where
#: they leave (see :func:`half_cast`): float16's smallest normal number is 6e-5, and the
#: gradients of attention losses through a UNet are often far below it (they would flush to
#: zero). bfloat16 has float32's range and is not scaled.
FP16_GRAD_SCALE = 1024.0


class _HalfBoundary(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dtype: torch.dtype, factor: float) -> torch.Tensor:
        ctx.source, ctx.factor = x.dtype, factor
        return x.to(dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        return (grad.float() * ctx.factor).to(ctx.source), None, None


def half_cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)``; across a float16 boundary the gradient is rescaled on the way back.

    Into float16 (an input of a float16 UNet): the gradient leaving the half region is divided
    by :data:`FP16_GRAD_SCALE`; out of float16 (its output, or probabilities upcast for a
    controller): the gradient entering it is multiplied. Values are unchanged and gradients
    outside the half region are the true ones, while inside it they stay clear of float16's
    underflow. Other casts are plain.
    """
    if x.dtype == dtype:
        return x
    if not (x.requires_grad and torch.is_grad_enabled()):
        return x.to(dtype)
    if dtype == torch.float16:
        return _HalfBoundary.apply(x, dtype, 1.0 / FP16_GRAD_SCALE)
    if x.dtype == torch.float16:
        return _HalfBoundary.apply(x, dtype, FP16_GRAD_SCALE)
    return x.to(dtype)


def _keep(x: torch.Tensor) -> torch.Tensor:
    return x


def own_saved_tensors() -> torch.autograd.graph.saved_tensors_hooks:
    """Around a controller call: what its ops save for backward is kept as they save it,
    outside any activation checkpoint's bookkeeping.

    A checkpoint counts the tensors saved inside the region in the forward pass and expects the
    recompute to save the same ones; an observer records in the forward pass and not while
    ``recomputing``, so anything its recording saves (``amax``, ``square()``, ``exp()``) would
    break that count (``CheckpointError: A different number of tensors was saved``). Inside this
    block the innermost saved-tensor hooks are identities, so those tensors are never counted:
    in the forward pass they are kept for backward (as without checkpointing), and during a
    recompute whatever a controller computes is outside the count too. Editors stay exact: the
    edited probabilities are saved by ``probs @ V``, outside the block, and recomputed.
    """
    return torch.autograd.graph.saved_tensors_hooks(_keep, _keep)
