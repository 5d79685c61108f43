"""``SD3Transformer2DModel`` (SD3, SD3.5): MMDiT joint attention.

* layers: ``transformer_blocks.i.attn`` (place ``"joint"``, block ``i``): one attention over
  the concatenated sequence ``[image, text]`` (queries, keys and values of both streams);
  SD3.5's ``transformer_blocks.i.attn2`` (the blocks in ``dual_attention_layers``): image-only
  self-attention, place ``"joint"``, block ``i``. In diffusers ``attn`` and ``attn2`` of one
  block share ONE processor object; ``hijack`` installs one controlled processor per module and
  puts the shared object back on both;
* token grid: latent / ``patch_size`` (positions are added in ``PatchEmbed``; no rotary);
* processor reproduced: ``JointAttnProcessor2_0`` (SDPA's default scale ``1/sqrt(d)``;
  ``norm_q`` / ``norm_k`` / ``norm_added_q`` / ``norm_added_k``; the output split back into
  ``(image, text)``, ``to_add_out`` unless ``context_pre_only``);
* scheduler family ``"flow"``; call ``transformer(hidden_states=latents, timestep=t (B,),
  encoder_hidden_states=cond, pooled_projections=pooled)`` with ``t`` in the scheduler's units
  (0..1000), as ``StableDiffusion3Pipeline`` does.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from diffusers.models.attention_processor import JointAttnProcessor2_0
from torch import nn

from ..errors import InputError
from .base import CallInfo, Family, Grid, Projection, TokenLayout, first, image_grid

__all__ = ["SD3Family"]

_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.")


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, S, heads * d)`` -> ``(B, heads, S, d)``."""
    return x.view(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2)


def batch_timestep(timestep: torch.Tensor | float, batch: int, like: torch.Tensor) -> torch.Tensor:
    """A scheduler timestep (0-d, ``(1,)`` or ``(B,)``) as a ``(B,)`` tensor on ``like``'s
    device (the pipelines' ``t.expand(B)``)."""
    t = torch.as_tensor(timestep, device=like.device)
    if t.ndim == 0:
        t = t[None]
    if t.ndim != 1 or t.shape[0] not in (1, batch):
        raise InputError(
            f"timestep must be a number, a 0-d tensor or a (B,) tensor with B = {batch}, got "
            f"shape {tuple(t.shape)}"
        )
    return t.expand(batch)


def check_call(family: str, latents: Any, cond: Any, pooled: Any, channels: int) -> None:
    """Shapes of ``predict``'s inputs, checked before the model runs."""
    if not isinstance(latents, torch.Tensor) or latents.ndim != 4:
        got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents)
        raise InputError(f"{family} predict needs latents (B, C, h, w), got {got}")
    if latents.shape[1] != channels:
        raise InputError(
            f"{family} predict: latents have {latents.shape[1]} channels, the model takes "
            f"{channels} (the VAE's latent channels)"
        )
    if not isinstance(cond, torch.Tensor) or cond.ndim != 3:
        raise InputError(f"{family} predict needs cond (B, T, D) text embeddings")
    if pooled is None or not isinstance(pooled, torch.Tensor) or pooled.ndim != 2:
        raise InputError(
            f"{family} predict needs pooled (B, P) text embeddings (encode_prompt(...).pooled)"
        )


