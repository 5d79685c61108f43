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
loops: private ``DDIMScheduler`` / ``DDIMInverseScheduler`` copies built from the user's
``scheduler.config`` (the user's scheduler is never mutated), diffusers' ``step()`` (which is
differentiable), the UNet called once per step. Nothing runs under ``no_grad`` and nothing
works in place, so gradients reach the latents, the embeddings and anything upstream. This
module knows nothing about attention control: wrap a call in ``with hijack(...)`` to read maps.

Classifier-free guidance: with ``guidance_scale = g`` the UNet runs once per step on the batch
``[uncond; cond]`` (diffusers' order) and ``out = out_u + g * (out_c - out_u)`` is applied to the
raw model output (any prediction type). ``g == 1`` runs the cond half only (``uncond`` is not
needed), ``g == 0`` the uncond half only (DiffAttack's inversion); both give the same values as
the full batch at half the cost.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
from collections.abc import Mapping
from typing import Any

import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler
from torch import nn

from ..errors import AttnPatchError
from ..hooks import checkpoint as _checkpoint

__all__ = ["ddim_invert", "ddim_denoise", "ddim_timesteps"]

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
        raise AttnPatchError(f"{name} must be an int, got {value!r}; pass e.g. {name}=10")
    if not low <= value <= high:
        raise AttnPatchError(f"{name}={value} is out of range: {why}")


def _schedule(
    fn: str, scheduler: Any, num_inference_steps: int, num_steps: int, inverse: bool
) -> tuple[Any, tuple[int, ...], slice]:
    """The private scheduler, its full timesteps as ints, and the slice of them that runs."""
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
    k = num_steps
    return sched, timesteps, slice(0, k) if inverse else slice(num_inference_steps - k, None)


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
    _, timesteps, run = _schedule(fn, scheduler, num_inference_steps, num_steps, inverse)
    return list(timesteps[run])


# ----------------------------------------------------------------------------- validation


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
    unet_dtype = getattr(unet, "dtype", None)
    if (
        isinstance(unet_dtype, torch.dtype)
        and latents.dtype != unet_dtype
        and not torch.is_autocast_enabled(latents.device.type)
    ):
        raise AttnPatchError(
            f"{fn}: latents are {latents.dtype} but the UNet's weights are {unet_dtype}; pass "
            f"latents.to({unet_dtype}) (and embeddings of the same dtype), or run under "
            "torch.autocast"
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
                "attnpatch.sdxl_added_cond_kwargs(pooled, size, uncond_pooled=..., batch_size=B)"
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


# ----------------------------------------------------------------------------- the loop


def _model_output(
    unet: nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    states: torch.Tensor,
    added: dict[str, Any] | None,
    guidance_scale: float,
    both: bool,
) -> torch.Tensor:
    """One UNet call, guidance applied to the raw output: ``(B, C, h, w)``."""
    if not both:
        return unet(x, t, encoder_hidden_states=states, added_cond_kwargs=added, return_dict=False)[
            0
        ]
    out = unet(
        torch.cat([x, x]),
        t,
        encoder_hidden_states=states,
        added_cond_kwargs=added,
        return_dict=False,
    )[0]
    out_u, out_c = out.chunk(2)
    return out_u + guidance_scale * (out_c - out_u)


def _run(
    fn: str,
    inverse: bool,
    unet: nn.Module,
    scheduler: Any,
    latents: torch.Tensor,
    cond: torch.Tensor,
    num_inference_steps: int,
    num_steps: int,
    uncond: torch.Tensor | None,
    guidance_scale: float,
    added_cond_kwargs: Mapping[str, Any] | None,
    checkpoint: bool,
) -> torch.Tensor:
    sched, all_timesteps, run = _schedule(fn, scheduler, num_inference_steps, num_steps, inverse)
    b = _check_latents(fn, unet, latents)
    if isinstance(guidance_scale, bool) or not math.isfinite(float(guidance_scale)):
        raise AttnPatchError(
            f"{fn}: guidance_scale must be a finite number, got {guidance_scale!r}; pass e.g. 7.5"
        )
    guidance_scale = float(guidance_scale)
    halves = _halves(guidance_scale)
    states = _encoder_states(fn, unet, latents, cond, uncond, halves, guidance_scale)
    added = _added_kwargs(fn, unet, added_cond_kwargs, b, halves)
    both = len(halves) == 2
    # step() gets Python ints (no device sync to index alphas_cumprod); the UNet gets 0-d
    # tensors already on the latents' device (copied once per schedule and device, then cached).
    timesteps = all_timesteps[run]
    t_device = _device_timesteps(all_timesteps, latents.device)[run]
    use_checkpoint = checkpoint and torch.is_grad_enabled()
    x = latents
    for t, t_tensor in zip(timesteps, t_device):
        if use_checkpoint:
            out = _checkpoint(
                _model_output, unet, x, t_tensor, states, added, guidance_scale, both, module=unet
            )
        else:
            out = _model_output(unet, x, t_tensor, states, added, guidance_scale, both)
        x = sched.step(out, t, x, return_dict=False)[0]
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
) -> torch.Tensor:
    """Push clean latents up ``num_steps`` DDIM steps, differentiably.

    The first ``k`` steps of diffusers' ``DDIMInverseScheduler`` loop (built from
    ``scheduler.config``): at each inverse timestep ``t`` (``t_{N-1}, ..., t_{N-k}``) the UNet
    is called as ``unet(x, t)`` and ``step`` moves ``x`` from the previous level up to level
    ``t``. The clean latent is thus "regarded as z1": the UNet sees it at ``t_{N-1}``.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (frozen or not; its weights get gradients
            only if they require them).
        scheduler: a ``DDIMScheduler`` or ``DDIMInverseScheduler``; only its ``config`` is read
            (private copies are stepped, cached per config and N). Other schedulers raise:
            convert with ``DDIMScheduler.from_config(pipe.scheduler.config)``.
        latents: ``(B, 4, h, w)`` scaled latents (``vae_encode``'s output for inversion).
        cond: ``(B, L, D)`` or ``(1, L, D)`` prompt embeddings; one row is shared by all ``B``
            latents. ``D`` must equal ``unet.config.cross_attention_dim``.
        num_inference_steps: ``N``, the length of the DDIM schedule.
        num_steps: ``k`` in ``[1, N]``, how many of its steps to run.
        uncond: ``(B or 1, L, D)`` unconditional embeddings; needed when ``guidance_scale``
            is not 1.
        guidance_scale: ``g``; ``out_u + g * (out_c - out_u)``. 1 runs cond only, 0 uncond
            only (one half of the batch each); anything else runs ``[uncond; cond]`` (2B).
        added_cond_kwargs: extra UNet conditioning (SDXL: ``text_embeds`` (n, P), ``time_ids``
            (n, 6); see ``sdxl_added_cond_kwargs``). Tensor rows: ``n = 1`` or ``B`` serve both
            guidance halves, ``n = 2B`` is ``[uncond; cond]`` (the halves that do not run are
            dropped). Required for UNets whose ``addition_embed_type`` needs it.
        checkpoint: recompute each UNet call during backward
            (``attnpatch.recompute.checkpoint``: non-reentrant, re-installing the forward-time
            attention processors), so activation memory does not grow with ``num_steps``;
            same values and gradients, about one extra UNet forward per step in backward.
            Ignored when grad is disabled.

    Returns:
        ``(B, 4, h, w)`` latents at level ``t_{N-k}``: pass them to :func:`ddim_denoise`
        with the same ``num_inference_steps`` and ``num_steps``.

    >>> from attnpatch.testing import tiny_sd
    >>> sd = tiny_sd()
    >>> z, cond = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 8)
    >>> zt = ddim_invert(sd.unet, sd.scheduler, z, cond, num_inference_steps=10, num_steps=3)
    >>> z0 = ddim_denoise(sd.unet, sd.scheduler, zt, cond, num_inference_steps=10, num_steps=3)
    >>> z0.shape
    torch.Size([1, 4, 8, 8])
    """
    return _run(
        "ddim_invert",
        True,
        unet,
        scheduler,
        latents,
        cond,
        num_inference_steps,
        num_steps,
        uncond,
        guidance_scale,
        added_cond_kwargs,
        checkpoint,
    )


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
) -> torch.Tensor:
    """Run the last ``num_steps`` DDIM steps, differentiably.

    The steps ``N-k, ..., N-1`` of diffusers' ``DDIMScheduler`` loop (built from
    ``scheduler.config``; the seed's "jump to timestep index N-k"): ``latents`` are taken to be
    at level ``t_{N-k}``; each step calls ``unet(x, t_i)`` and ``step`` moves ``x`` to the next
    level, the last one to the final level (``final_alpha_cumprod``).

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (frozen or not; its weights get gradients
            only if they require them).
        scheduler: a ``DDIMScheduler`` or ``DDIMInverseScheduler``; only its ``config`` is read
            (private copies are stepped, cached per config and N). Other schedulers raise:
            convert with ``DDIMScheduler.from_config(pipe.scheduler.config)``.
        latents: ``(B, 4, h, w)`` scaled latents (``vae_encode``'s output for inversion).
        cond: ``(B, L, D)`` or ``(1, L, D)`` prompt embeddings; one row is shared by all ``B``
            latents. ``D`` must equal ``unet.config.cross_attention_dim``.
        num_inference_steps: ``N``, the length of the DDIM schedule.
        num_steps: ``k`` in ``[1, N]``, how many of its steps to run.
        uncond: ``(B or 1, L, D)`` unconditional embeddings; needed when ``guidance_scale``
            is not 1.
        guidance_scale: ``g``; ``out_u + g * (out_c - out_u)``. 1 runs cond only, 0 uncond
            only (one half of the batch each); anything else runs ``[uncond; cond]`` (2B).
        added_cond_kwargs: extra UNet conditioning (SDXL: ``text_embeds`` (n, P), ``time_ids``
            (n, 6); see ``sdxl_added_cond_kwargs``). Tensor rows: ``n = 1`` or ``B`` serve both
            guidance halves, ``n = 2B`` is ``[uncond; cond]`` (the halves that do not run are
            dropped). Required for UNets whose ``addition_embed_type`` needs it.
        checkpoint: recompute each UNet call during backward
            (``attnpatch.recompute.checkpoint``: non-reentrant, re-installing the forward-time
            attention processors), so activation memory does not grow with ``num_steps``;
            same values and gradients, about one extra UNet forward per step in backward.
            Ignored when grad is disabled.

    Returns:
        ``(B, 4, h, w)`` denoised latents (decode with ``vae_decode``).

    >>> from attnpatch.testing import tiny_sd
    >>> sd = tiny_sd()
    >>> x = torch.randn(2, 4, 8, 8)
    >>> ddim_denoise(sd.unet, sd.scheduler, x, torch.randn(1, 77, 8), uncond=torch.zeros(1, 77, 8),
    ...              guidance_scale=7.5, num_inference_steps=10, num_steps=2).shape
    torch.Size([2, 4, 8, 8])
    """
    return _run(
        "ddim_denoise",
        False,
        unet,
        scheduler,
        latents,
        cond,
        num_inference_steps,
        num_steps,
        uncond,
        guidance_scale,
        added_cond_kwargs,
        checkpoint,
    )
