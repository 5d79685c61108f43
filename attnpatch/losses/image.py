"""Pixel-space losses: L2 distance, total variation, non-printability; and mask resizing.

Every loss here is minimised and returns a per-image value reduced over the batch by
``reduction`` (``"mean"`` (default) | ``"sum"`` | ``"none"`` -> ``(B,)``).

* :func:`l2_norm` -- squared L2 distance between two ``(B, C, H, W)`` tensors (images or
  latents), optionally weighted by a mask.
* :func:`total_variation` -- anisotropic L1 total variation of a patch (smoothness prior).
* :func:`non_printability_score` -- mean distance of each pixel to its nearest printable colour.
* :func:`downsample_mask` -- a ``(B, 1, H, W)`` mask averaged down to a map's ``(h, w)`` by an
  integer factor; the region loss and :func:`l2_norm` on latents use it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError
from ..images import check_image
from ._reduce import check_reduction, reduce

__all__ = [
    "l2_norm",
    "total_variation",
    "non_printability_score",
    "printable_palette",
    "downsample_mask",
    "L2Norm",
    "TotalVariation",
    "NonPrintabilityScore",
    "PRINTABLE_LEVELS",
]


#: Channel levels of the default palette: the 27 colours of the grid ``PRINTABLE_LEVELS ** 3``.
#: Illustrative, not measured: ordinary printers compress the gamut, so pure black, pure white
#: and fully saturated primaries are left out. Measure your own printer (see
#: :func:`printable_palette`).
PRINTABLE_LEVELS = (0.1, 0.5, 0.9)


def _check_tensor(x: object, name: str, ndim: int | tuple[int, ...], layout: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor {layout}, got {type(x).__name__}")
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if x.ndim not in dims:
        raise InputError(f"{name} must be {layout}, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise InputError(f"{name} must be a floating-point tensor, got {x.dtype}: use .float()")
    return x


def downsample_mask(
    mask: torch.Tensor, size: tuple[int, int], *, name: str = "mask"
) -> torch.Tensor:
    """Average a mask down to ``size = (h, w)`` by an integer factor.

    Args:
        mask: ``(B, 1, H, W)`` or ``(B, H, W)`` in [0, 1] (1 = patch pixel).
        size: the target ``(h, w)``, e.g. an attention map's or a latent's resolution.

    Returns:
        ``(B, 1, h, w)`` in [0, 1]: each output cell is the mean of the ``f x f`` block of mask
        pixels it covers (area averaging: the same numbers as ``F.adaptive_avg_pool2d`` or
        ``interpolate(mode="area")`` for an integer factor), i.e. the fraction of the cell
        covered by the patch. Differentiable in ``mask``.

    Raises:
        InputError: unless ``H == f * h`` and ``W == f * w`` for one integer ``f >= 1``
            (the same factor on both axes; a UNet's maps satisfy it for the image the UNet saw
            when the latent size is divisible by the UNet's downsampling). A mask at any other
            size belongs to a different image size, or was resized non-uniformly: resize the
            mask to the size of the image that produced the maps.

    >>> mask = torch.zeros(1, 1, 8, 8); mask[..., :4, :4] = 1
    >>> downsample_mask(mask, (2, 2)).flatten().tolist()
    [1.0, 0.0, 0.0, 0.0]
    """
    mask = _check_tensor(mask, name, (3, 4), "(B, 1, H, W) or (B, H, W)")
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)
    if mask.shape[1] != 1:
        raise InputError(
            f"{name} must have one channel, (B, 1, H, W) or (B, H, W), got shape "
            f"{tuple(mask.shape)}; reduce an RGB mask with mask.amax(dim=1, keepdim=True)"
        )
    with torch.no_grad():
        lo, hi = float(mask.min()), float(mask.max())
    if not (lo >= 0.0 and hi <= 1.0):  # also rejects NaN
        raise InputError(
            f"{name} must lie in [0, 1] (1 = patch), got values in [{lo:.4g}, {hi:.4g}]"
        )
    h, w = int(size[0]), int(size[1])
    big_h, big_w = mask.shape[-2:]
    if (big_h, big_w) == (h, w):
        return mask
    factor = big_h // h if h > 0 else 0
    if factor < 1 or big_h != factor * h or big_w != factor * w:
        raise InputError(
            f"{name} of size {big_h}x{big_w} does not match maps of resolution {h}x{w}: the "
            f"mask must be the maps' size times one integer factor on both axes (e.g. "
            f"{h * 8}x{w * 8} for a factor of 8). Pass the mask at the size of the image that "
            f"produced the maps, or resize it to {h}x{w} yourself"
        )
    # The mean of each f x f block, by reshaping (F.avg_pool2d gives the same numbers but is
    # ~1000x slower on float64 CPU tensors in torch 2.13).
    return mask.unflatten(-1, (w, factor)).unflatten(-3, (h, factor)).mean(dim=(-3, -1))


def l2_norm(
    adv: torch.Tensor,
    clean: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Squared L2 distance ``sum_{c,y,x} m * (adv - clean)**2`` per image, reduced over the batch.

    Works on images and latents alike (no value-range check).

    Args:
        adv: ``(B, C, H, W)``, e.g. the adversarial image in [0, 1] or its latent ``(B, 4, h, w)``.
        clean: ``(B, C, H, W)`` or ``(1, C, H, W)`` (broadcast over the batch).
        mask: optional per-pixel weights ``(B, 1, H', W')`` / ``(B, H', W')`` in [0, 1], with
            batch ``B`` or 1. ``(H', W')`` is ``(H, W)`` or an integer multiple of it: a mask at
            image resolution is averaged down to a latent's resolution
            (:func:`downsample_mask`). ``None`` weighs every pixel 1.
        reduction: ``"mean"`` over the batch (default), ``"sum"``, or ``"none"`` -> ``(B,)``.

    Returns:
        A scalar, or ``(B,)`` with ``reduction="none"``; >= 0.

    >>> l2_norm(torch.ones(2, 3, 4, 4), torch.zeros(2, 3, 4, 4))
    tensor(48.)
    """
    check_reduction(reduction)
    adv = _check_tensor(adv, "adv", 4, "(B, C, H, W)")
    clean = _check_tensor(clean, "clean", 4, "(B, C, H, W)")
    if clean.shape[1:] != adv.shape[1:] or clean.shape[0] not in (1, adv.shape[0]):
        raise InputError(
            f"clean {tuple(clean.shape)} must have the shape of adv {tuple(adv.shape)} (or batch "
            f"1); compare images with images and latents with latents"
        )
    sq = (adv - clean).square()
    if mask is not None:
        weights = downsample_mask(mask, tuple(adv.shape[-2:]))
        if weights.shape[0] not in (1, adv.shape[0]):
            raise InputError(
                f"mask has batch {weights.shape[0]} but adv has batch {adv.shape[0]}; pass one "
                f"mask per image or a single mask (batch 1) for all"
            )
        sq = sq * weights.to(sq.dtype)
    return reduce(sq.flatten(1).sum(dim=1), reduction)


def total_variation(
    x: torch.Tensor, *, normalize: bool = True, reduction: str = "mean"
) -> torch.Tensor:
    """Anisotropic L1 total variation of an image or patch.

    With ``dy = x[..., 1:, :] - x[..., :-1, :]`` and ``dx = x[..., :, 1:] - x[..., :, :-1]``:

    * ``normalize=True`` (default): ``mean|dy| + mean|dx|``, each mean over its own differences
      (``C (H-1) W`` and ``C H (W-1)``), so the value does not grow with the patch size and a
      weight tuned on one patch size carries over;
    * ``normalize=False``: ``sum|dy| + sum|dx|`` (the textbook sum, kornia's ``"sum"``).

    Args:
        x: ``(B, C, H, W)`` or one patch ``(C, H, W)``; any value range.
        reduction: over the batch: ``"mean"`` (default), ``"sum"``, ``"none"`` -> ``(B,)``
            (a 0-d tensor for a ``(C, H, W)`` input).

    Returns:
        A scalar >= 0 (or ``(B,)``). A singleton axis contributes 0. The gradient of ``|d|`` at
        ``d == 0`` is 0 (PyTorch's subgradient).

    >>> total_variation(torch.tensor([[[0.0, 1.0], [0.0, 1.0]]]))
    tensor(1.)
    """
    check_reduction(reduction)
    x = _check_tensor(x, "x", (3, 4), "(B, C, H, W) or (C, H, W)")
    single = x.ndim == 3
    if single:
        x = x.unsqueeze(0)
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1)
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1)
    if normalize:
        ty = dy.mean(dim=1) if dy.shape[1] else dy.sum(dim=1)
        tx = dx.mean(dim=1) if dx.shape[1] else dx.sum(dim=1)
    else:
        ty, tx = dy.sum(dim=1), dx.sum(dim=1)
    values = ty + tx
    if single:
        return values[0]
    return reduce(values, reduction)


