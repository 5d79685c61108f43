"""``FluxTransformer2DModel`` (Flux.1 schnell / dev): double- and single-stream blocks.

* layers: ``transformer_blocks.i.attn`` (place ``"joint"``): joint attention over ``[text,
  image]`` (text FIRST, unlike SD3); ``single_transformer_blocks.i.attn`` (place ``"single"``):
  the block concatenates ``[text, image]`` itself and calls its attention with
  ``encoder_hidden_states=None``, so the text length comes from the model call
  (:class:`~attnpatch.families.CallInfo`);
* token grid: the packed latent, ``(h / 2, w / 2)`` of the VAE latent (2x2 patches), read from
  the call's ``img_ids`` (the pipeline's row / column ids);
* processor reproduced: ``FluxAttnProcessor`` (``FluxAttnProcessor2_0`` is a deprecation shim
  that returns one): ``norm_q`` / ``norm_k`` (RMSNorm), rotary embeddings applied after the
  concatenation, ``dispatch_attention_fn``'s default scale ``1/sqrt(d)``, the output split back
  into ``(image, text)`` with ``to_out`` / ``to_add_out`` (single blocks: no projection);
* scheduler family ``"flow"``; call as ``FluxPipeline`` does: packed latents, ``img_ids``,
  ``txt_ids``, ``timestep / 1000``, ``guidance`` for guidance-distilled models (dev).
"""

from __future__ import annotations

import re
import weakref
from typing import Any

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from torch import nn

from ..errors import HookError, InputError
from .base import CallInfo, Family, Grid, Projection, TokenLayout, first, image_grid
from .sd3 import batch_timestep, check_call

__all__ = ["FluxFamily", "pack_latents", "unpack_latents", "image_ids"]

