"""What :mod:`attnpatch.diffusion.ddim`'s loops need ready before their first UNet call.

* :func:`ddim_schedule` — a private, cached DDIM (or inverse DDIM) scheduler built from the
  user's ``scheduler.config`` (which is never mutated), and the ``(t, t_unet)`` pairs that run;
* :func:`prepare` — the arguments checked (latents, embeddings, guidance, SDXL conditioning,
  each with a message naming the fix) and the UNet's conditioning assembled once per loop:
  ``encoder_hidden_states`` and ``added_cond_kwargs`` for the guidance halves that run.

Nothing here calls the UNet; every check runs before any work is done.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler
from torch import nn

from ..errors import AttnPatchError, InputError, ModelError
from ..families import family_of
from ..hooks import ControlledAttnProcessor

__all__ = ["Conditioning", "ddim_schedule", "prepare"]

#: ``added_cond_kwargs`` keys a UNet requires, by ``config.addition_embed_type``.
_ADDED_KEYS = {
    "text_time": ("text_embeds", "time_ids"),
    "text_image": ("image_embeds",),
    "image": ("image_embeds",),
    "image_hint": ("image_embeds", "hint"),
}
_FIX_SCHEDULER = "DDIMScheduler.from_config(pipe.scheduler.config)"


# ----------------------------------------------------------------------------- schedules


def _config_json(scheduler: Any) -> str:
    if not isinstance(scheduler, (DDIMScheduler, DDIMInverseScheduler)):
        raise AttnPatchError(
            f"DDIM inversion/denoising needs a DDIMScheduler or DDIMInverseScheduler, got "
            f"{type(scheduler).__name__}; build one from your pipeline's scheduler config: "
            f"from diffusers import DDIMScheduler; scheduler = {_FIX_SCHEDULER}"
        )
    config = {k: v for k, v in scheduler.config.items() if not k.startswith("_")}
    return json.dumps(config, sort_keys=True, default=_jsonable)


def _jsonable(value: Any) -> Any:
    """numpy arrays / tensors in a config (``trained_betas``) as lists, anything else as text."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


@functools.lru_cache(maxsize=64)
def _private_schedule(inverse: bool, config_json: str, n: int) -> tuple[Any, tuple[int, ...]]:
    """A private scheduler with ``set_timesteps(n)`` done, and its timesteps as ints."""
    cls = DDIMInverseScheduler if inverse else DDIMScheduler
    known = inspect.signature(cls.__init__).parameters
    # DDIMScheduler-only keys (thresholding, ...) would make from_config log a warning.
    config = {k: v for k, v in json.loads(config_json).items() if k in known}
    sched = cls.from_config(config)
    sched.set_timesteps(n)
    return sched, tuple(int(t) for t in sched.timesteps)


