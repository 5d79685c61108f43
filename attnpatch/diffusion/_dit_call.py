"""One call of a diffusion transformer, in the VAE's latent layout: :func:`predict`.

This module is the flow loops' only contact with the networks' call signatures; its
:func:`predict` has the contract of ``attnpatch.families``' ``family_of(model).predict`` (the
model-family seam), which will replace it:

``predict(model, latents, timestep, cond, pooled=None, *, guidance=None, added_cond=None)``

* ``latents`` ``(B, C, h, w)`` in the VAE's scaled layout (Flux: packed 2x2 into
  ``(B, h/2 * w/2, 4C)`` and its ``img_ids`` / ``txt_ids`` built here, unpacked on return);
* ``timestep`` a float tensor in the scheduler's units (``scheduler.timesteps``' values: Flux
  gets ``t / 1000``, SD3 ``t``), 0-d or ``(B,)``;
* ``cond`` ``(B, T, D)`` text sequence, ``pooled`` ``(B, P)`` pooled projection;
* ``guidance`` Flux-dev's guidance-embedding scale (a number or a ``(B,)`` tensor; ``None``
  when the transformer's ``guidance_embeds`` is off);
* returns the ``(B, C, h, w)`` velocity, in the model's dtype.

:func:`family_name` says which of the two a model is (``"sd3"`` or ``"flux"``).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from ..errors import InputError, ModelError

__all__ = ["DIT_CLASSES", "family_name", "predict", "pack", "unpack", "image_ids"]

#: diffusers transformer class name -> family.
DIT_CLASSES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}


def family_name(model: Any) -> str:
    """``"sd3"`` or ``"flux"`` for a diffusers transformer (by class, through its MRO);
    :class:`~attnpatch.errors.ModelError` for anything else."""
    for cls in type(model).__mro__:
        if cls.__name__ in DIT_CLASSES:
            return DIT_CLASSES[cls.__name__]
    raise ModelError(
        f"the flow loops run SD3Transformer2DModel or FluxTransformer2DModel, got "
        f"{type(model).__name__}; pass parts.transformer (a UNet runs with ddim_invert / "
        "ddim_denoise)"
    )


def pack(latents: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` -> Flux's ``(B, h/2 * w/2, 4C)`` (``FluxPipeline._pack_latents``)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(packed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Flux's ``(B, h/2 * w/2, 4C)`` -> ``(B, C, h, w)`` (``FluxPipeline._unpack_latents``)."""
    b, _, c4 = packed.shape
    x = packed.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


@functools.lru_cache(maxsize=32)
def image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Flux's ``img_ids`` ``(h/2 * w/2, 3)``: (0, row, column) of each packed token
    (``FluxPipeline._prepare_latent_image_ids``); made once per size, device and dtype (outside
    inference mode, so a later checkpointed call can save it), not per step."""
    with torch.inference_mode(False):
        ids = torch.zeros(h // 2, w // 2, 3)
        ids[..., 1] = ids[..., 1] + torch.arange(h // 2)[:, None]
        ids[..., 2] = ids[..., 2] + torch.arange(w // 2)[None, :]
        return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def _batch(t: torch.Tensor, b: int) -> torch.Tensor:
    return t.expand(b) if t.ndim == 0 else t


def predict(
    model: nn.Module,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    cond: torch.Tensor,
    pooled: torch.Tensor | None = None,
    *,
    guidance: float | torch.Tensor | None = None,
    added_cond: Any = None,
) -> torch.Tensor:
    """The transformer's ``(B, C, h, w)`` velocity at ``latents`` (see the module docstring)."""
    if added_cond is not None:
        raise ModelError(
            f"{type(model).__name__} takes no added_cond (SDXL's added_cond_kwargs are a UNet's); "
            "pass added_cond=None"
        )
    family = family_name(model)
    b, _, h, w = latents.shape
    t = _batch(timestep, b)
    if family == "sd3":
        return model(
            hidden_states=latents,
            timestep=t,
            encoder_hidden_states=cond,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
    g = None
    if model.config.guidance_embeds:
        if guidance is None:
            raise InputError(
                "this Flux transformer embeds a guidance scale (guidance_embeds=True, Flux-dev); "
                "pass guidance=3.5 (FluxPipeline's default guidance_scale)"
            )
        g = torch.as_tensor(guidance, dtype=torch.float32, device=latents.device)
        g = _batch(g, b)
    out = model(
        hidden_states=pack(latents),
        timestep=t.to(latents.dtype) / 1000,
        guidance=g,
        pooled_projections=pooled,
        encoder_hidden_states=cond,
        txt_ids=torch.zeros(cond.shape[1], 3, device=latents.device, dtype=cond.dtype),
        img_ids=image_ids(h, w, latents.device, latents.dtype),
        return_dict=False,
    )[0]
    return unpack(out, h, w)
