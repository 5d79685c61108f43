"""The synthetic shapes world: coloured shapes on textured backgrounds (no downloads).

:class:`ShapesConfig` / :func:`shapes_dataset` generate the embedded demo's labelled images,
``(N, 3, S, S)`` float RGB in [0, 1] quantised to 8 bits, as a
:class:`~attnpatch.data.TensorImageDataset`; :func:`render_shapes` draws them.

>>> train = shapes_dataset(ShapesConfig(train_per_class=2, heldout_per_class=1))
>>> train.classes
['circle', 'cross', 'square', 'star', 'triangle']
>>> tuple(train.images.shape), train.labels.tolist()
((10, 3, 32, 32), [0, 1, 2, 3, 4, 0, 1, 2, 3, 4])
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .._util import as_pair, derive_seed, one_thread
from ..errors import InputError
from .folder import TensorImageDataset

__all__ = ["SHAPE_CLASSES", "SHAPES", "ShapesConfig", "render_shapes", "shapes_dataset"]

#: The default demo classes: each is one token of the tiny tokenizer (``testing.VOCAB_WORDS``).
SHAPE_CLASSES = ("circle", "cross", "square", "star", "triangle")


def _inside_circle(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return u * u + v * v <= 0.85**2


def _inside_ring(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    r2 = u * u + v * v
    return (r2 <= 0.95**2) & (r2 >= 0.55**2)


def _inside_square(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.maximum(u.abs(), v.abs()) <= 0.72


def _inside_diamond(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return u.abs() + v.abs() <= 0.95


def _inside_cross(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    a, b = u.abs(), v.abs()
    return ((a <= 0.28) & (b <= 0.95)) | ((b <= 0.28) & (a <= 0.95))


def _inside_triangle(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # Equilateral, circumradius 1, one vertex up (v grows downwards in image rows), so the
    # edge normals (cos a, sin a) point down (a = pi/2) and up-left / up-right.
    inside = torch.ones_like(u, dtype=torch.bool)
    for k in range(3):
        angle = math.pi / 2 + 2 * math.pi * k / 3  # outward normals of the three edges
        inside &= u * math.cos(angle) + v * math.sin(angle) <= 0.5
    return inside


def _inside_star(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # Five-pointed star: outer radius 1, inner radius 0.45, a point facing up.
    outer, inner, sector = 1.0, 0.45, 2 * math.pi / 5
    phi = torch.atan2(u, -v)  # 0 = up
    gamma = (phi.remainder(sector) - sector / 2).abs()  # 0 = inner vertex direction
    gamma = sector / 2 - gamma  # 0 = outer vertex direction
    rho = torch.sqrt(u * u + v * v)
    px, py = rho * torch.cos(gamma), rho * torch.sin(gamma)
    ax, ay = outer, 0.0
    bx, by = inner * math.cos(sector / 2), inner * math.sin(sector / 2)
    # Inside iff P is on the origin's side of the edge A -> B.
    cross_p = (bx - ax) * (py - ay) - (by - ay) * (px - ax)
    cross_o = (bx - ax) * (0 - ay) - (by - ay) * (0 - ax)
    return cross_p * cross_o >= 0


#: Shape renderers: name -> inside test on unit-scale coordinates ``(u, v)`` (v points down).
SHAPES = {
    "circle": _inside_circle,
    "cross": _inside_cross,
    "diamond": _inside_diamond,
    "ring": _inside_ring,
    "square": _inside_square,
    "star": _inside_star,
    "triangle": _inside_triangle,
}


@dataclass(frozen=True)
class ShapesConfig:
    """What :func:`shapes_dataset` generates; the whole set is a function of these fields.

    Attributes:
        classes: shape names from :data:`SHAPES`, in label order (default
            :data:`SHAPE_CLASSES`, sorted like an image folder's classes).
        size: image side in pixels (default 32: the demo runs on a CPU).
        train_per_class: training images per class.
        heldout_per_class: held-out images per class (drawn from a separate random stream).
        seed: the generator seed.
        rotation: maximum shape rotation in degrees, either way (default 20: small enough
            that a square never becomes a diamond or a cross an X).
    """

    classes: tuple[str, ...] = SHAPE_CLASSES
    size: int = 32
    train_per_class: int = 400
    heldout_per_class: int = 50
    seed: int = 0
    rotation: float = 20.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        unknown = [c for c in self.classes if c not in SHAPES]
        if unknown:
            raise InputError(f"unknown shape classes {unknown}; choose from {sorted(SHAPES)}")
        if len(set(self.classes)) != len(self.classes) or not self.classes:
            raise InputError(f"classes must be distinct and non-empty, got {self.classes}")
        if self.size < 8:
            raise InputError(f"size must be >= 8 pixels, got {self.size}")
        if self.train_per_class < 0 or self.heldout_per_class < 0:
            raise InputError("train_per_class and heldout_per_class must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (used in cache keys and run configs)."""
        d = dataclasses.asdict(self)
        d["classes"] = list(self.classes)
        return d

    def key(self) -> str:
        """A stable hex digest of the fields."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``(N,)`` hue/saturation/value in [0, 1] -> ``(N, 3)`` RGB in [0, 1]."""
    k = torch.stack([torch.full_like(h, c) for c in (5.0, 3.0, 1.0)], dim=1)
    k = (k + h[:, None] * 6.0) % 6.0
    f = torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)
    return v[:, None] - v[:, None] * s[:, None] * f