def printable_palette(
    colors: torch.Tensor | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A palette of printable colours, ``(N, 3)`` RGB in [0, 1].

    Args:
        colors: ``None`` for the built-in illustrative palette (27 colours, the grid
            ``PRINTABLE_LEVELS ** 3``), or your measured colours: ``(N, 3)`` floats in [0, 1] or
            integers in [0, 255]. To measure: print a chart of colour squares, photograph it
            under the lighting of the attack, average each square's pixels.

    >>> printable_palette().shape
    torch.Size([27, 3])
    >>> printable_palette(torch.tensor([[255, 0, 0]]))
    tensor([[1., 0., 0.]])
    """
    if colors is None:
        levels = torch.tensor(PRINTABLE_LEVELS, dtype=dtype, device=device)
        return torch.cartesian_prod(levels, levels, levels)
    if not isinstance(colors, torch.Tensor):
        raise InputError(
            f"palette must be a torch.Tensor (N, 3), got {type(colors).__name__}; "
            f"wrap it: torch.tensor(colors)"
        )
    if colors.ndim != 2 or colors.shape[1] != 3 or colors.shape[0] < 1:
        raise InputError(f"palette must be (N, 3) RGB with N >= 1, got shape {tuple(colors.shape)}")
    if colors.is_floating_point():
        out, high = colors, 1.0
    else:
        out, high = colors.to(dtype) / 255.0, 255.0
    lo, hi = float(colors.min()), float(colors.max())
    if not (lo >= 0.0 and hi <= high):
        hint = " They look like [0, 255] values: divide by 255." if hi > 1.0 and high == 1.0 else ""
        raise InputError(
            f"palette colours must lie in [0, {high:g}], got [{lo:.4g}, {hi:.4g}].{hint}"
        )
    return out.to(device=device if device is not None else out.device, dtype=dtype)


def non_printability_score(
    x: torch.Tensor,
    palette: torch.Tensor | None = None,
    *,
    reduction: str = "mean",
    eps: float = 1e-12,
) -> torch.Tensor:
    """Mean distance of each pixel to its nearest printable colour.

    ``NPS(x) = mean_{y,x} min_c sqrt(||x[:, y, x] - c||^2 + eps)`` over the palette colours
    ``c``. The minimum (as in the adversarial-yolo lineage) rather than Sharif et al.'s product
    over colours keeps the value in RGB distance units (0 = every pixel printable exactly) and
    its gradient pulls each pixel towards one colour. ``eps`` keeps the gradient finite at 0.

    Args:
        x: ``(B, 3, H, W)`` or one patch ``(3, H, W)``, RGB in [0, 1].
        palette: ``(N, 3)`` in [0, 1] (see :func:`printable_palette`); ``None`` = the built-in
            illustrative palette.
        reduction: over the batch: ``"mean"`` (default), ``"sum"``, ``"none"`` -> ``(B,)``.

    Returns:
        A scalar in [0, sqrt(3)] (or ``(B,)``; 0-d for a ``(3, H, W)`` input).

    >>> grey = torch.full((3, 2, 2), 0.5)
    >>> non_printability_score(grey, torch.tensor([[0.5, 0.5, 0.1], [0.0, 0.0, 0.0]]))
    tensor(0.4000)
    """
    check_reduction(reduction)
    x = _check_tensor(x, "x", (3, 4), "(B, 3, H, W) or (3, H, W)")
    single = x.ndim == 3
    if single:
        x = x.unsqueeze(0)
    check_image(x, (0.0, 1.0), channels=3, name="x")
    pal = printable_palette(palette, device=x.device, dtype=x.dtype)
    pixels = x.flatten(2).transpose(1, 2)  # (B, H*W, 3)
    sq = (pixels.unsqueeze(2) - pal).square().sum(dim=-1)  # (B, H*W, N)
    dist = (sq.amin(dim=-1) + eps).sqrt()  # (B, H*W)
    values = dist.mean(dim=1)
    if single:
        return values[0]
    return reduce(values, reduction)


class L2Norm(nn.Module):
    """Module form of :func:`l2_norm`: ``L2Norm()(adv, clean, mask=None)``."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        check_reduction(reduction)
        self.reduction = reduction

    def forward(
        self, adv: torch.Tensor, clean: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return l2_norm(adv, clean, mask=mask, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class TotalVariation(nn.Module):
    """Module form of :func:`total_variation`: ``TotalVariation()(patch)``."""

    def __init__(self, normalize: bool = True, reduction: str = "mean"):
        super().__init__()
        check_reduction(reduction)
        self.normalize = normalize
        self.reduction = reduction

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return total_variation(x, normalize=self.normalize, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"normalize={self.normalize}, reduction={self.reduction!r}"


class NonPrintabilityScore(nn.Module):
    """Module form of :func:`non_printability_score`; the palette is a buffer (moves with .to()).

    >>> NonPrintabilityScore()(torch.rand(2, 3, 8, 8)).shape
    torch.Size([])
    """

    palette: torch.Tensor

    def __init__(self, palette: torch.Tensor | None = None, reduction: str = "mean"):
        super().__init__()
        check_reduction(reduction)
        self.register_buffer("palette", printable_palette(palette))
        self.reduction = reduction

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return non_printability_score(x, self.palette, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"colors={self.palette.shape[0]}, reduction={self.reduction!r}"
