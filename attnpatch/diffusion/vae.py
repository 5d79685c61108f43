"""Differentiable VAE encode / decode between diffusion-side images and UNet latents.

The UNet works on *scaled* latents: ``z = (mean(E(x)) - shift) * scaling_factor``, with
``scaling_factor = 0.18215`` for SD1.x/2.x, ``0.13025`` for SDXL, and ``shift_factor`` only in
SD3/Flux-style configs (``None`` elsewhere). Configs that carry per-channel ``latents_mean`` and
``latents_std`` (some SDXL-derived VAEs) are normalised as diffusers' SDXL pipelines do:
``z = (E(x) - latents_mean) * scaling_factor / latents_std``. :func:`vae_decode` inverts exactly
the same map before decoding.

Nothing here runs under ``no_grad``; gradients reach the images (encode) and the latents
(decode). The VAE's own weights are whatever the caller made them (frozen in attnpatch's
loaders).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from ..errors import AttnPatchError
from ..images import DIFFUSION_RANGE, check_image

__all__ = ["vae_encode", "vae_decode", "vae_scale_factor"]


def vae_scale_factor(vae: nn.Module) -> int:
    """The VAE's spatial downsampling factor: ``2 ** (len(block_out_channels) - 1)``.

    8 for every SD1.x / SD2.x / SDXL VAE, 2 for ``attnpatch.testing.tiny_vae()``. Latents are
    ``(B, latent_channels, H / f, W / f)`` for images ``(B, 3, H, W)``.

    >>> from attnpatch.testing import tiny_vae
    >>> vae_scale_factor(tiny_vae())
    2
    """
    config = getattr(vae, "config", None)
    channels = getattr(config, "block_out_channels", None)
    if not channels:
        raise AttnPatchError(
            f"{type(vae).__name__} has no config.block_out_channels, so its downsampling factor "
            "is unknown; pass a diffusers AutoencoderKL (e.g. pipe.vae)"
        )
    return 2 ** (len(channels) - 1)


def _latent_affine(
    vae: nn.Module, like: torch.Tensor
) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """``(offset, scale)`` with ``z_scaled = (z - offset) * scale``, broadcastable to ``like``."""
    config = vae.config
    scaling = float(getattr(config, "scaling_factor", 1.0) or 1.0)
    mean = getattr(config, "latents_mean", None)
    std = getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        shape = (1, -1, 1, 1)
        mean_t = torch.tensor(mean, device=like.device, dtype=like.dtype).view(shape)
        std_t = torch.tensor(std, device=like.device, dtype=like.dtype).view(shape)
        return mean_t, scaling / std_t
    shift = getattr(config, "shift_factor", None)
    return float(shift or 0.0), scaling


def vae_encode(
    vae: nn.Module,
    images: torch.Tensor,
    *,
    sample: bool = False,
    generator: torch.Generator | None = None,
    checkpoint: bool = False,
) -> torch.Tensor:
    """Encode diffusion-side images into scaled UNet latents, differentiably.

    Args:
        vae: a diffusers ``AutoencoderKL`` (``pipe.vae``).
        images: ``(B, 3, H, W)`` RGB in [-1, 1] (see :func:`attnpatch.to_diffusion_input`);
            ``H`` and ``W`` multiples of :func:`vae_scale_factor`. [0, 1] images cannot be told
            from bright [-1, 1] ones: a batch with no negative pixel gets a ``UserWarning``.
        sample: ``False`` (default) takes the posterior mean, deterministic, as
            prompt-to-prompt and null-text inversion do; ``True`` draws
            ``mean + std * noise`` (reparameterised: still differentiable).
        generator: the ``torch.Generator`` for ``sample=True``.
        checkpoint: recompute the encoder during backward, one resnet at a time inside one
            recomputed encode (nested non-reentrant checkpoints): only the input is kept until
            backward, and one resnet's activations are alive while it runs. Same values and
            gradients, about two extra encoder forwards. Ignored when grad is disabled.

    Returns:
        ``(B, latent_channels, H / f, W / f)`` latents ``(z - shift) * scaling_factor`` (see the
        module docstring), in the VAE's dtype and on its device.

    >>> from attnpatch.testing import tiny_vae
    >>> vae_encode(tiny_vae(), torch.rand(1, 3, 16, 16) * 2 - 1).shape
    torch.Size([1, 4, 8, 8])
    """
    factor = vae_scale_factor(vae)
    check_image(images, DIFFUSION_RANGE, channels=vae.config.in_channels, name="images")
    if float(images.detach().amin()) >= 0.0:
        warnings.warn(
            "vae_encode: no pixel of the batch is below 0, as with [0, 1] images; vae_encode "
            "takes [-1, 1] (convert with attnpatch.to_diffusion_input). Ignore this if the "
            "images are [-1, 1] and merely bright.",
            UserWarning,
            stacklevel=2,
        )
    h, w = images.shape[-2:]
    if h % factor or w % factor:
        raise AttnPatchError(
            f"images of size {h}x{w} do not fit the VAE: height and width must be multiples of "
            f"its downsampling factor {factor}; resize with "
            f"attnpatch.to_diffusion_input(images_01, multiple={factor})"
        )
    if generator is not None and not sample:
        raise AttnPatchError(
            "a generator was passed but sample=False takes the posterior mean (no noise); "
            "pass sample=True to draw a sample, or drop the generator"
        )
    if checkpoint and torch.is_grad_enabled():
        posterior = torch_checkpoint(_encode_by_resnet, vae, images, use_reentrant=False)
    else:
        posterior = vae.encode(images).latent_dist
    z = posterior.sample(generator) if sample else posterior.mean
    offset, scale = _latent_affine(vae, z)
    return (z - offset) * scale


def _encode_by_resnet(vae: nn.Module, images: torch.Tensor) -> Any:
    """``vae.encode(images).latent_dist`` with each resnet / downsampler checkpointed."""
    from diffusers.models.resnet import Downsample2D, ResnetBlock2D

    wrapped = [
        m
        for m in vae.encoder.modules()
        if isinstance(m, (ResnetBlock2D, Downsample2D)) and "forward" not in m.__dict__
    ]
    try:
        for m in wrapped:
            m.forward = functools.partial(_checkpointed, type(m).forward.__get__(m))
        return vae.encode(images).latent_dist
    finally:
        for m in wrapped:
            m.__dict__.pop("forward", None)


def _checkpointed(forward: Any, *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return torch_checkpoint(forward, *args, use_reentrant=False, **kwargs)


def vae_decode(vae: nn.Module, latents: torch.Tensor, *, clamp: bool = False) -> torch.Tensor:
    """Decode scaled UNet latents into diffusion-side images, differentiably.

    Args:
        vae: a diffusers ``AutoencoderKL``.
        latents: ``(B, latent_channels, h, w)`` scaled latents as :func:`vae_encode` returns them.
        clamp: clamp the output to [-1, 1]. Off by default: the decoder's output is only
            *approximately* in [-1, 1], and a clamp zeroes the gradient of every pixel outside
            that range. Map to the classifier side with ``((x + 1) / 2).clamp(0, 1)`` only where
            a valid image is needed, knowing that cost.

    Returns:
        ``(B, 3, h * f, w * f)`` RGB, approximately in [-1, 1] (exactly when ``clamp=True``).

    >>> from attnpatch.testing import tiny_vae
    >>> vae_decode(tiny_vae(), torch.randn(1, 4, 8, 8)).shape
    torch.Size([1, 3, 16, 16])
    """
    channels = vae.config.latent_channels
    if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or latents.shape[1] != channels:
        shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents)
        raise AttnPatchError(
            f"latents must be a (B, {channels}, h, w) tensor for this VAE, got {shape}; pass "
            "the output of vae_encode / ddim_denoise (add a batch dim with .unsqueeze(0))"
        )
    offset, scale = _latent_affine(vae, latents)
    images = vae.decode(latents / scale + offset, return_dict=False)[0]
    return images.clamp(-1.0, 1.0) if clamp else images