def render_shapes(
    labels: torch.Tensor,
    classes: Sequence[str],
    size: int | tuple[int, int] = 32,
    *,
    generator: torch.Generator,
    rotation: float = 20.0,
    centres: torch.Tensor | None = None,
    supersample: int = 4,
    return_masks: bool = False,
    return_colours: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Draw one shape per label on a textured background.

    Args:
        labels: ``(N,)`` indices into ``classes`` (names from :data:`SHAPES`).
        size: output side ``S``, or ``(H, W)``; sizes below are relative to ``S = min(H, W)``.
        generator: the only source of randomness (torch's global RNG is not used).
        rotation: maximum rotation of a shape in degrees.
        centres: ``(N, 2)`` shape centres ``(x, y)`` as fractions of ``(W, H)`` (e.g. 0.25,
            0.25 for the top-left quadrant), moved inwards where the shape would leave the
            image; ``None``: random. The random positions are drawn either way, so the other
            factors (size, colours, background) of image ``i`` do not change.
        supersample: the shape's edge is antialiased by rendering its mask at this factor.

    Returns:
        ``(N, 3, H, W)`` float RGB in [0, 1], quantised to multiples of 1/255 (so a PNG copy
        reads back bit-identical). With ``return_masks=True`` also the shapes' coverage
        ``(N, 1, H, W)`` in [0, 1] (1 inside the shape, fractional on its antialiased edge).

    Nuisance factors, all random per image: shape position (fully inside the image), radius
    (0.22-0.36 of ``S``), rotation, fill colour (any hue), background (two colours blended by a
    mix of stripes of random frequency/orientation and smooth noise), pixel noise (std 0.03).
    Contrast is the only rule: fill and background colours take their HSV value (their largest
    RGB channel) from opposite bands (dark 0.10-0.40 vs bright 0.65-0.95, either way round), so
    in some channel the shape differs from every background pixel by at least 0.25 (before
    noise): it is always visible, and only its outline tells the classes apart.
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    (h, w), g = as_pair(size, "size"), generator
    n, s = labels.shape[0], min(h, w)
    tests = [SHAPES[c] for c in classes]

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g)

    # Shape geometry, in pixels.
    radius = s * (0.22 + 0.14 * rand(n))
    margin = radius + 1.0
    cx = margin + (w - 2 * margin) * rand(n)
    cy = margin + (h - 2 * margin) * rand(n)
    if centres is not None:
        centres = torch.as_tensor(centres, dtype=torch.float32).reshape(n, 2)
        cx = torch.minimum(torch.maximum(centres[:, 0] * w, margin), w - margin)
        cy = torch.minimum(torch.maximum(centres[:, 1] * h, margin), h - margin)
    theta = (2 * rand(n) - 1) * math.radians(rotation)
    # Colours: fill and background in opposite brightness bands.
    fill_dark = rand(n) < 0.5
    band = lambda dark: torch.where(dark, 0.10 + 0.30 * rand(n), 0.65 + 0.30 * rand(n))  # noqa: E731
    fill = _hsv_to_rgb(rand(n), 0.4 + 0.6 * rand(n), band(fill_dark))
    bg1 = _hsv_to_rgb(rand(n), 0.2 + 0.7 * rand(n), band(~fill_dark))
    bg2 = _hsv_to_rgb(rand(n), 0.2 + 0.7 * rand(n), band(~fill_dark))
    # Background texture t in [0, 1]: stripes mixed with smooth noise.
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    freq = (1.0 + 4.0 * rand(n)) * 2 * math.pi / s
    angle = math.pi * rand(n)
    phase = 2 * math.pi * rand(n)
    proj = xs[None] * torch.cos(angle)[:, None, None] + ys[None] * torch.sin(angle)[:, None, None]
    stripes = 0.5 + 0.5 * torch.sin(freq[:, None, None] * proj + phase[:, None, None])
    smooth = F.interpolate(rand(n, 1, 5, 5), size=(h, w), mode="bicubic", align_corners=False)
    mix = rand(n)[:, None, None]
    texture = (mix * stripes + (1 - mix) * smooth[:, 0]).clamp(0, 1)
    background = bg1[:, :, None, None] + (bg2 - bg1)[:, :, None, None] * texture[:, None]
    # Antialiased coverage of the shape.
    k = int(supersample)
    sy, sx = torch.meshgrid(
        (torch.arange(h * k) + 0.5) / k, (torch.arange(w * k) + 0.5) / k, indexing="ij"
    )
    alpha = torch.zeros(n, 1, h, w)
    for c, inside in enumerate(tests):
        sel = (labels == c).nonzero().flatten()
        if sel.numel() == 0:
            continue
        dx = (sx[None] - cx[sel, None, None]) / radius[sel, None, None]
        dy = (sy[None] - cy[sel, None, None]) / radius[sel, None, None]
        cos, sin = torch.cos(theta[sel])[:, None, None], torch.sin(theta[sel])[:, None, None]
        u, v = cos * dx + sin * dy, -sin * dx + cos * dy
        mask = inside(u, v).float()[:, None]
        alpha[sel] = F.avg_pool2d(mask, k) if k > 1 else mask
    image = alpha * fill[:, :, None, None] + (1 - alpha) * background
    image = image + 0.03 * torch.randn(n, 3, h, w, generator=g)
    image = (image.clamp(0, 1) * 255).round() / 255
    out = (image,) + ((alpha,) if return_masks else ())
    out += (torch.stack([fill, bg1, bg2], dim=1),) if return_colours else ()
    return out if len(out) > 1 else image


def shapes_dataset(config: ShapesConfig | None = None, split: str = "train") -> TensorImageDataset:
    """The synthetic shapes set of ``config`` (default :class:`ShapesConfig`): a split of it.

    ``split`` is ``"train"`` (``train_per_class`` images per class) or ``"heldout"``
    (``heldout_per_class``); the two come from separate generators seeded by
    ``(config.seed, split)``, so they share no image. Labels cycle through the classes
    (``0, 1, ..., C-1, 0, 1, ...``). Deterministic: the same config gives the same tensors.
    Rendered on one CPU thread (:func:`attnpatch._util.one_thread`), so the tensors do not
    depend on ``torch.get_num_threads()``.
    """
    config = config or ShapesConfig()
    if split not in ("train", "heldout"):
        raise InputError(f"split must be 'train' or 'heldout', got {split!r}")
    per_class = config.train_per_class if split == "train" else config.heldout_per_class
    c = len(config.classes)
    labels = torch.arange(per_class * c) % c
    # The batch order's tag, kept for history: every shapes set (and so the tiny classifier
    # trained on it) is a function of this seed.
    seed = derive_seed("attnpatch-batches", config.seed, 0 if split == "train" else 1)
    g = torch.Generator().manual_seed(seed)
    images = torch.empty(0, 3, config.size, config.size)
    with one_thread():
        chunks = [
            render_shapes(
                labels[i : i + 256],
                config.classes,
                config.size,
                generator=g,
                rotation=config.rotation,
            )
            for i in range(0, len(labels), 256)
        ]
    if chunks:
        images = torch.cat(chunks)
    return TensorImageDataset(images, labels, config.classes)
