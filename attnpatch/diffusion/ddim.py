"""Differentiable DDIM inversion and denoising (the attention loss's path through the UNet).

Let ``t_0 > t_1 > ... > t_{N-1}`` be the DDIM timesteps for ``N = num_inference_steps`` (SD1.5,
N = 10: 901, 801, ..., 1). With ``k = num_steps``:

* :func:`ddim_denoise` runs the *last* ``k`` DDIM steps, from index ``N - k``: the latents are
  taken to be at level ``t_{N-k}`` and are brought down to the final level.
* :func:`ddim_invert` is its mirror: the clean latent is regarded as the sample at the smallest
  timestep (the UNet sees it at ``t_{N-1}``) and is pushed up through ``t_{N-1}, ..., t_{N-k}``
  by diffusers' ``DDIMInverseScheduler``. So ``ddim_denoise(ddim_invert(z, k), k)`` is a round
  trip (exact up to the inversion's approximation; see docs/ddim.md).

Both equal diffusers' own loops (``unet(x, t)`` then ``scheduler.step``) because they *are* such
loops, written out below: private ``DDIMScheduler`` / ``DDIMInverseScheduler`` copies built
from the user's ``scheduler.config`` (the user's scheduler is never mutated), diffusers'
``step()`` (which is differentiable), the UNet called once per step. The argument checks and
the conditioning's assembly live in :mod:`attnpatch.diffusion._conditioning`. Nothing runs under ``no_grad`` and nothing
works in place, so gradients reach the latents, the embeddings and anything upstream. This
module knows nothing about attention control: wrap a call in ``with hijack(...)`` to read maps.

Classifier-free guidance: with ``guidance_scale = g`` the UNet runs once per step on the batch
``[uncond; cond]`` (diffusers' order) and ``out = out_u + g * (out_c - out_u)`` is applied to the
raw model output (any prediction type). ``g == 1`` runs the cond half only (``uncond`` is not
needed), ``g == 0`` the uncond half only (DiffAttack's inversion); both give the same values as
the full batch at half the cost.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..hooks import ControlledAttnProcessor
from ..hooks import checkpoint as replay_checkpoint
from ._conditioning import Conditioning, ddim_schedule, prepare

__all__ = ["ddim_invert", "ddim_denoise", "ddim_timesteps"]

half_cast = ControlledAttnProcessor.half_cast


def ddim_denoise(
    unet: nn.Module,
    scheduler: Any,
    latents: torch.Tensor,
    cond: torch.Tensor,
    *,
    num_inference_steps: int,
    num_steps: int,
    uncond: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    added_cond_kwargs: Mapping[str, Any] | None = None,
    checkpoint: bool = False,
    split_guidance: bool = False,
) -> torch.Tensor:
    """Run the last ``num_steps`` DDIM steps, differentiably.

    The steps ``N-k, ..., N-1`` of diffusers' ``DDIMScheduler`` loop (built from
    ``scheduler.config``): ``latents`` are taken to be at level ``t_{N-k}`` (the loop jumps to
    timestep index ``N-k``); each step calls ``unet(x, t_i)`` and ``step`` moves ``x`` to the
    next level, the last one to the final level (``final_alpha_cumprod``).

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (frozen or not; its weights get gradients
            only if they require them).
        scheduler: a ``DDIMScheduler`` or ``DDIMInverseScheduler``; only its ``config`` is read
            (private copies are stepped, cached per config and N). Other schedulers raise:
            convert with ``DDIMScheduler.from_config(pipe.scheduler.config)``.
        latents: ``(B, 4, h, w)`` scaled latents (``ddim_invert``'s output, or noise).
        cond: ``(B, L, D)`` or ``(1, L, D)`` prompt embeddings; one row is shared by all ``B``
            latents. ``D`` must equal ``unet.config.cross_attention_dim``.
        num_inference_steps: ``N``, the length of the DDIM schedule.
        num_steps: ``k`` in ``[1, N]``, how many of its steps to run.
        uncond: ``(B or 1, L, D)`` unconditional embeddings; needed when ``guidance_scale``
            is not 1.
        guidance_scale: ``g``; ``out_u + g * (out_c - out_u)``. 1 runs cond only, 0 uncond
            only (one half of the batch each); anything else runs ``[uncond; cond]`` (2B).
        added_cond_kwargs: extra UNet conditioning (SDXL: ``text_embeds`` (n, P), ``time_ids``
            (n, 6); see ``attnpatch.diffusion.sdxl_added_cond_kwargs``). Tensor rows: ``n = 1``
            or ``B`` serve both guidance halves, ``n = 2B`` is ``[uncond; cond]`` (the halves
            that do not run are dropped). Required for UNets whose ``addition_embed_type``
            needs it.
        checkpoint: recompute each UNet call during backward (:func:`attnpatch.hooks.checkpoint`:
            non-reentrant, replaying any hijack), so activation memory does not grow with
            ``num_steps``; same values and gradients, about one extra UNet forward per step in
            backward. Ignored when grad is disabled. Blocks of a UNet whose diffusers
            checkpointing is on (``unet.enable_gradient_checkpointing()``) are then recomputed
            block by block inside each recomputed call (``memory="low"`` of the pipeline).
        split_guidance: with both guidance halves, run the uncond and the cond half as two
            UNet calls of batch ``B`` (each checkpointed on its own) instead of one of ``2B``:
            same values, a lower peak in backward. Under a ``hijack`` each half is then its own
            UNet call (``cur_step`` advances twice per step, uncond first).

    Returns:
        ``(B, 4, h, w)`` denoised latents (decode with ``vae_decode``).

    >>> from attnpatch.testing import tiny_sd
    >>> sd = tiny_sd()
    >>> x = torch.randn(2, 4, 8, 8)
    >>> ddim_denoise(sd.unet, sd.scheduler, x, torch.randn(1, 77, 8), uncond=torch.zeros(1, 77, 8),
    ...              guidance_scale=7.5, num_inference_steps=10, num_steps=2).shape
    torch.Size([2, 4, 8, 8])
    """
    fn = "ddim_denoise"
    sched, steps = ddim_schedule(
        fn, scheduler, num_inference_steps, num_steps, inverse=False, device=_device(latents)
    )
    c = prepare(fn, unet, latents, cond, uncond, guidance_scale, added_cond_kwargs)
    recompute = checkpoint and torch.is_grad_enabled()
    x = latents
    for t, t_unet in steps:  # t: int for step(); t_unet: the same, a tensor on x's device
        out = _unet_call(unet, x, t_unet, c, recompute, split_guidance)
        x = sched.step(out, t, x, return_dict=False)[0]  # x at the next, lower level
    return x


def ddim_invert(
    unet: nn.Module,
    scheduler: Any,
    latents: torch.Tensor,
    cond: torch.Tensor,
    *,
    num_inference_steps: int,
    num_steps: int,
    uncond: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    added_cond_kwargs: Mapping[str, Any] | None = None,
    checkpoint: bool = False,
    split_guidance: bool = False,
) -> torch.Tensor:
    """Push clean latents up ``num_steps`` DDIM steps, differentiably: the mirror of
    :func:`ddim_denoise`, with the same arguments.

    The first ``k`` steps of diffusers' ``DDIMInverseScheduler`` loop (built from
    ``scheduler.config``): at each inverse timestep ``t`` (``t_{N-1}, ..., t_{N-k}``) the UNet
    is called as ``unet(x, t)`` and ``step`` moves ``x`` from the previous level up to level
    ``t``. The clean latent is thus "regarded as z1": the UNet sees it at ``t_{N-1}``.

    ``latents`` are ``(B, 4, h, w)`` clean scaled latents (``vae_encode``'s output). Returns
    ``(B, 4, h, w)`` latents at level ``t_{N-k}``: pass them to :func:`ddim_denoise` with the
    same ``num_inference_steps`` and ``num_steps``.

    >>> from attnpatch.testing import tiny_sd
    >>> sd = tiny_sd()
    >>> z, cond = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 8)
    >>> zt = ddim_invert(sd.unet, sd.scheduler, z, cond, num_inference_steps=10, num_steps=3)
    >>> z0 = ddim_denoise(sd.unet, sd.scheduler, zt, cond, num_inference_steps=10, num_steps=3)
    >>> z0.shape
    torch.Size([1, 4, 8, 8])
    """
    fn = "ddim_invert"
    sched, steps = ddim_schedule(
        fn, scheduler, num_inference_steps, num_steps, inverse=True, device=_device(latents)
    )
    c = prepare(fn, unet, latents, cond, uncond, guidance_scale, added_cond_kwargs)
    recompute = checkpoint and torch.is_grad_enabled()
    x = latents
    for t, t_unet in steps:  # ascending: t_{N-1}, ..., t_{N-k}
        out = _unet_call(unet, x, t_unet, c, recompute, split_guidance)
        x = sched.step(out, t, x, return_dict=False)[0]  # x up at level t
    return x


def _unet_call(
    unet: nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    c: Conditioning,
    recompute: bool,
    split: bool = False,
) -> torch.Tensor:
    """One guided step's UNet output at level ``t``, guidance applied: ``(B, C, h, w)``.

    ``recompute``: run each UNet call under :func:`attnpatch.hooks.checkpoint` (recomputed in
    backward). ``split`` (with both guidance halves): the uncond then the cond half as two
    UNet calls of batch ``B``, each checkpointed on its own, instead of one call of ``2B``.
    """
    if c.both and split:
        states = c.states.chunk(2)
        added = [None, None] if c.added is None else _halves_of(c.added)
        out_u, out_c = (
            _forward(unet, x, t, states[i], added[i], c.dtype, recompute) for i in (0, 1)
        )
    else:
        x_in = torch.cat([x, x]) if c.both else x  # [uncond; cond], diffusers' order
        out = _forward(unet, x_in, t, c.states, c.added, c.dtype, recompute)
        if not c.both:
            return out
        out_u, out_c = out.chunk(2)
    return out_u + c.guidance_scale * (out_c - out_u)


def _forward(
    unet: nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    states: torch.Tensor,
    added: dict[str, Any] | None,
    dtype: torch.dtype | None,
    recompute: bool,
) -> torch.Tensor:
    """``unet(x, t, states)``: inputs cast to ``dtype`` (the UNet's), the output to ``x``'s."""
    if recompute:
        return replay_checkpoint(_forward, unet, x, t, states, added, dtype, False, module=unet)
    x_in = x if dtype is None else half_cast(x, dtype)
    out = unet(x_in, t, encoder_hidden_states=states, added_cond_kwargs=added, return_dict=False)
    return half_cast(out[0], x.dtype)


def _halves_of(added: dict[str, Any]) -> list[dict[str, Any]]:
    """``[uncond; cond]`` rows of the added conditioning, as one dict per half."""
    halves: list[dict[str, Any]] = [{}, {}]
    for key, value in added.items():
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            halves[0][key], halves[1][key] = value.chunk(2)
        else:
            halves[0][key] = halves[1][key] = value
    return halves


def ddim_timesteps(
    scheduler: Any, *, num_inference_steps: int, num_steps: int, inverse: bool = False
) -> list[int]:
    """The timesteps the UNet sees, in call order, for a denoise (or, ``inverse``, an inversion).

    >>> from attnpatch.testing import tiny_scheduler
    >>> ddim_timesteps(tiny_scheduler(), num_inference_steps=10, num_steps=3)
    [201, 101, 1]
    >>> ddim_timesteps(tiny_scheduler(), num_inference_steps=10, num_steps=3, inverse=True)
    [1, 101, 201]
    """
    fn = "ddim_invert" if inverse else "ddim_denoise"
    _, steps = ddim_schedule(fn, scheduler, num_inference_steps, num_steps, inverse=inverse)
    return [t for t, _ in steps]


def _device(latents: Any) -> torch.device | None:
    """``latents``' device; ``None`` for a non-tensor (``prepare`` then says what is wrong)."""
    return latents.device if isinstance(latents, torch.Tensor) else None
