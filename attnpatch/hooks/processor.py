"""The diffusers attention processor that a controller drives.

:class:`ControlledAttnProcessor` is installed on one attention layer by :func:`attnpatch.hijack`.
On every call it builds the layer's :class:`~attnpatch.AttnSite` and asks the controller whether
it ``needs`` it:

* no  -> the original processor runs unchanged (``AttnProcessor2_0``'s
  ``F.scaled_dot_product_attention`` in a default UNet): no probabilities are materialised;
* yes -> the probabilities softmax(QKᵀ·scale) are computed explicitly (in float32 when the
  layer runs in half precision or under autocast: the controller then gets float32, and the
  product with V runs in V's dtype), honouring ``attn.scale``, ``upcast_attention`` /
  ``upcast_softmax``, attention masks, group/spatial norms and the residual / rescale settings,
  handed to the controller, and the probabilities it returns are multiplied with V.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import torch
from diffusers.models.attention_processor import (
    Attention,
    AttnProcessor,
    AttnProcessor2_0,
    FusedAttnProcessor2_0,
)

from ..errors import AttnPatchError
from .controllers.base import AttentionControl
from .site import AttnSite, Resolution, infer_resolution, parse_place

__all__ = ["ControlledAttnProcessor", "HijackState", "attention_probs"]

# Processors whose computation the explicit path reproduces exactly (up to float rounding).
_REPRODUCIBLE: tuple[type, ...] = (AttnProcessor, AttnProcessor2_0, FusedAttnProcessor2_0)


class HijackState:
    """What the processors of one hijack share: the controller, and the latent size of the
    current UNet call (set by the hijack's pre-hook; it fixes the (h, w) of every site)."""

    def __init__(self, controller: AttentionControl):
        self.controller = controller
        self.latent_hw: Resolution | None = None


def attention_probs(
    attn: Attention,
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
    out_dtype = query.dtype if dtype is None else dtype
    full = attn.upcast_attention or out_dtype == torch.float32
    device = query.device.type
    no_autocast = full and torch.is_autocast_enabled(device)
    with torch.autocast(device, enabled=False) if no_autocast else contextlib.nullcontext():
        if full:
            query, key = half_cast(query, torch.float32), half_cast(key, torch.float32)
        scores = torch.matmul(query, key.transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            scores = scores + attention_mask
        if attn.upcast_softmax or out_dtype == torch.float32:
            scores = scores.float()
        return scores.softmax(dim=-1).to(out_dtype)


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


def _own_saved_tensors() -> torch.autograd.graph.saved_tensors_hooks:
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


_ACCEPTED: dict[type, frozenset[str]] = {}


def _accepted_kwargs(processor: Any) -> frozenset[str]:
    """Which of the standard keyword arguments ``processor.__call__`` names (``"*"``: any)."""
    cls = type(processor)
    cached = _ACCEPTED.get(cls)
    if cached is None or "__call__" in getattr(processor, "__dict__", {}):
        params = inspect.signature(processor.__call__).parameters
        names = {k for k in ("encoder_hidden_states", "attention_mask", "temb") if k in params}
        if any(p.kind == p.VAR_KEYWORD for p in params.values()):
            names.add("*")
        cached = frozenset(names)
        if "__call__" not in getattr(processor, "__dict__", {}):
            _ACCEPTED[cls] = cached
    return cached


class ControlledAttnProcessor(AttnProcessor2_0):
    """An ``AttnProcessor2_0`` whose attention probabilities a controller can read and edit.

    Args:
        controller: the :class:`~attnpatch.AttentionControl` to consult.
        name: the attention module's path in the UNet (becomes ``AttnSite.name``).
        original: the processor it replaces; runs every call the controller does not need.
            A ``ControlledAttnProcessor`` of an enclosing hijack is chained: its controller
            still sees (and edits first) the layers it needs.
        state: the :class:`HijackState` shared by the processors of one hijack.
    """

    def __init__(
        self,
        controller: AttentionControl,
        *,
        name: str,
        original: Any = None,
        state: HijackState | None = None,
    ):
        super().__init__()
        if not isinstance(controller, AttentionControl):
            raise AttnPatchError(
                f"controller must be an attnpatch.AttentionControl, got {type(controller).__name__}"
            )
        self.controller = controller
        self.name = name
        self.original = original if original is not None else AttnProcessor2_0()
        self.state = state if state is not None else HijackState(controller)
        self.place, self.block = parse_place(name)
        self._sites: dict[tuple[Any, ...], AttnSite] = {}
        self._original_takes = _accepted_kwargs(self.original)

    # -- sites ------------------------------------------------------------------------------
    def site(
        self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: Any = None
    ) -> AttnSite:
        """The :class:`AttnSite` of this call (cached per input geometry)."""
        if hidden_states.ndim == 4:
            query_len = hidden_states.shape[2] * hidden_states.shape[3]
        else:
            query_len = hidden_states.shape[1]
        ehs = encoder_hidden_states
        if isinstance(ehs, (tuple, list)):
            ehs = ehs[0]
        is_cross = ehs is not None
        key_len = ehs.shape[1] if is_cross else query_len
        latent_hw = self.state.latent_hw
        cache_key = (query_len, key_len, latent_hw, is_cross)  # one processor per layer
        site = self._sites.get(cache_key)
        if site is None:
            if hidden_states.ndim == 4:
                resolution = (hidden_states.shape[2], hidden_states.shape[3])
            else:
                try:
                    resolution = infer_resolution(query_len, latent_hw)
                except AttnPatchError:  # outside hijack, non-square: layout unknown
                    resolution = None
            site = AttnSite(
                name=self.name,
                place=self.place,
                block=self.block,
                is_cross=is_cross,
                heads=attn.heads,
                query_len=query_len,
                key_len=key_len,
                resolution=resolution,
            )
            self._sites[cache_key] = site
        return site

    # -- the call ---------------------------------------------------------------------------
    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        site = self.site(attn, hidden_states, encoder_hidden_states)
        if not self.controller.needs(site):
            return self._run_original(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, args, kwargs
            )
        return self._run_controlled(
            attn, hidden_states, encoder_hidden_states, attention_mask, temb, site
        )

    def _run_original(self, attn, hidden_states, encoder_hidden_states, mask, temb, args, kwargs):
        passed = {"encoder_hidden_states": encoder_hidden_states, "attention_mask": mask}
        if temb is not None:
            passed["temb"] = temb
        if "*" not in self._original_takes:
            passed = {k: v for k, v in passed.items() if k in self._original_takes}
        return self.original(attn, hidden_states, *args, **passed, **kwargs)

    def _edit(self, probs: torch.Tensor, site: AttnSite) -> torch.Tensor:
        """Enclosing hijacks' controllers first, then this one."""
        outer = self.original
        if isinstance(outer, ControlledAttnProcessor):
            probs = outer._edit(probs, site)
        if self.controller.needs(site):
            given = probs
            with _own_saved_tensors():
                probs = self.controller(given, site)
            if not isinstance(probs, torch.Tensor) or probs.shape != given.shape:
                got = tuple(probs.shape) if isinstance(probs, torch.Tensor) else type(probs)
                raise AttnPatchError(
                    f"{type(self.controller).__name__} returned {got} at {site.name}; a controller "
                    f"must return probabilities of the shape it received {tuple(given.shape)}"
                )
            # an edit (not the tensor it was given) is checked once: NaN would spread silently
            if probs is not given and not bool(torch.isfinite(probs.detach()).all()):
                raise AttnPatchError(
                    f"{type(self.controller).__name__} returned NaN or Inf probabilities at "
                    f"{site.name}; check its edit (e.g. a division by a zero sum)"
                )
        return probs

    def _base_processor(self) -> Any:
        proc = self.original
        while isinstance(proc, ControlledAttnProcessor):
            proc = proc.original
        return proc

    def _run_controlled(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        temb: torch.Tensor | None,
        site: AttnSite,
    ) -> torch.Tensor:
        base = self._base_processor()
        if not isinstance(base, _REPRODUCIBLE):
            raise AttnPatchError(
                f"layer {self.name} runs {type(base).__name__}, whose computation attnpatch cannot "
                "reproduce while reading its attention; restore a standard processor "
                "(unet.set_attn_processor(AttnProcessor2_0())) or exclude this layer in "
                "your controller's needs()"
            )
        if isinstance(encoder_hidden_states, (tuple, list)):
            raise AttnPatchError(
                f"layer {self.name} received a tuple of encoder_hidden_states (an IP-Adapter's "
                "image embeddings); attnpatch cannot read that attention correctly. Unload the "
                "IP-Adapter, or exclude its cross-attention layers in your controller's needs()"
            )
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, seq_len, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # (B, heads, L, S); fp32 under half precision: what the controller reads (and the
        # losses on it) keeps fp32 precision, the product with V runs in V's dtype
        half = query.dtype in (torch.float16, torch.bfloat16)
        probs = attention_probs(
            attn, query, key, attention_mask, dtype=torch.float32 if half else None
        )
        probs = self._edit(probs, site)
        hidden_states = torch.matmul(half_cast(probs, value.dtype), value)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    #: :func:`half_cast`, the gradient-scaled cast at float16 boundaries (the DDIM loop uses
    #: it at the UNet's inputs and output, so one rule holds on both sides)
    half_cast = staticmethod(half_cast)

    def __repr__(self) -> str:
        return (
            f"ControlledAttnProcessor(name={self.name!r}, controller={type(self.controller).__name__}, "
            f"original={type(self.original).__name__})"
        )
