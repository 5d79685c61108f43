"""What :mod:`attnpatch.diffusion.flow`'s loops need ready before their first transformer call.

* :func:`flow_schedule` — the timesteps and Euler step sizes of a private
  ``FlowMatchEulerDiscreteScheduler`` built from the user's ``scheduler.config`` (never
  mutated), set up as ``StableDiffusion3Pipeline`` / ``FluxPipeline`` set theirs (the same
  ``sigmas`` and ``mu``), cached per config, family, ``N`` and image size;
* :func:`prepare_flow` — the arguments checked (latents, embeddings, guidance, each with a
  message naming the fix) and the transformer's conditioning assembled once per loop.

Nothing here calls the transformer; every check runs before any work is done.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import InputError, ModelError
from ..families import family_of
from ._conditioning import _cast, _check_int, _halves, _jsonable, _rows, _shape, unet_dtype


def flow_family(model: Any) -> str:
    """The flow-matching family of a transformer (``"sd3"``, ``"flux"``, or a registered one
    whose ``scheduler`` is ``"flow"``); :class:`~attnpatch.errors.ModelError` for anything else
    (a UNet runs with ``ddim_invert`` / ``ddim_denoise``)."""
    try:
        family = family_of(model, strict=True) if isinstance(model, nn.Module) else None
    except ModelError:
        family = None
    if family is None or family.scheduler != "flow":
        raise ModelError(
            f"the flow loops run SD3Transformer2DModel or FluxTransformer2DModel, got "
            f"{type(model).__name__}; pass parts.transformer (a UNet runs with ddim_invert / "
            "ddim_denoise)"
        )
    return family.name


__all__ = ["FlowConditioning", "flow_schedule", "prepare_flow", "latent_channels"]

_FIX_SCHEDULER = "FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)"
#: ``calculate_shift``'s fallbacks where a scheduler config lacks a key, by pipeline.
_SHIFT_DEFAULTS = {
    "sd3": {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5,
            "max_shift": 1.16},
    "flux": {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5,
             "max_shift": 1.15},
}  # fmt: skip


# ----------------------------------------------------------------------------- schedules


def _config_json(scheduler: Any) -> str:
    from diffusers import FlowMatchEulerDiscreteScheduler

    if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        raise InputError(
            f"flow inversion/denoising needs a FlowMatchEulerDiscreteScheduler, got "
            f"{type(scheduler).__name__}; build one from your pipeline's scheduler config: "
            f"from diffusers import FlowMatchEulerDiscreteScheduler; scheduler = {_FIX_SCHEDULER}"
        )
    for key, why in (
        ("stochastic_sampling", "re-draws noise at every step, which no inversion undoes"),
        ("invert_sigmas", "runs the schedule backwards (Mochi's convention)"),
    ):
        if scheduler.config.get(key):
            raise InputError(
                f"the scheduler has {key}=True, which {why}; the flow loops integrate the "
                f"deterministic Euler ODE: use {_FIX_SCHEDULER[:-1]}, {key}=False)"
            )
    config = {k: v for k, v in scheduler.config.items() if not k.startswith("_")}
    return json.dumps(config, sort_keys=True, default=_jsonable)


def _mu(family: str, config: dict[str, Any], image_seq_len: int) -> float:
    """``calculate_shift`` of the pipelines, with their fallbacks for missing config keys."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    d = _SHIFT_DEFAULTS[family]
    return calculate_shift(
        image_seq_len,
        config.get("base_image_seq_len", d["base_image_seq_len"]),
        config.get("max_image_seq_len", d["max_image_seq_len"]),
        config.get("base_shift", d["base_shift"]),
        config.get("max_shift", d["max_shift"]),
    )