_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.")
_PLACES = {"transformer_blocks": "joint", "single_transformer_blocks": "single"}


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` -> ``(B, h/2 * w/2, 4C)``: ``FluxPipeline._pack_latents``."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, latent: Grid) -> torch.Tensor:
    """``(B, h/2 * w/2, 4C)`` -> ``(B, C, h, w)``: ``FluxPipeline._unpack_latents``."""
    b, _, c4 = packed.shape
    h, w = latent
    x = packed.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


#: grids of ``img_ids`` tensors already seen, by ``id`` (dropped when the tensor dies): the
#: pipelines reuse one ``img_ids`` for every step, so it is read from the device once
_GRIDS: dict[int, Grid | None] = {}


def _remember(ids: torch.Tensor, grid: Grid | None) -> None:
    _GRIDS[id(ids)] = grid
    weakref.finalize(ids, _GRIDS.pop, id(ids), None)


def image_ids(grid: Grid, device: Any, dtype: torch.dtype) -> torch.Tensor:
    """``(h * w, 3)`` ids ``(0, row, col)``: ``FluxPipeline._prepare_latent_image_ids``."""
    h, w = grid
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w)[None, :]
    ids = ids.reshape(h * w, 3).to(device=device, dtype=dtype)
    _remember(ids, (h, w))
    return ids


def _grid_of(ids: Any, tokens: int) -> Grid | None:
    """The image-token grid from the pipeline's ``img_ids`` (its last row is ``(0, h-1,
    w-1)``); ``None`` on the meta device or for ids of another layout."""
    if not isinstance(ids, torch.Tensor) or ids.shape[-2] != tokens:
        return None
    if id(ids) in _GRIDS:
        return _GRIDS[id(ids)]
    grid = None
    if ids.device.type != "meta" and ids.shape[-1] == 3:
        last = ids.reshape(-1, 3)[-1].tolist()
        h, w = int(last[1]) + 1, int(last[2]) + 1
        grid = (h, w) if h * w == tokens else None
    _remember(ids, grid)
    return grid


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.unflatten(-1, (-1, head_dim))  # (B, S, heads, d), Flux's layout


class FluxFamily(Family):
    """Flux.1 (``FluxTransformer2DModel``)."""

    name = "flux"
    scheduler = "flow"
    places = ("joint", "single")
    model_classes = ("FluxTransformer2DModel",)
    processors = (FluxAttnProcessor,)
    convention = "rotary"

    def place(self, name: str) -> tuple[str, int]:
        m = _BLOCK.match(name)
        return (_PLACES[m.group(1)], int(m.group(2))) if m else ("other", 0)

    def call_info(self, model: nn.Module, args: tuple, kwargs: dict) -> CallInfo:
        x = first(args, kwargs, 0, "hidden_states")
        text = first(args, kwargs, 1, "encoder_hidden_states")
        grid = None
        if isinstance(x, torch.Tensor) and x.ndim == 3:
            ids = first(args, kwargs, 4, "img_ids")
            grid = _grid_of(ids, x.shape[1]) or image_grid(x.shape[1], None)
        latent = None if grid is None else (2 * grid[0], 2 * grid[1])
        n_text = int(text.shape[1]) if isinstance(text, torch.Tensor) and text.ndim == 3 else None
        return CallInfo(latent=latent, grid=grid, text=n_text)

    def layout(
        self, name: str, hidden_states: torch.Tensor, encoder_hidden_states: Any, call: CallInfo
    ) -> TokenLayout:
        if encoder_hidden_states is not None:  # double-stream: [text, image]
            t, n = encoder_hidden_states.shape[1], hidden_states.shape[1]
        else:  # single-stream: the block concatenated [text, image] itself
            if call.text is None:
                raise HookError(
                    f"{name} is a Flux single-stream layer: its text length is known only from "
                    "the transformer's call; run the transformer under attnpatch.hijack"
                )
            t = call.text
            n = hidden_states.shape[1] - t
        return TokenLayout("joint", (t, t + n), (0, t), image_grid(n, call.grid))

    def project(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Any,
        attention_mask: torch.Tensor | None,
        extra: dict[str, Any],
    ) -> Projection:
        processor = attn.processor
        while hasattr(processor, "original"):  # the controlled chain: the original's settings
            processor = processor.original
        if getattr(processor, "_parallel_config", None) is not None:
            raise HookError(
                "attnpatch cannot read attention of a Flux layer under context parallelism; "
                "exclude it in your controller's needs()"
            )
        # FluxAttnProcessor up to its dispatch_attention_fn call, layout (B, S, heads, d)
        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = (
                attn.to_q(hidden_states),
                attn.to_k(hidden_states),
                attn.to_v(hidden_states),
            )
        d = attn.head_dim
        query, key, value = _heads(query, d), _heads(key, d), _heads(value, d)
        query, key = attn.norm_q(query), attn.norm_k(key)
        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if joint:
            if attn.fused_projections:
                e_q, e_k, e_v = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
            else:
                e_q = attn.add_q_proj(encoder_hidden_states)
                e_k = attn.add_k_proj(encoder_hidden_states)
                e_v = attn.add_v_proj(encoder_hidden_states)
            e_q, e_k, e_v = _heads(e_q, d), _heads(e_k, d), _heads(e_v, d)
            e_q, e_k = attn.norm_added_q(e_q), attn.norm_added_k(e_k)
            query = torch.cat([e_q, query], dim=1)
            key = torch.cat([e_k, key], dim=1)
            value = torch.cat([e_v, value], dim=1)
        rotary = extra.get("image_rotary_emb")
        if rotary is not None:
            query = apply_rotary_emb(query, rotary, sequence_dim=1)
            key = apply_rotary_emb(key, rotary, sequence_dim=1)
        out_dtype = query.dtype
        mask = attention_mask
        if mask is not None:  # dispatch_attention_fn: (B, S_k) or broadcastable; bool or additive
            if mask.ndim == 2:
                mask = mask[:, None, None, :]
            if mask.dtype == torch.bool:
                mask = torch.zeros(mask.shape, dtype=out_dtype, device=mask.device).masked_fill(
                    ~mask, float("-inf")
                )
        n_text = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else 0

        def finish(out: torch.Tensor) -> Any:
            out = out.transpose(1, 2).flatten(2, 3).to(out_dtype)  # (B, S, heads * d)
            if encoder_hidden_states is None:
                return out
            text, image = out[:, :n_text], out[:, n_text:]
            image = attn.to_out[1](attn.to_out[0](image.contiguous()))
            return image, attn.to_add_out(text.contiguous())

        return Projection(
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            scale=d**-0.5,
            finish=finish,
            mask=mask,
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
        """``FluxPipeline``'s transformer call on unpacked latents: the 2x2 packing, ``img_ids``
        / ``txt_ids`` and ``timestep / 1000`` happen here; flow velocity ``(B, C, h, w)``."""
        check_call("Flux", latents, cond, pooled, model.config.in_channels // 4)
        if added_cond is not None:
            raise InputError("Flux takes no added_cond= (that is a UNet's SDXL conditioning)")
        b, _, h, w = latents.shape
        if h % 2 or w % 2:
            raise InputError(
                f"Flux latents must have even sides (2x2 packing), got {(h, w)}; make the image "
                "a multiple of 16 px"
            )
        distilled = bool(model.config.guidance_embeds)
        if distilled and guidance is None:
            raise InputError(
                "this Flux model is guidance-distilled (guidance_embeds=True, e.g. Flux-dev): "
                "pass guidance=<scale>, e.g. 3.5"
            )
        if not distilled and guidance is not None:
            raise InputError(
                "this Flux model has no guidance embedding (guidance_embeds=False, e.g. "
                "schnell): pass guidance=None"
            )
        g = None
        if guidance is not None:
            g = batch_timestep(torch.as_tensor(guidance, dtype=torch.float32), b, latents)
        t = batch_timestep(timestep, b, latents).to(latents.dtype)
        out = model(
            hidden_states=pack_latents(latents),
            timestep=t / 1000,
            guidance=g,
            pooled_projections=pooled,
            encoder_hidden_states=cond,
            txt_ids=torch.zeros(cond.shape[1], 3, device=cond.device, dtype=cond.dtype),
            img_ids=image_ids((h // 2, w // 2), latents.device, cond.dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out, (h, w))

    def latent_multiple(self, model: nn.Module) -> int:
        """2: the latents are packed 2x2 into tokens."""
        return 2

    def default_guidance(self, model: nn.Module) -> float | None:
        """3.5 (``FluxPipeline``'s ``guidance_scale``) on guidance-distilled models (dev),
        ``None`` without a guidance embedding (schnell)."""
        return 3.5 if model.config.get("guidance_embeds", False) else None

    def example_call(self, model: nn.Module, latent: Grid, *, batch: int = 1, text_len: int = 77):
        config = model.config
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
        grid = (latent[0] // 2, latent[1] // 2)
        x = torch.zeros(batch, grid[0] * grid[1], config.in_channels, device=device, dtype=dtype)
        text = torch.zeros(batch, text_len, config.joint_attention_dim, device=device, dtype=dtype)
        pooled = torch.zeros(batch, config.pooled_projection_dim, device=device, dtype=dtype)
        kwargs: dict[str, Any] = dict(
            hidden_states=x,
            encoder_hidden_states=text,
            pooled_projections=pooled,
            timestep=torch.ones(batch, device=device, dtype=dtype),
            txt_ids=torch.zeros(text_len, 3, device=device, dtype=dtype),
            img_ids=image_ids(grid, device, dtype),
        )
        if config.guidance_embeds:
            kwargs["guidance"] = torch.ones(batch, device=device)
        return lambda: model(**kwargs)

    def default_latent(self, model: nn.Module) -> Grid:
        """Flux configs have no ``sample_size``: 128 (1024 px, Flux's native size)."""
        return (128, 128)
