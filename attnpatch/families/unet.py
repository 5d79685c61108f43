"""``UNet2DConditionModel`` (SD 1.x, 2.x, SDXL): attention in down / mid / up blocks.

* layers: every ``Attention`` module; ``attn1`` is self-attention, ``attn2`` cross-attention
  (a layer is cross when it receives ``encoder_hidden_states``: the text);
* places from the module path: ``down_blocks.i`` / ``mid_block`` / ``up_blocks.i``;
* resolution of a layer: the latent size halved ``k`` times (stride-2 convolutions round up),
  the ``k`` whose product is the layer's query length (:func:`infer_resolution`);
* processors reproduced: ``AttnProcessor``, ``AttnProcessor2_0``, ``FusedAttnProcessor2_0``
  (``attn.scale``, ``upcast_attention`` / ``upcast_softmax``, masks, group / spatial norms,
  ``norm_cross``, residual and rescale settings);
* scheduler family ``"ddim"``; call ``unet(latents, t, encoder_hidden_states=cond,
  added_cond_kwargs=...)``.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from diffusers.models.attention_processor import (
    AttnProcessor,
    AttnProcessor2_0,
    FusedAttnProcessor2_0,
)
from torch import nn

from ..errors import HookError, InputError
from .base import CallInfo, Family, Grid, Projection, TokenLayout, first

__all__ = ["UNetFamily", "infer_resolution"]

_PLACE = re.compile(r"^(down_blocks|up_blocks|mid_block)(?:\.(\d+))?")
_PLACES = {"down_blocks": "down", "up_blocks": "up", "mid_block": "mid"}


def infer_resolution(query_len: int, latent_hw: Grid | None) -> Grid | None:
    """Spatial ``(h, w)`` of a UNet layer with ``query_len`` tokens for a latent ``latent_hw``:
    ``(ceil(H / 2**k), ceil(W / 2**k))`` for the ``k`` whose product is ``query_len``; without
    a latent size only square layouts are found; ``None`` if nothing fits.

    >>> infer_resolution(192, (32, 24))
    (16, 12)
    """
    if latent_hw is not None:
        h0, w0 = latent_hw
        for k in range(12):
            f = 2**k
            h, w = -(-h0 // f), -(-w0 // f)
            if h * w == query_len:
                return (h, w)
            if h == 1 and w == 1:
                break
    side = math.isqrt(query_len)
    if side * side == query_len:
        return (side, side)
    return None


class UNetFamily(Family):
    """Stable Diffusion UNets (``UNet2DConditionModel``)."""

    name = "unet"
    scheduler = "ddim"
    places = ("down", "mid", "up")
    model_classes = ("UNet2DConditionModel",)
    processors = (AttnProcessor, AttnProcessor2_0, FusedAttnProcessor2_0)
    convention = "attention"

    def place(self, name: str) -> tuple[str, int]:
        m = _PLACE.match(name)
        if m is None:
            return "other", 0
        return _PLACES[m.group(1)], int(m.group(2) or 0)

    def call_info(self, model: nn.Module, args: tuple, kwargs: dict) -> CallInfo:
        sample = first(args, kwargs, 0, "sample")
        latent = None
        if sample is not None and getattr(sample, "ndim", 0) == 4:
            latent = (int(sample.shape[-2]), int(sample.shape[-1]))
        text = first(args, kwargs, 2, "encoder_hidden_states")
        n_text = int(text.shape[1]) if isinstance(text, torch.Tensor) and text.ndim == 3 else None
        return CallInfo(latent=latent, grid=latent, text=n_text)

    def layout(
        self, name: str, hidden_states: torch.Tensor, encoder_hidden_states: Any, call: CallInfo
    ) -> TokenLayout:
        if hidden_states.ndim == 4:
            query_len = hidden_states.shape[2] * hidden_states.shape[3]
            resolution: Grid | None = (hidden_states.shape[2], hidden_states.shape[3])
        else:
            query_len = hidden_states.shape[1]
            resolution = infer_resolution(query_len, call.latent)
        ehs = encoder_hidden_states
        if isinstance(ehs, (tuple, list)):  # IP-Adapter: (text, [image embeds])
            ehs = ehs[0]
        if ehs is None:
            return TokenLayout("self", (0, query_len), None, resolution)
        return TokenLayout("cross", (0, query_len), (0, ehs.shape[1]), resolution)

    def project(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Any,
        attention_mask: torch.Tensor | None,
        extra: dict[str, Any],
    ) -> Projection:
        if isinstance(encoder_hidden_states, (tuple, list)):
            raise HookError(
                "an attention layer received a tuple of encoder_hidden_states (an IP-Adapter's "
                "image embeddings); attnpatch cannot read that attention correctly. Unload the "
                "IP-Adapter, or exclude its cross-attention layers in your controller's needs()"
            )
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, extra.get("temb"))
        input_ndim = hidden_states.ndim
        channel = height = width = 0
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
        out_dtype = query.dtype

        def finish(out: torch.Tensor) -> torch.Tensor:
            out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(out_dtype)
            out = attn.to_out[0](out)
            out = attn.to_out[1](out)
            if input_ndim == 4:
                out = out.transpose(-1, -2).reshape(batch, channel, height, width)
            if attn.residual_connection:
                out = out + residual
            return out / attn.rescale_output_factor

        return Projection(
            query,
            key,
            value,
            scale=attn.scale,
            finish=finish,
            mask=attention_mask,
            upcast_attention=attn.upcast_attention,
            upcast_softmax=attn.upcast_softmax,
        )

    def predict(
        self,
        model: nn.Module,
        latents: torch.Tensor,
        timestep: torch.Tensor | float,
        cond: torch.Tensor,
        pooled: torch.Tensor | None = None,
        *,
        guidance: float | torch.Tensor | None = None,
        added_cond: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``unet(latents, t, encoder_hidden_states=cond, added_cond_kwargs=added_cond)``: eps
        ``(B, C, h, w)``. SDXL's pooled embeddings go in ``added_cond`` (``text_embeds``)."""
        if pooled is not None:
            raise InputError(
                "a UNet takes pooled text embeddings through added_cond={'text_embeds': pooled, "
                "'time_ids': ...} (SDXL), not pooled="
            )
        if guidance is not None:
            raise InputError(
                "a UNet has no guidance embedding; guidance= is for guidance-distilled "
                "transformers (Flux-dev); apply classifier-free guidance to the outputs"
            )
        kwargs: dict[str, Any] = {}
        if added_cond is not None:
            kwargs["added_cond_kwargs"] = dict(added_cond)
        return model(latents, timestep, encoder_hidden_states=cond, return_dict=False, **kwargs)[0]

    def example_call(self, model: nn.Module, latent: Grid, *, batch: int = 1, text_len: int = 77):
        config = model.config
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
        h, w = latent
        sample = torch.zeros(batch, config.in_channels, h, w, device=device, dtype=dtype)
        text = torch.zeros(batch, text_len, config.cross_attention_dim, device=device, dtype=dtype)
        kwargs: dict[str, Any] = {}
        if config.addition_embed_type == "text_time":
            pooled = (
                config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
            )
            kwargs["added_cond_kwargs"] = {
                "text_embeds": torch.zeros(batch, pooled, device=device, dtype=dtype),
                "time_ids": torch.zeros(batch, 6, device=device, dtype=dtype),
            }
        timestep = torch.tensor(1, device=device)
        return lambda: model(sample, timestep, text, **kwargs)