@functools.lru_cache(maxsize=64)
def _private_schedule(
    family: str, config_json: str, n: int, image_seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(timesteps (N,), sigmas (N+1,))``, float32 on the CPU, of a private scheduler whose
    ``set_timesteps`` was called as the family's pipeline calls it."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = json.loads(config_json)
    sched = FlowMatchEulerDiscreteScheduler.from_config(config)
    kwargs: dict[str, Any] = {}
    if family == "flux":  # FluxPipeline: linear sigmas, mu always given
        if not config.get("use_flow_sigmas"):
            kwargs["sigmas"] = np.linspace(1.0, 1 / n, n)
        kwargs["mu"] = _mu(family, config, image_seq_len)
    elif config.get("use_dynamic_shifting"):  # StableDiffusion3Pipeline: mu only if dynamic
        kwargs["mu"] = _mu(family, config, image_seq_len)
    sched.set_timesteps(n, **kwargs)
    return sched.timesteps.to(torch.float32), sched.sigmas.to(torch.float32)


@functools.lru_cache(maxsize=64)
def _on_device(
    family: str, config_json: str, n: int, image_seq_len: int, device: torch.device
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """0-d timestep tensors and Euler steps ``sigma_{i+1} - sigma_i`` on ``device``, made once
    (outside inference mode, so a later checkpointed call can save them)."""
    timesteps, sigmas = _private_schedule(family, config_json, n, image_seq_len)
    with torch.inference_mode(False):  # copies: the cached CPU ones may be inference tensors
        t = timesteps.to(device, copy=True)
        s = sigmas.to(device, copy=True)
        return t.unbind(0), (s[1:] - s[:-1]).unbind(0)


def flow_schedule(
    fn: str,
    scheduler: Any,
    family: str,
    num_inference_steps: int,
    num_steps: int,
    *,
    inverse: bool,
    image_seq_len: int,
    device: torch.device,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The ``(t, dt)`` pairs of the ``num_steps`` that run, in call order.

    ``t`` is the 0-d timestep the transformer sees (``scheduler.timesteps[i]``), ``dt`` the
    Euler step ``x <- x + dt * v``: ``sigma_{i+1} - sigma_i`` (negative) when denoising the last
    ``k`` steps ``i = N-k, ..., N-1``; ``sigma_i - sigma_{i+1}`` (positive) when inverting, for
    ``i = N-1, ..., N-k`` (see :mod:`attnpatch.diffusion.flow`).
    """
    config_json = _config_json(scheduler)
    n_train = int(scheduler.config.num_train_timesteps)
    _check_int(
        "num_inference_steps",
        num_inference_steps,
        1,
        n_train,
        f"it must lie in [1, {n_train}] (the scheduler's num_train_timesteps); pass e.g. 28",
    )
    _check_int(
        "num_steps",
        num_steps,
        1,
        num_inference_steps,
        f"{fn} runs num_steps of the num_inference_steps={num_inference_steps} flow steps, so "
        f"1 <= num_steps <= {num_inference_steps}; lower num_steps or raise "
        "num_inference_steps",
    )
    ts, dts = _on_device(family, config_json, num_inference_steps, image_seq_len, device)
    run = range(num_inference_steps - num_steps, num_inference_steps)
    if inverse:
        return [(ts[i], -dts[i]) for i in reversed(run)]
    return [(ts[i], dts[i]) for i in run]


# ----------------------------------------------------------------------------- conditioning


@dataclass
class FlowConditioning:
    """The transformer's conditioning for every call of one loop.

    Attributes:
        states: ``(B, T, D)`` text sequence, or ``(2B, T, D)`` ``[uncond; cond]`` when both
            guidance halves run.
        pooled: ``(B, P)`` or ``(2B, P)`` pooled projection, rows as ``states``.
        guidance_scale: ``g`` of ``v_u + g * (v_c - v_u)``.
        both: whether both halves run (the latents are then doubled for each call).
        guidance: Flux-dev's embedded guidance scale, or ``None``.
        dtype: the transformer's parameter dtype when it differs from the latents' (inputs are
            cast to it at the call, outputs back); ``None``: no cast.
    """

    states: torch.Tensor
    pooled: torch.Tensor
    guidance_scale: float
    both: bool
    guidance: float | None = None
    dtype: torch.dtype | None = None


def latent_channels(model: nn.Module, family: str) -> int:
    """The VAE latent channels the transformer takes (Flux packs 2x2: a quarter of its input)."""
    c = int(model.config.in_channels)
    return c // 4 if family == "flux" else c


def _check_latents(fn: str, model: nn.Module, family: str, latents: Any) -> int:
    c = latent_channels(model, family)
    if (
        not isinstance(latents, torch.Tensor)
        or latents.ndim != 4
        or not latents.is_floating_point()
        or latents.shape[0] < 1
    ):
        raise InputError(
            f"{fn}: latents must be a float (B, {c}, h, w) tensor, got {_shape(latents)}; pass "
            "vae_encode(vae, images) (images (B, 3, H, W) in [-1, 1])"
        )
    if latents.shape[1] != c:
        raise InputError(
            f"{fn}: latents have {latents.shape[1]} channels but the {family} transformer takes "
            f"{c}{' (packed 2x2 inside)' if family == 'flux' else ''}; pass (B, {c}, h, w) "
            "latents from vae_encode, not images"
        )
    patch = 2 if family == "flux" else int(model.config.patch_size)
    h, w = latents.shape[-2:]
    if h % patch or w % patch:
        raise InputError(
            f"{fn}: latents are {h}x{w} but the {family} transformer cuts them into {patch}x{patch} "
            f"patches; pass images whose sides are multiples of {patch} x the VAE factor "
            "(to_diffusion_input(images, multiple=...))"
        )
    limit = model.config.get("pos_embed_max_size") if family == "sd3" else None
    if limit is not None and max(h, w) // patch > limit:
        raise InputError(
            f"{fn}: latents are {h}x{w}, more than the transformer's {limit}x{limit} patch grid "
            f"(pos_embed_max_size={limit}, patch {patch}); use smaller images"
        )
    if not bool(torch.isfinite(latents.detach()).all()):
        raise InputError(f"{fn}: latents contain NaN or Inf; check the images given to vae_encode")
    return latents.shape[0]


def _check_rows(
    fn: str, name: str, x: Any, ndim: int, b: int, width: int, latents: torch.Tensor
) -> torch.Tensor:
    what = "(B, T, D) text sequence" if ndim == 3 else "(B, P) pooled projection"
    if not isinstance(x, torch.Tensor) or x.ndim != ndim:
        raise InputError(
            f"{fn}: embeds.{name} must be a {what}, got {_shape(x)}; pass "
            "encode_prompt(parts.tokenizers, parts.text_encoders, prompts)"
        )
    if x.shape[-1] != width:
        raise InputError(
            f"{fn}: embeds.{name} are {x.shape[-1]} wide but the transformer takes {width}; "
            "encode the prompts with the text encoders of the same model"
        )
    if x.shape[0] not in (1, b):
        raise InputError(
            f"{fn}: embeds.{name} have batch {x.shape[0]} but latents have batch {b}; pass {b} "
            "rows (one per latent) or 1 row shared by all latents"
        )
    if x.device != latents.device:
        raise InputError(
            f"{fn}: embeds.{name} are on {x.device} but latents on {latents.device}; move them"
        )
    if x.dtype != latents.dtype and not torch.is_autocast_enabled(latents.device.type):
        raise InputError(
            f"{fn}: embeds.{name} are {x.dtype} but latents {latents.dtype}; pass them in "
            f"{latents.dtype}"
        )
    return _rows(x, b)


def _check_guidance(fn: str, model: nn.Module, family: str, guidance: Any) -> float | None:
    embeds = family == "flux" and bool(model.config.get("guidance_embeds", False))
    if not embeds:
        if guidance is not None:
            raise InputError(
                f"{fn}: guidance={guidance!r} is Flux-dev's embedded guidance, which this "
                f"{family} transformer does not have (guidance_embeds off); drop guidance= and "
                "use guidance_scale= for classifier-free guidance"
            )
        return None
    if guidance is None or isinstance(guidance, bool) or not isinstance(guidance, (int, float)):
        raise InputError(
            f"{fn}: this Flux transformer embeds a guidance scale (guidance_embeds=True, "
            f"Flux-dev); pass guidance=3.5 (FluxPipeline's default), got {guidance!r}"
        )
    if not math.isfinite(float(guidance)):
        raise InputError(f"{fn}: guidance must be finite, got {guidance!r}")
    return float(guidance)


def prepare_flow(
    fn: str,
    model: nn.Module,
    family: str,
    latents: Any,
    embeds: Any,
    guidance_scale: Any,
    guidance: Any,
) -> FlowConditioning:
    """Check the arguments of a flow loop and assemble the transformer's conditioning once."""
    b = _check_latents(fn, model, family, latents)
    if isinstance(guidance_scale, bool) or not math.isfinite(float(guidance_scale)):
        raise InputError(
            f"{fn}: guidance_scale must be a finite number, got {guidance_scale!r}; pass e.g. 7.0"
        )
    g = float(guidance_scale)
    flux_guidance = _check_guidance(fn, model, family, guidance)
    if not all(hasattr(embeds, k) for k in ("cond", "uncond", "pooled", "uncond_pooled")):
        raise InputError(
            f"{fn}: embeds must be the PromptEmbeds of encode_prompt(parts.tokenizers, "
            f"parts.text_encoders, prompts), got {type(embeds).__name__}"
        )
    width, pooled_width = model.config.joint_attention_dim, model.config.pooled_projection_dim
    halves = _halves(g)
    rows: dict[str, list[torch.Tensor]] = {"states": [], "pooled": []}
    for half in halves:
        seq, pool = ("uncond", "uncond_pooled") if half == "uncond" else ("cond", "pooled")
        if getattr(embeds, seq) is None or getattr(embeds, pool) is None:
            raise InputError(
                f"{fn}: guidance_scale={g:g} needs embeds.{seq} and embeds.{pool} (the negative "
                "prompt's); encode_prompt returns them, or pass guidance_scale=1.0 for the "
                "conditional prediction alone"
            )
        rows["states"].append(_check_rows(fn, seq, getattr(embeds, seq), 3, b, width, latents))
        rows["pooled"].append(
            _check_rows(fn, pool, getattr(embeds, pool), 2, b, pooled_width, latents)
        )
    if len(halves) == 2 and rows["states"][0].shape[1] != rows["states"][1].shape[1]:
        raise InputError(
            f"{fn}: embeds.uncond have {rows['states'][0].shape[1]} tokens but embeds.cond "
            f"{rows['states'][1].shape[1]}; both guidance halves run in one call, so encode them "
            "padded to the same length (encode_prompt does)"
        )
    states, pooled = torch.cat(rows["states"]), torch.cat(rows["pooled"])
    dtype = unet_dtype(model)
    if dtype is not None and dtype != latents.dtype:
        states, pooled = _cast(states, dtype), _cast(pooled, dtype)
    else:
        dtype = None
    return FlowConditioning(states, pooled, g, len(halves) == 2, flux_guidance, dtype)