class SD3Family(Family):
    """Stable Diffusion 3 / 3.5 (``SD3Transformer2DModel``)."""

    name = "sd3"
    scheduler = "flow"
    places = ("joint",)
    model_classes = ("SD3Transformer2DModel",)
    processors = (JointAttnProcessor2_0,)
    convention = "attention"

    def place(self, name: str) -> tuple[str, int]:
        m = _BLOCK.match(name)
        return ("joint", int(m.group(1))) if m else ("other", 0)

    def call_info(self, model: nn.Module, args: tuple, kwargs: dict) -> CallInfo:
        x = first(args, kwargs, 0, "hidden_states")
        text = first(args, kwargs, 1, "encoder_hidden_states")
        latent = grid = None
        if isinstance(x, torch.Tensor) and x.ndim == 4:
            latent = (int(x.shape[-2]), int(x.shape[-1]))
            p = int(model.config.patch_size)
            grid = (latent[0] // p, latent[1] // p)
        n_text = int(text.shape[1]) if isinstance(text, torch.Tensor) and text.ndim == 3 else None
        return CallInfo(latent=latent, grid=grid, text=n_text)

    def layout(
        self, name: str, hidden_states: torch.Tensor, encoder_hidden_states: Any, call: CallInfo
    ) -> TokenLayout:
        n = hidden_states.shape[1]
        resolution = image_grid(n, call.grid)
        if encoder_hidden_states is None:  # attn2 (SD3.5), or a single block: image only
            return TokenLayout("self", (0, n), None, resolution)
        t = encoder_hidden_states.shape[1]
        return TokenLayout("joint", (0, n), (n, n + t), resolution)

    def project(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Any,
        attention_mask: torch.Tensor | None,
        extra: dict[str, Any],
    ) -> Projection:
        # JointAttnProcessor2_0, up to its SDPA call (the mask is ignored there too)
        heads, n = attn.heads, hidden_states.shape[1]
        query = _heads(attn.to_q(hidden_states), heads)
        key = _heads(attn.to_k(hidden_states), heads)
        value = _heads(attn.to_v(hidden_states), heads)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        joint = encoder_hidden_states is not None
        if joint:
            e_query = _heads(attn.add_q_proj(encoder_hidden_states), heads)
            e_key = _heads(attn.add_k_proj(encoder_hidden_states), heads)
            e_value = _heads(attn.add_v_proj(encoder_hidden_states), heads)
            if attn.norm_added_q is not None:
                e_query = attn.norm_added_q(e_query)
            if attn.norm_added_k is not None:
                e_key = attn.norm_added_k(e_key)
            query = torch.cat([query, e_query], dim=2)
            key = torch.cat([key, e_key], dim=2)
            value = torch.cat([value, e_value], dim=2)
        out_dtype = query.dtype

        def finish(out: torch.Tensor) -> Any:
            out = out.transpose(1, 2).reshape(out.shape[0], -1, out.shape[1] * out.shape[-1])
            out = out.to(out_dtype)
            text = None
            if joint:
                out, text = out[:, :n], out[:, n:]
                if not attn.context_pre_only:
                    text = attn.to_add_out(text)
            out = attn.to_out[0](out)
            out = attn.to_out[1](out)
            return (out, text) if joint else out

        return Projection(query, key, value, scale=query.shape[-1] ** -0.5, finish=finish)

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
        """``StableDiffusion3Pipeline``'s transformer call: flow velocity ``(B, C, h, w)``."""
        check_call("SD3", latents, cond, pooled, model.config.in_channels)
        if guidance is not None or added_cond is not None:
            raise InputError(
                "SD3 takes neither guidance= (no guidance embedding; apply classifier-free "
                "guidance to the outputs) nor added_cond= (a UNet's SDXL conditioning)"
            )
        p = model.config.patch_size
        if latents.shape[-2] % p or latents.shape[-1] % p:
            raise InputError(
                f"SD3 latents must be multiples of the patch size {p}, got "
                f"{tuple(latents.shape[-2:])}; make the image a multiple of {p * 8} px"
            )
        t = batch_timestep(timestep, latents.shape[0], latents)
        return model(
            hidden_states=latents,
            timestep=t,
            encoder_hidden_states=cond,
            pooled_projections=pooled,
            return_dict=False,
        )[0]

    def latent_multiple(self, model: nn.Module) -> int:
        """The patch size (``config.patch_size``, 2 for every public SD3 / SD3.5)."""
        return int(model.config.patch_size)

    def example_call(self, model: nn.Module, latent: Grid, *, batch: int = 1, text_len: int = 77):
        config = model.config
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
        x = torch.zeros(batch, config.in_channels, *latent, device=device, dtype=dtype)
        text = torch.zeros(batch, text_len, config.joint_attention_dim, device=device, dtype=dtype)
        pooled = torch.zeros(batch, config.pooled_projection_dim, device=device, dtype=dtype)
        t = torch.ones(batch, device=device)
        return lambda: model(
            hidden_states=x, timestep=t, encoder_hidden_states=text, pooled_projections=pooled
        )
