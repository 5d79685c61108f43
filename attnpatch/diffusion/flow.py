"""Differentiable flow-matching inversion and denoising (SD3 / SD3.5 and Flux transformers).

The flow analogue of :mod:`attnpatch.diffusion.ddim`. Let ``sigma_0 > sigma_1 > ... >
sigma_{N-1} > sigma_N = 0`` be the sigmas and ``t_i = scheduler.timesteps[i]`` the timesteps of
a ``FlowMatchEulerDiscreteScheduler`` set up for ``N = num_inference_steps`` as the family's
pipeline sets it up (SD3: ``set_timesteps(N)`` with the config's shift; Flux: linear sigmas
``1 .. 1/N`` and ``mu = calculate_shift(image tokens)``). The transformer predicts a velocity
``v(x, t)`` and the model's ODE is ``dx/dsigma = v``. With ``k = num_steps``:

* :func:`flow_denoise` runs the *last* ``k`` Euler steps, ``x <- x + (sigma_{i+1} - sigma_i) *
  v(x, t_i)`` for ``i = N-k, ..., N-1``: the latents are taken to be at ``sigma_{N-k}`` and end
  at ``sigma_N = 0``. With ``k = N`` it is the pipelines' own loop (``StableDiffusion3Pipeline``
  / ``FluxPipeline`` with ``output_type="latent"``; Flux's output unpacked).
* :func:`flow_invert` is its mirror, Euler *up* the same sigmas: ``x <- x + (sigma_i -
  sigma_{i+1}) * v(x, t_i)`` for ``i = N-1, ..., N-k``, from the clean latent at ``sigma_N =
  0`` to ``sigma_{N-k}``. The transformer sees the timesteps the denoiser sees, in reverse:
  the clean latent is regarded as the sample at ``t_{N-1}`` (the flow analogue of DDIM's "z0
  as z1"). The exact inverse of a denoising step would evaluate ``v`` at the *unknown* earlier
  sample; evaluating it at the current one is the approximation (docs/ddim.md measures it).

The Euler step is computed here from the private schedule's sigmas, differentiably (diffusers'
``step`` keeps a ``step_index``, so two calls at one timestep differ): the user's scheduler is
never mutated, only its config is read. The transformer is called through
:func:`attnpatch.families.predict` (latents in the VAE's ``(B, C, h, w)`` layout for
both families; Flux's 2x2 packing happens there). Nothing runs under ``no_grad`` and nothing
works in place, so gradients reach the latents and the embeddings; frozen weights get none.

Classifier-free guidance: with ``guidance_scale = g`` the transformer runs once per step on
``[uncond; cond]`` (SD3's order; Flux's pipeline runs the halves as two calls, same values up to
rounding) and ``v = v_u + g * (v_c - v_u)``; ``g == 1`` runs the cond half only, ``g == 0`` the
uncond half only. Flux-dev's *embedded* guidance is ``guidance=`` (FluxPipeline's
``guidance_scale``), a conditioning input, not CFG.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..families import predict
from ..hooks import ControlledAttnProcessor
from ..hooks import checkpoint as replay_checkpoint
from ._flow_conditioning import FlowConditioning, flow_family, flow_schedule, prepare_flow

__all__ = ["flow_invert", "flow_denoise", "flow_timesteps"]

half_cast = ControlledAttnProcessor.half_cast


def flow_denoise(
    transformer: nn.Module,
    scheduler: Any,
    latents: torch.Tensor,
    embeds: Any,
    *,
    num_inference_steps: int,
    num_steps: int,
    guidance_scale: float = 1.0,
    guidance: float | None = None,
    checkpoint: bool = False,
    split_guidance: bool = False,
) -> torch.Tensor:
    """Run the last ``num_steps`` Euler steps of the flow schedule, differentiably.

    Args:
        transformer: an ``SD3Transformer2DModel`` or ``FluxTransformer2DModel``
            (``parts.transformer``; frozen or not: its weights get gradients only if they
            require them).
        scheduler: a ``FlowMatchEulerDiscreteScheduler``; only its ``config`` is read.
        latents: ``(B, C, h, w)`` scaled latents in the VAE's layout (``flow_invert``'s output,
            or noise), ``C`` the VAE's latent channels (Flux packs them 2x2 inside), ``h, w``
            multiples of the patch size (2).
        embeds: the :class:`~attnpatch.diffusion.PromptEmbeds` of ``encode_prompt(
            parts.tokenizers, parts.text_encoders, prompts)``: ``cond`` ``(B or 1, T, D)`` and
            ``pooled`` ``(B or 1, P)``; ``uncond`` / ``uncond_pooled`` serve classifier-free
            guidance (needed when ``guidance_scale`` is not 1).
        num_inference_steps: ``N``, the length of the schedule.
        num_steps: ``k`` in ``[1, N]``, how many of its (last) steps to run.
        guidance_scale: ``g`` of classifier-free guidance, ``v_u + g * (v_c - v_u)``; 1 runs
            cond only, 0 uncond only, anything else ``[uncond; cond]`` (2B).
        guidance: Flux-dev's embedded guidance scale (FluxPipeline's ``guidance_scale``, 3.5 by
            default there); required when the transformer has ``guidance_embeds``, refused
            otherwise.
        checkpoint: recompute each transformer call during backward
            (:func:`attnpatch.hooks.checkpoint`, replaying any hijack): activation memory flat
            in ``num_steps``, same values and gradients, about one extra forward per call.
            With the transformer's diffusers checkpointing on (``memory="low"``:
            :func:`attnpatch.diffusion._memory.block_checkpointing`) its blocks are also
            recomputed one by one inside each recomputed call.
        split_guidance: with both guidance halves, run them as two calls of batch ``B``
            (uncond first) instead of one of ``2B``: same values, a lower peak in backward.

    Returns:
        ``(B, C, h, w)`` latents at ``sigma = 0`` (decode with ``vae_decode``).

    >>> from attnpatch.testing import tiny_sd3
    >>> p = tiny_sd3()
    >>> from attnpatch.diffusion import encode_prompt
    >>> e = encode_prompt(p.tokenizers, p.text_encoders, "a photo of a circle")
    >>> z = flow_denoise(p.transformer, p.scheduler, torch.randn(1, 4, 8, 8), e,
    ...                  num_inference_steps=10, num_steps=2, guidance_scale=5.0)
    >>> z.shape
    torch.Size([1, 4, 8, 8])
    """
    return _loop(
        "flow_denoise", transformer, scheduler, latents, embeds, num_inference_steps, num_steps,
        guidance_scale, guidance, checkpoint, split_guidance, inverse=False,
    )  # fmt: skip


def flow_invert(
    transformer: nn.Module,
    scheduler: Any,
    latents: torch.Tensor,
    embeds: Any,
    *,
    num_inference_steps: int,
    num_steps: int,
    guidance_scale: float = 1.0,
    guidance: float | None = None,
    checkpoint: bool = False,
    split_guidance: bool = False,
) -> torch.Tensor:
    """Push clean latents up ``num_steps`` Euler steps of the flow schedule, differentiably:
    the mirror of :func:`flow_denoise`, with the same arguments.

    At each timestep ``t_i`` (``i = N-1, ..., N-k``) the transformer is called at the current
    sample and ``x <- x + (sigma_i - sigma_{i+1}) * v``: ``latents`` (``(B, C, h, w)``, clean,
    at ``sigma = 0``: ``vae_encode``'s output) end at ``sigma_{N-k}``. Pass the result to
    :func:`flow_denoise` with the same ``num_inference_steps`` and ``num_steps``.

    >>> from attnpatch.testing import tiny_flux
    >>> from attnpatch.diffusion import encode_prompt
    >>> p = tiny_flux()
    >>> e = encode_prompt(p.tokenizers, p.text_encoders, "a photo of a star")
    >>> kw = dict(num_inference_steps=10, num_steps=3, guidance=3.5)
    >>> zt = flow_invert(p.transformer, p.scheduler, torch.randn(1, 4, 8, 8), e, **kw)
    >>> flow_denoise(p.transformer, p.scheduler, zt, e, **kw).shape
    torch.Size([1, 4, 8, 8])
    """
    return _loop(
        "flow_invert", transformer, scheduler, latents, embeds, num_inference_steps, num_steps,
        guidance_scale, guidance, checkpoint, split_guidance, inverse=True,
    )  # fmt: skip


def _loop(
    fn: str,
    transformer: nn.Module,
    scheduler: Any,
    latents: Any,
    embeds: Any,
    num_inference_steps: int,
    num_steps: int,
    guidance_scale: float,
    guidance: float | None,
    checkpoint: bool,
    split: bool,
    *,
    inverse: bool,
) -> torch.Tensor:
    family = flow_family(transformer)
    c = prepare_flow(fn, transformer, family, latents, embeds, guidance_scale, guidance)
    steps = flow_schedule(
        fn,
        scheduler,
        family,
        num_inference_steps,
        num_steps,
        inverse=inverse,
        image_seq_len=_image_tokens(transformer, family, latents.shape[-2:]),
        device=latents.device,
    )
    recompute = checkpoint and torch.is_grad_enabled()
    x = latents
    for t, dt in steps:
        v = _guided(transformer, x, t, c, recompute, split)
        # diffusers' step, in float32 (or float64) and back to the latents' dtype
        wide = torch.promote_types(x.dtype, torch.float32)
        x = (x.to(wide) + dt * v.to(wide)).to(x.dtype)
    return x


def _image_tokens(model: nn.Module, family: str, hw: Any) -> int:
    """The image's token count, which the resolution-dependent shift (``mu``) reads: SD3's
    patches, Flux's packed 2x2 tokens."""
    patch = 2 if family == "flux" else int(model.config.patch_size)
    return (int(hw[0]) // patch) * (int(hw[1]) // patch)


def _guided(
    model: nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    c: FlowConditioning,
    recompute: bool,
    split: bool,
) -> torch.Tensor:
    """One step's velocity ``(B, C, h, w)`` at ``t``, guidance applied."""
    if c.both and split:
        states, pooled = c.states.chunk(2), c.pooled.chunk(2)
        v_u, v_c = (
            _forward(model, x, t, states[i], pooled[i], c.guidance, c.dtype, recompute)
            for i in (0, 1)
        )
    else:
        x_in = torch.cat([x, x]) if c.both else x  # [uncond; cond]
        v = _forward(model, x_in, t, c.states, c.pooled, c.guidance, c.dtype, recompute)
        if not c.both:
            return v
        v_u, v_c = v.chunk(2)
    return v_u + c.guidance_scale * (v_c - v_u)


def _forward(
    model: nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    states: torch.Tensor,
    pooled: torch.Tensor,
    guidance: float | None,
    dtype: torch.dtype | None,
    recompute: bool,
) -> torch.Tensor:
    """``predict(model, x, t, ...)``: inputs cast to ``dtype`` (the model's), output to ``x``'s."""
    if recompute:
        return replay_checkpoint(
            _forward, model, x, t, states, pooled, guidance, dtype, False, module=model
        )
    x_in = x if dtype is None else half_cast(x, dtype)
    out = predict(model, x_in, t, states, pooled, guidance=guidance)
    return half_cast(out, x.dtype)


def flow_timesteps(
    transformer: nn.Module,
    scheduler: Any,
    latent_size: tuple[int, int],
    *,
    num_inference_steps: int,
    num_steps: int,
    inverse: bool = False,
) -> list[float]:
    """The timesteps the transformer sees, in call order, for a denoise (or, ``inverse``, an
    inversion) of ``(h, w)`` latents (Flux's shift depends on the image's size).

    >>> from attnpatch.testing import tiny_sd3
    >>> p = tiny_sd3()
    >>> [round(t) for t in flow_timesteps(p.transformer, p.scheduler, (8, 8),
    ...                                   num_inference_steps=10, num_steps=3)]
    [465, 278, 9]
    """
    family = flow_family(transformer)
    fn = "flow_invert" if inverse else "flow_denoise"
    steps = flow_schedule(
        fn,
        scheduler,
        family,
        num_inference_steps,
        num_steps,
        inverse=inverse,
        image_seq_len=_image_tokens(transformer, family, latent_size),
        device=torch.device("cpu"),
    )
    return [float(t) for t, _ in steps]
