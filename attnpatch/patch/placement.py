"""Where a patch goes on an image, and its differentiable application.

Conventions (the canonical layout):

* images are ``(B, 3, H, W)`` RGB in [0, 1] (the classifier side of :mod:`attnpatch.images`);
  a patch is ``pixels`` ``(1, 3, h, w)`` RGB in [0, 1] with its ``mask`` ``(1, 1, h, w)`` in
  [0, 1] (see :class:`attnpatch.patch.AdversarialPatch`);
* **scale** is the placed patch's longer side as a fraction of the image's shorter side
  (``scale=0.5`` on 32x48 images places a square patch as 16x16). ``None`` keeps the patch's own
  pixel size. For a circle of diameter ``scale`` the covered fraction of a square image is
  ``area = pi * scale**2 / 4``, i.e. ``scale = 2 * sqrt(area / pi)`` (Brown et al.'s relation);
  for a square patch ``area = scale**2``;
* **position** is where the placed patch's box (before EOT) goes: ``"random"`` (top-left corner
  uniform over all integer positions where the box fits, per image), ``"center"``, or a fixed
  ``(top, left)`` in pixels.

Application (:func:`apply_patch`) composites with premultiplied alpha::

    placed = warp([pixels * mask, mask])             # one resampling, (B, 4, H, W)
    patched = images * (1 - placed_mask) + placed_pixels_times_mask

so patch and mask always move together, pixels where the placed mask is 0 are exactly the
input's, and the result stays in [0, 1] by convexity. Without geometric EOT the patch is pasted
at integer offsets (resized first with :func:`attnpatch.images.resize`, antialiased when it
shrinks, if its scale changes): no resampling at all at native scale. With geometric EOT one
homography per image (placement composed with :func:`attnpatch.patch.eot_matrix`) drives a
single ``F.grid_sample``.

Randomness (placement and EOT) comes from a CPU generator: the ``generator`` you pass, or torch's
global CPU generator. :class:`PatchParams` holds one sampled draw, so two patches (e.g. the
trained one and a random-noise control) can be applied with identical placements and transforms.

>>> params = PatchParams(torch.tensor([[2, 3, 4, 4]]), image_size=(8, 8), patch_size=(4, 4))
>>> patched, mask = apply_patch(torch.zeros(1, 3, 8, 8), torch.ones(1, 3, 4, 4),
...                             torch.ones(1, 1, 4, 4), params)
>>> patched.shape, mask.sum().item(), patched[0, 0, 2, 3].item()
(torch.Size([1, 3, 8, 8]), 16.0, 1.0)
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .._util import as_pair
from ..errors import InputError
from ..images import check_image, resize
from .eot import EOTDraw, photometric

__all__ = ["PatchParams", "apply_patch", "patch_matrix", "sample_boxes", "POSITIONS"]

#: The named placements (besides a fixed ``(top, left)``).
POSITIONS = ("random", "center")

Scale = float | tuple[float, float] | None
Position = str | tuple[int, int]


# ----------------------------------------------------------------------------- validation


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_scale(scale: Any) -> Scale:
    if scale is None:
        return None
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        if not (math.isfinite(scale) and scale > 0):
            raise InputError(
                f"scale must be > 0 (the placed patch's longer side as a fraction of the image's "
                f"shorter side), got {scale!r}; e.g. scale=0.3, or None for the patch's own size"
            )
        return float(scale)
    try:
        lo, hi = (float(v) for v in scale)
    except (TypeError, ValueError):
        raise InputError(
            f"scale must be None, a number or a (low, high) range, got {scale!r}; e.g. (0.2, 0.4)"
        ) from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo <= 0 or lo > hi:
        raise InputError(
            f"scale range must satisfy 0 < low <= high, got ({lo:g}, {hi:g}); e.g. (0.2, 0.4)"
        )
    return (lo, hi)


def _check_position(position: Any) -> Position:
    if isinstance(position, str):
        if position not in POSITIONS:
            raise InputError(
                f"position must be 'random', 'center' or (top, left) in pixels, got {position!r}"
            )
        return position
    try:
        top, left = position
        ok = all(_is_int(v) and v >= 0 for v in (top, left))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InputError(
            f"position must be 'random', 'center' or (top, left) non-negative ints in pixels, "
            f"got {position!r}"
        )
    return (int(top), int(left))


def _placed_sizes(
    scales: torch.Tensor | None, image_size: tuple[int, int], patch_size: tuple[int, int], n: int
) -> torch.Tensor:
    """``(n, 2)`` int64 placed ``(height, width)`` for ``(n,)`` float64 scales (``None``: native)."""
    h, w = patch_size
    if scales is None:
        return torch.tensor([[h, w]], dtype=torch.int64).expand(n, 2).clone()
    longer = torch.floor(scales * min(image_size) + 0.5).clamp(min=1)
    shorter = torch.floor(longer * (min(h, w) / max(h, w)) + 0.5).clamp(min=1)
    sizes = torch.stack([longer, shorter], -1) if h >= w else torch.stack([shorter, longer], -1)
    return sizes.to(torch.int64)


def _check_fits(
    scale: Scale, position: Position, image_size: tuple[int, int], patch_size: tuple[int, int]
) -> None:
    largest = (
        None
        if scale is None
        else torch.tensor([scale if isinstance(scale, float) else scale[1]], dtype=torch.float64)
    )
    ph, pw = _placed_sizes(largest, image_size, patch_size, 1)[0].tolist()
    H, W = image_size
    if ph > H or pw > W:
        how = (
            f"the patch's own size {patch_size[0]}x{patch_size[1]}"
            if scale is None
            else f"scale {scale!r} (longer side / image's shorter side {min(image_size)})"
        )
        raise InputError(
            f"the patch is larger than the image: {how} places it as {ph}x{pw} px, but the images "
            f"are {H}x{W}; use a smaller scale (1.0 or less always fits), a smaller patch, or larger images"
        )
    if isinstance(position, tuple):
        top, left = position
        if top + ph > H or left + pw > W:
            raise InputError(
                f"position (top={top}, left={left}) puts the {ph}x{pw} px patch outside the "
                f"{H}x{W} images; choose top <= {H - ph} and left <= {W - pw}, or 'random'/'center'"
            )


# ----------------------------------------------------------------------------- sampling


@dataclass
class PatchParams:
    """Everything random about one application, sampled ahead (CPU tensors); replayable.

    Attributes:
        boxes: ``(B, 4)`` int64 ``(top, left, height, width)`` of each placed patch before EOT,
            in image pixels.
        image_size: ``(H, W)`` the boxes were sampled for.
        patch_size: ``(h, w)`` of the patch.
        eot: the EOT draw (:class:`attnpatch.patch.EOTDraw`; all ``None`` when EOT is off).
    """

    boxes: torch.Tensor
    image_size: tuple[int, int]
    patch_size: tuple[int, int]
    eot: EOTDraw = field(default_factory=EOTDraw)

    @property
    def batch_size(self) -> int:
        return int(self.boxes.shape[0])

    def take(self, rows: slice) -> PatchParams:
        """The draws of ``rows`` of the batch (e.g. one process's shard of a global batch)."""
        eot = self.eot
        picked = {
            name: None if getattr(eot, name) is None else getattr(eot, name)[rows]
            for name in ("matrix", "contrast", "brightness", "noise")
        }
        return PatchParams(self.boxes[rows], self.image_size, self.patch_size, type(eot)(**picked))


def sample_boxes(
    batch_size: int,
    image_size: tuple[int, int],
    patch_size: tuple[int, int],
    *,
    scale: Scale = None,
    position: Position = "random",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Placement boxes ``(B, 4)`` int64 ``(top, left, height, width)`` in image pixels.

    ``image_size`` is the images' ``(H, W)``, ``patch_size`` the patch's ``(h, w)`` (or one int
    each). A scale range draws ``(B,)`` uniform scales, then ``position="random"`` draws
    ``(B, 2)`` uniforms, in that order, from ``generator`` (CPU; ``None``: torch's global CPU
    generator). The placed longer side is ``floor(scale * min(H, W) + 0.5)`` pixels; the shorter
    side keeps the patch's aspect ratio. Raises :class:`~attnpatch.errors.InputError` if the largest box does
    not fit.

    >>> sample_boxes(2, (32, 32), (8, 8), scale=0.5, position="center").tolist()
    [[8, 8, 16, 16], [8, 8, 16, 16]]
    """
    image_size = as_pair(image_size, "image size")
    patch_size = as_pair(patch_size, "patch size")
    scale, position = _check_scale(scale), _check_position(position)
    _check_fits(scale, position, image_size, patch_size)
    B = int(batch_size)
    if B < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    f64 = torch.float64
    if scale is None:
        scales = None
    elif isinstance(scale, float):
        scales = torch.full((B,), scale, dtype=f64)
    else:
        lo, hi = scale
        scales = lo + (hi - lo) * torch.rand(B, generator=generator, dtype=f64)
    sizes = _placed_sizes(scales, image_size, patch_size, B)
    room = torch.tensor(image_size, dtype=torch.int64) - sizes  # (B, 2) >= 0
    if position == "random":
        u = torch.rand(B, 2, generator=generator, dtype=f64)
        corner = torch.minimum(torch.floor(u * (room + 1)).to(torch.int64), room)
    elif position == "center":
        corner = room // 2
    else:
        corner = torch.tensor([position], dtype=torch.int64).expand(B, 2)
    return torch.cat([corner, sizes], dim=1)


def patch_matrix(params: PatchParams) -> torch.Tensor:
    """Homographies ``(B, 3, 3)`` float64 from patch pixel coordinates to image pixel coordinates.

    Pixel centres sit at integer coordinates; pixel ``(0, 0)`` covers ``[-0.5, 0.5]^2`` (the
    ``align_corners=False`` convention of ``F.interpolate`` / ``F.grid_sample``). The placement
    maps the patch's outer edges onto its box's outer edges,
    ``x_img = left - 0.5 + (x + 0.5) * width / w`` (same for y), and the EOT matrix ``G`` acts
    about the box centre ``c``: ``M = T(c) @ G @ T(-c) @ placement``.
    """
    h, w = params.patch_size
    f64 = torch.float64
    top, left, ph, pw = params.boxes.to(f64).unbind(-1)
    B = params.batch_size
    A = torch.zeros(B, 3, 3, dtype=f64)
    A[:, 0, 0], A[:, 1, 1], A[:, 2, 2] = pw / w, ph / h, 1.0
    A[:, 0, 2] = left - 0.5 + 0.5 * pw / w
    A[:, 1, 2] = top - 0.5 + 0.5 * ph / h
    G = params.eot.matrix
    if G is None:
        return A
    centre = torch.stack([left - 0.5 + pw / 2, top - 0.5 + ph / 2], -1)
    T = torch.eye(3, dtype=f64).repeat(B, 1, 1)
    T_inv = T.clone()
    T[:, :2, 2], T_inv[:, :2, 2] = centre, -centre
    return T @ G.to(f64) @ T_inv @ A


# ----------------------------------------------------------------------------- application


def _paste(src: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int], batch: int):
    """Exact placement of ``src`` ``(1 or B, C, h, w)`` into a zero ``(B, C, H, W)`` canvas:
    resize to each box (antialiased when shrinking) and copy at integer offsets."""
    H, W = image_size
    canvas = src.new_zeros(batch, src.shape[1], H, W)
    resized: dict[tuple[int, int], torch.Tensor] = {}
    for b, (top, left, ph, pw) in enumerate(boxes.tolist()):
        i = b if src.shape[0] > 1 else 0
        if (ph, pw) == tuple(src.shape[-2:]):
            piece = src[i]
        elif src.shape[0] == 1 and (ph, pw) in resized:
            piece = resized[(ph, pw)]
        else:
            piece = resize(src[i : i + 1], (ph, pw))[0]
            if src.shape[0] == 1:
                resized[(ph, pw)] = piece
        canvas[b, :, top : top + ph, left : left + pw] = piece
    return canvas


def _warp(src: torch.Tensor, M: torch.Tensor, image_size: tuple[int, int], batch: int):
    """Resample ``src`` ``(1 or B, C, h, w)`` (patch space) into image space ``(B, C, H, W)``
    through homographies ``M`` ``(B, 3, 3)`` (patch -> image); texels outside the patch are 0."""
    f64 = torch.float64
    h, w = src.shape[-2:]
    # Prefilter: bilinear sampling reads only 4 texels per output pixel, so a patch shrunk by
    # k >= 2 would alias and most of its pixels would get no gradient. Shrink it first by the
    # batch's smallest integer factor with an antialiased resize (one low-pass, still convex).
    c = torch.tensor([(w - 1) / 2, (h - 1) / 2, 1.0], dtype=f64)
    probe = torch.stack(
        [c, c + torch.tensor([1.0, 0, 0], dtype=f64), c + torch.tensor([0, 1.0, 0], dtype=f64)]
    )
    mapped = probe @ M.transpose(1, 2)
    mapped = mapped[..., :2] / mapped[..., 2:]
    step = float((mapped[:, 1:] - mapped[:, :1]).norm(dim=-1).amax())  # image px per patch px
    k = int(math.floor(1.0 / step)) if step > 0 else 1
    if k >= 2:
        h2, w2 = max(1, round(h / k)), max(1, round(w / k))
        src = resize(src, (h2, w2))
        D = torch.tensor(
            [[w2 / w, 0, 0.5 * w2 / w - 0.5], [0, h2 / h, 0.5 * h2 / h - 0.5], [0, 0, 1]], dtype=f64
        )
        M = M @ torch.linalg.inv(D)
        h, w = h2, w2
    H, W = image_size
    # Only output pixels inside the bounding box of the mapped texel support [-1, w] x [-1, h]
    # can be non-zero: sample there and pad (a large saving for small patches on large images).
    quad = torch.tensor([[-1.0, -1, 1], [w, -1, 1], [w, h, 1], [-1, h, 1]], dtype=f64)
    quad = quad @ M.transpose(1, 2)
    if bool((quad[..., 2] <= 0).any()):
        x0, y0, x1, y1 = 0, 0, W, H
    else:
        quad = quad[..., :2] / quad[..., 2:]
        lo, hi = quad.amin(dim=(0, 1)), quad.amax(dim=(0, 1))
        x0, y0 = (max(0, math.floor(v)) for v in lo.tolist())
        x1, y1 = (min(n, math.ceil(v) + 1) for v, n in zip(hi.tolist(), (W, H)))
    if x1 <= x0 or y1 <= y0:  # entirely outside the image
        return src.new_zeros(batch, src.shape[1], H, W)
    # Image pixel (u, v) -> normalised patch coordinates for grid_sample(align_corners=False):
    # g = (2 q + 1) / size - 1 after the perspective division, folded into one matrix.
    N = torch.tensor([[2 / w, 0, 1 / w - 1], [0, 2 / h, 1 / h - 1], [0, 0, 1]], dtype=f64)
    K = (N @ torch.linalg.inv(M)).to(device=src.device, dtype=src.dtype)
    opts = {"device": src.device, "dtype": src.dtype}
    ys, xs = torch.meshgrid(
        torch.arange(y0, y1, **opts), torch.arange(x0, x1, **opts), indexing="ij"
    )
    pts = torch.stack([xs, ys, torch.ones_like(xs)], -1).reshape(1, -1, 3)
    q = pts @ K.transpose(1, 2)  # (B, n, 3)
    z = q[..., 2:]
    ahead = z > 1e-9  # points behind the homography's horizon see nothing of the patch
    grid = q[..., :2] / torch.where(ahead, z, torch.ones_like(z))
    grid = torch.where(ahead, grid, torch.full_like(grid, -4.0)).reshape(batch, y1 - y0, x1 - x0, 2)
    if src.shape[0] != batch:
        src = src.expand(batch, -1, -1, -1)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return F.pad(out, (x0, W - x1, y0, H - y1))


def apply_patch(
    images: torch.Tensor, pixels: torch.Tensor, mask: torch.Tensor, params: PatchParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """Place a patch on a batch of images; differentiable w.r.t. ``pixels`` (and ``images``).

    Args:
        images: ``(B, 3, H, W)`` RGB in [0, 1].
        pixels: ``(1, 3, h, w)`` patch RGB in [0, 1].
        mask: ``(1, 1, h, w)`` patch mask in [0, 1].
        params: placement and EOT draw for this batch (:meth:`AdversarialPatch.sample_params`).

    Returns:
        ``(patched, placed_mask)``: ``(B, 3, H, W)`` in [0, 1] and ``(B, 1, H, W)`` in [0, 1].
        ``patched = images * (1 - placed_mask) + warp(photometric(pixels) * mask)``; where
        ``placed_mask == 0`` the output is exactly ``images``.
    """
    _check_batch(images)
    _check_patch(images, pixels, mask)
    _check_params(params, images.shape[0], tuple(images.shape[-2:]), tuple(pixels.shape[-2:]))
    return _apply(images, pixels, mask, params)


def _check_batch(images: torch.Tensor) -> None:
    check_image(images, name="images")
    if images.shape[0] == 0:
        raise InputError("images is an empty batch (B = 0); pass at least one image")


def _check_patch(images: torch.Tensor, pixels: torch.Tensor, mask: torch.Tensor) -> None:
    if pixels.ndim != 4 or pixels.shape[:2] != (1, 3):
        raise InputError(f"patch pixels must be (1, 3, h, w), got {tuple(pixels.shape)}")
    if mask.shape != (1, 1, *pixels.shape[-2:]):
        raise InputError(
            f"patch mask must be (1, 1, h, w) = (1, 1, {pixels.shape[-2]}, {pixels.shape[-1]}), "
            f"got {tuple(mask.shape)}"
        )
    if pixels.device != images.device:
        raise InputError(
            f"the patch is on {pixels.device} but the images are on {images.device}; move the "
            f"patch with patch.to(images.device) before building the optimizer"
        )


def _check_params(params: PatchParams, batch: int, image_size: tuple[int, int], patch_size) -> None:
    if not isinstance(params, PatchParams):
        raise InputError(
            f"params must be a PatchParams from patch.sample_params(...), got {type(params).__name__}"
        )
    if (params.batch_size, tuple(params.image_size), tuple(params.patch_size)) != (
        batch,
        tuple(image_size),
        tuple(patch_size),
    ):
        raise InputError(
            f"params were sampled for {params.batch_size} images of {tuple(params.image_size)} and "
            f"a {tuple(params.patch_size)} patch, but got {batch} images of {tuple(image_size)} "
            f"and a {tuple(patch_size)} patch; sample them for this batch with "
            f"patch.sample_params({batch}, {tuple(image_size)})"
        )


def _apply(images, pixels, mask, params: PatchParams) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`apply_patch` without the checks (the caller has run them)."""
    B, _, H, W = images.shape
    pixels = pixels.to(images.dtype)
    mask = mask.to(images.dtype)
    p = photometric(pixels, params.eot)  # (1 or B, 3, h, w)
    src = torch.cat([p * mask, mask.expand(p.shape[0], -1, -1, -1)], dim=1)
    if params.eot.matrix is None:
        placed = _paste(src, params.boxes, (H, W), B)
    else:
        placed = _warp(src, patch_matrix(params), (H, W), B)
    # The mask is a function of the mask buffer only: no gradient path to the patch.
    # Clamped: bilinear warping may round a covered pixel to 1 + 1e-7 on some torch builds.
    premult, placed_mask = placed[:, :3], placed[:, 3:].detach().clamp(0.0, 1.0)
    patched = images * (1 - placed_mask) + premult
    # Convex in exact arithmetic; the clamp only removes float rounding (~1e-7) inside the mask.
    patched = torch.where(placed_mask > 0, patched.clamp(0.0, 1.0), images)
    return patched, placed_mask
