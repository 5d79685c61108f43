"""Image-format checks and the classifier-side -> diffusion-side conversion.

Two conventions meet in this library:

* classifier side: ``(B, 3, H, W)`` float RGB in [0, 1] (what every classifier is fed; the
  registry wraps each classifier with its own normalisation);
* diffusion side: ``(B, 3, H, W)`` float RGB in [-1, 1], ``H`` and ``W`` multiples of the VAE's
  downsampling factor (8 for SD, 2 for the tiny VAE).

:func:`check_image` guards both; :func:`to_diffusion_input` converts, differentiably.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import AttnPatchError

__all__ = ["check_image", "to_diffusion_input", "CLASSIFIER_RANGE", "DIFFUSION_RANGE"]

CLASSIFIER_RANGE = (0.0, 1.0)
DIFFUSION_RANGE = (-1.0, 1.0)


def check_image(
    x: torch.Tensor,
    value_range: tuple[float, float] = CLASSIFIER_RANGE,
    *,
    channels: int | None = 3,
    name: str = "images",
    tolerance: float = 1e-4,
) -> torch.Tensor:
    """Raise :class:`AttnPatchError` (a ``ValueError``) unless ``x`` is a sane image batch.

    Checks, in order: a tensor; 4-D ``(B, C, H, W)``; a floating dtype; channels-first (a
    ``(B, H, W, C)`` batch with ``C`` in {1, 3, 4} is reported as channels-last with the fix);
    ``C == channels`` (skip with ``channels=None``); no NaN/Inf; values inside ``value_range``
    up to ``tolerance`` (a [0, 255] batch, or a [0, 1] batch where [-1, 1] is expected, is named
    as such). Returns ``x`` unchanged so it can be used inline.

    >>> check_image(torch.rand(2, 3, 8, 8)).shape
    torch.Size([2, 3, 8, 8])
    """
    if not isinstance(x, torch.Tensor):
        raise AttnPatchError(f"{name} must be a torch.Tensor (B, C, H, W), got {type(x).__name__}")
    if x.ndim != 4:
        hint = " (add a batch dimension: x.unsqueeze(0))" if x.ndim == 3 else ""
        raise AttnPatchError(f"{name} must be 4-D (B, C, H, W), got shape {tuple(x.shape)}{hint}")
    if not x.is_floating_point():
        raise AttnPatchError(
            f"{name} must be a floating-point tensor, got {x.dtype}; convert with "
            f"x.float() / 255 for uint8 images"
        )
    if channels is not None and x.shape[1] != channels:
        if x.shape[-1] == channels or (x.shape[-1] in (1, 3, 4) and x.shape[1] > 4):
            raise AttnPatchError(
                f"{name} look channels-last {tuple(x.shape)} (B, H, W, C); attnpatch expects "
                f"channels-first (B, C, H, W): pass x.permute(0, 3, 1, 2)"
            )
        raise AttnPatchError(
            f"{name} must have {channels} channels (RGB) in dim 1, got shape {tuple(x.shape)}"
        )
    if x.device.type == "meta":
        return x
    with torch.no_grad():
        if not torch.isfinite(x).all():
            raise AttnPatchError(f"{name} contain NaN or Inf values")
        lo, hi = float(x.min()), float(x.max())
    low, high = value_range
    if lo < low - tolerance or hi > high + tolerance:
        hint = ""
        if hi > 2.0 and high <= 1.0:
            hint = " They look like [0, 255] pixels: divide by 255."
        elif low == 0.0 and lo < 0.0 and lo >= -1.0 - tolerance:
            hint = " They look like [-1, 1] diffusion input: map back with (x + 1) / 2."
        raise AttnPatchError(
            f"{name} must lie in [{low:g}, {high:g}], got values in [{lo:.4g}, {hi:.4g}].{hint}"
        )
    return x


def to_diffusion_input(
    images: torch.Tensor,
    size: int | tuple[int, int] | None = None,
    *,
    multiple: int = 8,
) -> torch.Tensor:
    """Classifier side -> diffusion side, differentiably.

    Args:
        images: ``(B, 3, H, W)`` RGB in [0, 1].
        size: output ``(height, width)`` or one int for both; ``None`` keeps ``(H, W)``.
        multiple: the VAE's downsampling factor (``2 ** (len(vae.config.block_out_channels) - 1)``,
            8 for SD). The output size is rounded up to a multiple of it.

    Returns:
        ``(B, 3, h, w)`` in [-1, 1] with ``h`` and ``w`` multiples of ``multiple``; resizing is
        bilinear (antialiased when shrinking), so gradients reach ``images``.
    """
    check_image(images, CLASSIFIER_RANGE)
    if multiple < 1:
        raise AttnPatchError(f"multiple must be >= 1, got {multiple}")
    if size is None:
        h, w = images.shape[-2:]
    elif isinstance(size, int):
        h = w = size
    else:
        h, w = size
    h = -(-int(h) // multiple) * multiple
    w = -(-int(w) // multiple) * multiple
    x = images
    if (h, w) != tuple(images.shape[-2:]):
        shrink = h < images.shape[-2] or w < images.shape[-1]
        # Bilinear (and its antialiased form) weights are convex: the range stays [0, 1].
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=shrink)
    return x * 2.0 - 1.0
