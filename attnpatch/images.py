"""Image-format checks, the classifier-side -> diffusion-side conversion, 8-bit output, and
reading image files (:func:`read_image`, every reader of the library uses it).

Two conventions meet in this library:

* classifier side: ``(B, 3, H, W)`` float RGB in [0, 1] (what every classifier is fed; the
  registry wraps each classifier with its own normalisation);
* diffusion side: ``(B, 3, H, W)`` float RGB in [-1, 1], ``H`` and ``W`` multiples of the VAE's
  downsampling factor (8 for SD, 2 for the tiny VAE).

:func:`check_image` guards both; :func:`to_diffusion_input` converts, differentiably;
:func:`to_pil` / :func:`save_image` turn a classifier-side image into 8-bit pixels.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F

from ._util import as_pair, atomic_write
from .errors import DataError, ImageLayoutError, ImageRangeError, InputError

__all__ = [
    "check_image",
    "to_diffusion_input",
    "resize",
    "to_pil",
    "save_image",
    "read_image",
    "decode_image",
    "verify_image",
    "CLASSIFIER_RANGE",
    "DIFFUSION_RANGE",
]

CLASSIFIER_RANGE = (0.0, 1.0)
DIFFUSION_RANGE = (-1.0, 1.0)

_IMAGE_CHANNELS = (1, 3, 4)  # grey, RGB, RGBA: what a channels-last last dim looks like


def _looks_channels_last(shape: torch.Size, channels: int | None) -> bool:
    """``(B, H, W, C)``: a last dim that is a channel count, and two leading dims too big to be."""
    candidates = _IMAGE_CHANNELS if channels is None else (channels,)
    return shape[-1] in candidates and min(shape[1], shape[2]) > max(_IMAGE_CHANNELS)


def _range_hint(lo: float, hi: float, low: float, high: float) -> str:
    """The likeliest cause of an out-of-range batch, phrased as the fix."""
    if hi > 2.0 and high <= 1.0 and lo >= -1e-3:
        fix = "x / 255" if low == 0.0 else "x / 127.5 - 1"
        return f"They look like [0, 255] pixels: pass {fix}."
    if low == 0.0 and lo < 0.0 and lo >= -1.0 - 1e-3 and hi <= 1.0 + 1e-3:
        return "They look like [-1, 1] diffusion input: pass (x + 1) / 2."
    return f"Fix the conversion upstream, or clamp with x.clamp({low:g}, {high:g})."


def check_image(
    x: torch.Tensor,
    value_range: tuple[float, float] = CLASSIFIER_RANGE,
    *,
    channels: int | None = 3,
    name: str = "images",
    tolerance: float = 1e-4,
) -> torch.Tensor:
    """Raise :class:`~attnpatch.errors.ImageLayoutError` or
    :class:`~attnpatch.errors.ImageRangeError` (``InputError``s, so ``ValueError``s) unless ``x``
    is a sane image batch.

    Checks, in order: a tensor; 4-D ``(B, C, H, W)``; a floating dtype; channels-first (a
    ``(B, H, W, C)`` batch with ``C`` in {1, 3, 4} is reported as channels-last with the fix,
    also when ``channels=None``); ``C == channels`` (skip with ``channels=None``); no NaN/Inf;
    values inside ``value_range`` up to ``tolerance`` (a [0, 255] batch, or a [-1, 1] batch
    where [0, 1] is expected, is named as such). Every message says how to fix the input.

    The value checks read the data once (one ``aminmax`` pass; NaN propagates into it) and
    synchronise once with the device. They run on a detached view, so ``x``'s autograd graph is
    untouched. Tensors on the ``meta`` device skip the value checks. Returns ``x`` unchanged, so
    it can be used inline.

    >>> check_image(torch.rand(2, 3, 8, 8)).shape
    torch.Size([2, 3, 8, 8])
    >>> check_image(torch.rand(2, 3, 8, 8) * 2 - 1, (-1, 1)).shape
    torch.Size([2, 3, 8, 8])
    """
    low, high = float(value_range[0]), float(value_range[1])
    if not low < high:
        raise InputError(
            f"value_range must be (low, high) with low < high, got {tuple(value_range)}; "
            "pass e.g. (0, 1) or (-1, 1)"
        )
    if not isinstance(x, torch.Tensor):
        raise ImageLayoutError(
            f"{name} must be a torch.Tensor (B, C, H, W), got {type(x).__name__}; convert with "
            "torch.as_tensor(x) (and permute a channels-last array to channels-first)"
        )
    if x.ndim != 4:
        if x.ndim == 3:
            hint = "add a batch dimension: x.unsqueeze(0)"
        else:
            hint = "reshape it to one batch of channels-first images"
        raise ImageLayoutError(
            f"{name} must be 4-D (B, C, H, W), got shape {tuple(x.shape)}; {hint}"
        )
    if not x.is_floating_point():
        raise ImageLayoutError(
            f"{name} must be a floating-point tensor, got {x.dtype}; convert uint8 pixels with "
            f"x.float() / 255"
        )
    if (channels is None or x.shape[1] != channels) and _looks_channels_last(x.shape, channels):
        raise ImageLayoutError(
            f"{name} look channels-last {tuple(x.shape)} (B, H, W, C); attnpatch expects "
            f"channels-first (B, C, H, W): pass x.permute(0, 3, 1, 2)"
        )
    if channels is not None and x.shape[1] != channels:
        c = x.shape[1]
        if c == 1 and channels == 3:
            fix = "repeat a grey channel with x.expand(-1, 3, -1, -1)"
        elif c == 4 and channels == 3:
            fix = "drop the alpha channel with x[:, :3]"
        else:
            fix = f"pass {channels}-channel images"
        raise ImageLayoutError(
            f"{name} must have {channels} channels (RGB) in dim 1, got {c} in shape "
            f"{tuple(x.shape)}; {fix}"
        )
    if x.device.type == "meta" or x.numel() == 0:
        return x
    lo_t, hi_t = torch.aminmax(x.detach())
    lo, hi = torch.stack([lo_t, hi_t]).tolist()  # one device sync
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ImageRangeError(
            f"{name} contain NaN or Inf values; find where they arise upstream (a division by "
            "zero, a diverging loss or learning rate): replacing them would hide the bug"
        )
    if lo < low - tolerance or hi > high + tolerance:
        raise ImageRangeError(
            f"{name} must lie in [{low:g}, {high:g}], got values in [{lo:.4g}, {hi:.4g}]. "
            f"{_range_hint(lo, hi, low, high)}"
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
        multiple: the VAE's downsampling factor (``DiffusionParts.vae_scale_factor``,
            ``2 ** (len(vae.config.block_out_channels) - 1)``, 8 for SD). The output size is
            rounded *up* to a multiple of it.

    Returns:
        ``(B, 3, h, w)`` in [-1, 1] with ``h`` and ``w`` multiples of ``multiple``: ``2 * x - 1``
        of the resized images. Resizing is bilinear (``align_corners=False``), antialiased when
        either side shrinks; its weights are convex, so the range stays [-1, 1], and gradients
        reach ``images``. No resize happens when the size already fits.

    >>> to_diffusion_input(torch.rand(2, 3, 30, 30), multiple=8).shape
    torch.Size([2, 3, 32, 32])
    """
    check_image(images, CLASSIFIER_RANGE)
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise InputError(
            f"multiple must be a positive int (the VAE factor), got {multiple!r}; pass "
            "multiple=parts.vae_scale_factor (attnpatch.diffusion.vae_scale_factor(vae))"
        )
    h, w = tuple(images.shape[-2:]) if size is None else as_pair(size, "size")
    h = -(-h // multiple) * multiple
    w = -(-w // multiple) * multiple
    return resize(images, (h, w)) * 2.0 - 1.0


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize ``(B, C, H, W)`` to ``size = (h, w)`` as :func:`to_diffusion_input` does.

    Bilinear (``align_corners=False``), antialiased when either side shrinks; convex weights,
    so a [0, 1] input (an image, a patch mask) stays in [0, 1]. Differentiable; a no-op when
    the size already matches.
    """
    h, w = size
    if (h, w) == tuple(x.shape[-2:]):
        return x
    shrink = h < x.shape[-2] or w < x.shape[-1]
    # CPU has no antialiased kernel for half types: resize those in float32.
    upcast = shrink and x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16)
    y = x.float() if upcast else x
    y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False, antialias=shrink)
    return y.to(x.dtype) if upcast else y


def to_pil(image: torch.Tensor):
    """``(3, H, W)`` RGB or ``(4, H, W)`` RGBA in [0, 1] -> an 8-bit PIL image (``W x H``),
    each value clamped to [0, 1] and rounded to the nearest of 0..255.

    >>> to_pil(torch.ones(3, 2, 4)).size, to_pil(torch.zeros(4, 2, 2)).mode
    ((4, 2), 'RGBA')
    """
    from PIL import Image

    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] not in (3, 4):
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise InputError(
            f"to_pil takes one (3, H, W) or (4, H, W) image in [0, 1], got {got}; index a batch "
            "with images[i]"
        )
    x = image.detach().to("cpu", torch.float32).clamp(0, 1)
    array = (x * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(array))


def save_image(image: torch.Tensor, path: str | os.PathLike) -> None:
    """Write ``image`` (see :func:`to_pil`) as a PNG, atomically: a reader sees the old file or
    the new one, never half of one."""
    pil = to_pil(image)
    with atomic_write(path) as tmp:
        pil.save(tmp, format="PNG")


def read_image(
    path: str | os.PathLike, size: int | tuple[int, int] | None = None, *, resize: str = "crop"
) -> torch.Tensor:
    """One image file as ``(3, H, W)`` float RGB in [0, 1], read as :class:`ImageFolder` reads
    its files (EXIF orientation applied, alpha dropped; ``size`` and ``resize`` as there).
    Unreadable files raise :class:`~attnpatch.errors.DataError` naming the file."""
    if resize not in ("crop", "stretch"):
        raise InputError(f"resize must be 'crop' or 'stretch', got {resize!r}")
    hw = None if size is None else as_pair(size, "size")
    return decode_image(os.fspath(path), hw, resize).float() / 255.0


def decode_image(path: str, size: tuple[int, int] | None, resize: str) -> torch.Tensor:
    """Read one file -> ``(3, H, W)`` uint8 RGB (EXIF orientation applied, alpha dropped;
    16-bit and 32-bit grey images scaled to 8 bits, not clipped)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im = _to_8bit(im).convert("RGB")
            if size is not None and im.size != (size[1], size[0]):
                h, w = size
                if resize == "stretch":
                    box = (0.0, 0.0, float(im.width), float(im.height))
                else:  # "crop": the largest centred box with the target aspect ratio
                    scale = min(im.width / w, im.height / h)
                    bw, bh = w * scale, h * scale
                    left, top = (im.width - bw) / 2, (im.height - bh) / 2
                    box = (left, top, left + bw, top + bh)
                im = im.resize((w, h), Image.Resampling.BICUBIC, box=box)
            array = np.asarray(im, dtype=np.uint8).copy()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError
        raise _unreadable(path, e) from e
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _unreadable(path: str, e: Exception) -> DataError:
    """The error for an image file PIL cannot read; ``.reason`` is the short cause."""
    from PIL import Image

    if isinstance(e, Image.DecompressionBombError):
        reason = f"a decompression bomb: {' '.join(str(e).split())}"
        fix = (
            "remove it or save it smaller; raise PIL.Image.MAX_IMAGE_PIXELS only for a file you "
            "trust"
        )
    else:
        reason = f"{type(e).__name__}: {e}"
        fix = "delete the file, or re-save it as PNG/JPEG"
    error = DataError(f"cannot read image {path!r} ({reason}); {fix}")
    error.reason = reason  # type: ignore[attr-defined]
    return error


def verify_image(path: str | os.PathLike) -> tuple[int, int]:
    """Read an image file to its end without keeping its pixels; returns its ``(width,
    height)``. A PNG's chunks are checked to the last one, a JPEG is decoded at 1/8 scale (the
    whole stream is read), other formats are decoded. Raises
    :class:`~attnpatch.errors.DataError` naming the file for a file that is not an image, is
    truncated or is a decompression bomb (beyond Pillow's ``MAX_IMAGE_PIXELS`` limit); its
    ``reason`` attribute is the short cause."""
    from PIL import Image

    path = os.fspath(path)
    try:
        with Image.open(path) as im:
            size = im.size
            if im.format == "PNG":
                im.verify()
            else:
                if im.format == "JPEG":
                    im.draft(None, (1, 1))
                im.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError
        raise _unreadable(path, e) from e
    return size


def _to_8bit(im):
    """16-bit (``I;16*``, ``I``) and float (``F``) grey images as 8-bit ``L``.

    PIL's own ``convert("RGB")`` clips such values at 255 (a 16-bit photo becomes white)."""
    from PIL import Image

    if im.mode.startswith("I;16") or im.mode == "I":
        x = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or x.max(initial=0) > 255 else 255.0
    elif im.mode == "F":
        x = np.asarray(im, dtype=np.float64)
        top = 1.0 if x.max(initial=0) <= 1.0 else 255.0
    else:
        return im
    x = np.clip(np.rint(x * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(x, mode="L")