@functools.lru_cache(maxsize=64)
def _device_timesteps(timesteps: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """0-d int64 timestep tensors on ``device``, made once (a host->device copy can sync).

    Made outside inference mode even when called inside it: an inference tensor could not be
    saved for backward by a later checkpointed call.
    """
    with torch.inference_mode(False):
        return torch.tensor(timesteps, device=device).unbind(0)


def _check_int(name: str, value: Any, low: int, high: int, why: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{name} must be an int, got {value!r}; pass e.g. {name}=10")
    if not low <= value <= high:
        raise InputError(f"{name}={value} is out of range: {why}")


def ddim_schedule(
    fn: str,
    scheduler: Any,
    num_inference_steps: int,
    num_steps: int,
    *,
    inverse: bool,
    device: torch.device | None = None,
) -> tuple[Any, list[tuple[int, torch.Tensor | None]]]:
    """The private scheduler and the ``(t, t_unet)`` pairs of the ``num_steps`` that run.

    ``t`` is a Python int for ``scheduler.step`` (no device sync to index ``alphas_cumprod``);
    ``t_unet`` the same timestep as a 0-d tensor already on ``device`` (``None`` without one).
    Denoising runs the last ``k`` of the ``N`` timesteps, inversion the first ``k`` of the
    inverse schedule (see :mod:`attnpatch.diffusion.ddim`).
    """
    config_json = _config_json(scheduler)
    n_train = int(scheduler.config.num_train_timesteps)
    _check_int(
        "num_inference_steps",
        num_inference_steps,
        1,
        n_train,
        f"it must lie in [1, {n_train}] (the scheduler's num_train_timesteps); pass e.g. 50",
    )
    _check_int(
        "num_steps",
        num_steps,
        1,
        num_inference_steps,
        f"{fn} runs num_steps of the num_inference_steps={num_inference_steps} DDIM steps, so "
        f"1 <= num_steps <= {num_inference_steps}; lower num_steps or raise "
        "num_inference_steps",
    )
    spacing = scheduler.config.get("timestep_spacing", "leading")
    if spacing not in ("leading", "trailing") and inverse:
        raise AttnPatchError(
            f"timestep_spacing={spacing!r} has no DDIM inverse in diffusers (DDIMInverseScheduler "
            "supports 'leading' and 'trailing'); use DDIMScheduler.from_config(pipe.scheduler."
            "config, timestep_spacing='leading') for both inversion and denoising"
        )
    sched, timesteps = _private_schedule(inverse, config_json, num_inference_steps)
    run = slice(0, num_steps) if inverse else slice(num_inference_steps - num_steps, None)
    on_device = (
        _device_timesteps(timesteps, device)[run] if device is not None else (None,) * num_steps
    )
    return sched, list(zip(timesteps[run], on_device))


# ----------------------------------------------------------------------------- conditioning


@dataclass
class Conditioning:
    """The UNet's conditioning for every call of one loop.

    Attributes:
        states: ``encoder_hidden_states``: ``(B, L, D)``, or ``(2B, L, D)`` ``[uncond; cond]``
            when both guidance halves run.
        added: ``added_cond_kwargs`` with rows matched to the call's batch, or ``None``.
        guidance_scale: ``g`` of ``out_u + g * (out_c - out_u)``.
        both: whether both halves run (the latents are then doubled for each call).
    """

    states: torch.Tensor
    added: dict[str, Any] | None
    guidance_scale: float
    both: bool
    #: the UNet's parameter dtype: inputs are cast to it at the call, outputs back to the
    #: latents' dtype (a half-precision UNet inside an fp32 loop); ``None``: no cast
    dtype: torch.dtype | None = None


def _shape(x: Any) -> Any:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


def _check_latents(fn: str, unet: nn.Module, latents: Any) -> int:
    channels = unet.config.in_channels
    if (
        not isinstance(latents, torch.Tensor)
        or latents.ndim != 4
        or not latents.is_floating_point()
        or latents.shape[0] < 1
    ):
        raise AttnPatchError(
            f"{fn}: latents must be a float (B, {channels}, h, w) tensor, got {_shape(latents)}"
            f"{'' if not isinstance(latents, torch.Tensor) else f' {latents.dtype}'}; pass "
            "vae_encode(vae, images) (images (B, 3, H, W) in [-1, 1])"
        )
    if latents.shape[1] != channels:
        raise AttnPatchError(
            f"{fn}: latents have {latents.shape[1]} channels but the UNet takes {channels}; "
            f"pass (B, {channels}, h, w) latents from vae_encode, not images"
        )
    # a UNet of another dtype is fine: each call casts its inputs to the UNet's dtype and its
    # output back to the latents' (Conditioning.dtype), so a half UNet runs in an fp32 loop
    if not bool(torch.isfinite(latents.detach()).all()):
        raise AttnPatchError(
            f"{fn}: latents contain NaN or Inf; check the images given to vae_encode (and, in "
            "float16, use the float32 VAE: docs/performance.md)"
        )
    return latents.shape[0]


def _expected_width(unet: nn.Module) -> int | None:
    config = unet.config
    if config.get("encoder_hid_dim_type") is not None and config.get("encoder_hid_dim"):
        return int(config.encoder_hid_dim)
    dim = config.cross_attention_dim
    if isinstance(dim, (list, tuple)):
        return int(dim[0]) if len(set(dim)) == 1 else None
    return int(dim)


def _check_embeds(
    fn: str, name: str, emb: Any, b: int, width: int | None, latents: torch.Tensor
) -> None:
    if not isinstance(emb, torch.Tensor) or emb.ndim != 3:
        raise AttnPatchError(
            f"{fn}: {name} must be (B, L, D) text embeddings, got {_shape(emb)}; pass "
            f"encode_prompt(tokenizer, text_encoder, prompts).{name}"
        )
    if width is not None and emb.shape[-1] != width:
        raise AttnPatchError(
            f"{fn}: {name} have width {emb.shape[-1]} but the UNet's cross-attention expects "
            f"{width} (unet.config.cross_attention_dim); encode the prompts with the text "
            "encoder(s) of the same model"
        )
    if emb.shape[0] not in (1, b):
        raise AttnPatchError(
            f"{fn}: {name} have batch {emb.shape[0]} but latents have batch {b}; pass {b} rows "
            f"(one per latent) or 1 row shared by all latents"
        )
    if emb.device != latents.device:
        raise AttnPatchError(
            f"{fn}: {name} are on {emb.device} but latents on {latents.device}; move them with "
            f"{name}.to(latents.device)"
        )
    if emb.dtype != latents.dtype and not torch.is_autocast_enabled(latents.device.type):
        raise AttnPatchError(
            f"{fn}: {name} are {emb.dtype} but latents {latents.dtype}; pass "
            f"{name}.to(latents.dtype)"
        )


def _rows(x: torch.Tensor, b: int) -> torch.Tensor:
    return x if x.shape[0] == b else x.expand(b, *x.shape[1:])


def _halves(guidance_scale: float) -> tuple[str, ...]:
    """The guidance halves that run: ``g == 1`` needs only cond, ``g == 0`` only uncond."""
    if guidance_scale == 1.0:
        return ("cond",)
    if guidance_scale == 0.0:
        return ("uncond",)
    return ("uncond", "cond")


def _encoder_states(
    fn: str,
    unet: nn.Module,
    latents: torch.Tensor,
    cond: Any,
    uncond: Any,
    halves: tuple[str, ...],
    guidance_scale: float,
) -> torch.Tensor:
    """``encoder_hidden_states`` for one UNet call: ``(B, L, D)`` or ``[uncond; cond]`` 2B."""
    b = latents.shape[0]
    width = _expected_width(unet)
    _check_embeds(fn, "cond", cond, b, width, latents)
    if "uncond" not in halves:
        return _rows(cond, b)
    if uncond is None:
        raise AttnPatchError(
            f"{fn}: guidance_scale={guidance_scale:g} needs uncond embeddings (the empty "
            "prompt's); pass uncond=encode_prompt(tokenizer, text_encoder, prompts).uncond, or "
            "guidance_scale=1.0 for the conditional prediction alone"
        )
    _check_embeds(fn, "uncond", uncond, b, width, latents)
    if halves == ("uncond",):
        return _rows(uncond, b)
    if uncond.shape[1] != cond.shape[1]:
        raise AttnPatchError(
            f"{fn}: uncond have {uncond.shape[1]} tokens but cond {cond.shape[1]}; both halves "
            "of classifier-free guidance run in one UNet call, so encode both padded to the "
            "same length (encode_prompt does)"
        )
    return torch.cat([_rows(uncond, b), _rows(cond, b)])


def _added_kwargs(
    fn: str,
    unet: nn.Module,
    added: Mapping[str, Any] | None,
    b: int,
    halves: tuple[str, ...],
) -> dict[str, Any] | None:
    """``added_cond_kwargs`` for one UNet call: rows matched to the call's batch."""
    required = _ADDED_KEYS.get(unet.config.get("addition_embed_type"), ())
    if required:
        missing = [k for k in required if added is None or k not in added]
        if missing:
            hint = (
                "attnpatch.diffusion.sdxl_added_cond_kwargs(pooled, size, uncond_pooled=..., "
                "batch_size=B)"
                if "time_ids" in required
                else "the conditioning this UNet was trained with"
            )
            raise AttnPatchError(
                f"{fn}: this UNet (addition_embed_type={unet.config.addition_embed_type!r}) "
                f"needs added_cond_kwargs with {list(required)}; missing {missing}; pass "
                f"added_cond_kwargs={{...}} built with {hint}"
            )
    if added is None:
        return None
    if not isinstance(added, Mapping):
        raise AttnPatchError(
            f"{fn}: added_cond_kwargs must be a dict, got {type(added).__name__}; pass e.g. "
            "{'text_embeds': ..., 'time_ids': ...}"
        )
    out: dict[str, Any] = {}
    for key, value in added.items():
        if not isinstance(value, torch.Tensor) or value.ndim == 0:
            out[key] = value
            continue
        n = value.shape[0]
        if n == 2 * b:
            # [uncond rows; cond rows]: keep the halves that run
            parts = {"uncond": value[:b], "cond": value[b:]}
        elif n in (1, b):
            parts = {"uncond": _rows(value, b), "cond": _rows(value, b)}
        else:
            raise AttnPatchError(
                f"{fn}: added_cond_kwargs[{key!r}] has batch {n} but latents have batch {b}; "
                f"pass 1 or {b} rows (shared by both guidance halves) or {2 * b} rows "
                "[uncond; cond]"
            )
        picked = [parts[h] for h in halves]
        out[key] = picked[0] if len(picked) == 1 else torch.cat(picked)
    return out


def prepare(
    fn: str,
    unet: nn.Module,
    latents: Any,
    cond: Any,
    uncond: Any,
    guidance_scale: Any,
    added_cond_kwargs: Mapping[str, Any] | None,
) -> Conditioning:
    """Check the arguments of a DDIM loop and assemble the UNet's conditioning once."""
    if isinstance(unet, nn.Module) and family_of(unet).scheduler == "flow":
        raise ModelError(
            f"{fn} runs UNets; {type(unet).__name__} is a flow-matching transformer: use "
            f"{fn.replace('ddim', 'flow')}(parts.transformer, parts.scheduler, latents, embeds, "
            "...) from attnpatch.diffusion"
        )
    b = _check_latents(fn, unet, latents)
    if isinstance(guidance_scale, bool) or not math.isfinite(float(guidance_scale)):
        raise AttnPatchError(
            f"{fn}: guidance_scale must be a finite number, got {guidance_scale!r}; pass e.g. 7.5"
        )
    g = float(guidance_scale)
    halves = _halves(g)
    states = _encoder_states(fn, unet, latents, cond, uncond, halves, g)
    added = _added_kwargs(fn, unet, added_cond_kwargs, b, halves)
    dtype = unet_dtype(unet)
    if dtype is not None and dtype != latents.dtype:
        states = _cast(states, dtype)
        if added is not None:
            added = {k: _cast(v, dtype) for k, v in added.items()}
    else:
        dtype = None
    return Conditioning(states, added, g, both=len(halves) == 2, dtype=dtype)


def unet_dtype(unet: nn.Module) -> torch.dtype | None:
    """The dtype of ``unet``'s first floating parameter (``None`` if it has none)."""
    for p in unet.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return ControlledAttnProcessor.half_cast(value, dtype)
    return value
