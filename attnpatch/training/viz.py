"""Pictures for the run folder, drawn with Pillow only (no plotting dependency).

Pillow is already required by diffusers; matplotlib would add ~40 MB for four simple figures.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from .._util import atomic_write
from ..images import to_pil as _to_pil

__all__ = ["to_pil", "image_grid", "heatmap", "attention_figure", "loss_curves"]


def to_pil(image: torch.Tensor, scale: int = 1) -> Image.Image:
    """``(3, H, W)`` in [0, 1] -> RGB image, nearest-upscaled by ``scale``."""
    x = image.detach().float().cpu()
    if scale > 1:
        x = F.interpolate(x[None], scale_factor=scale, mode="nearest")[0]
    return _to_pil(x)


def image_grid(images: torch.Tensor, nrow: int = 8, scale: int = 4, pad: int = 2) -> Image.Image:
    """``(N, 3, H, W)`` in [0, 1] -> one image, ``nrow`` per row."""
    n, _, h, w = images.shape
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    H, W = h * scale, w * scale
    grid = Image.new("RGB", (cols * (W + pad) + pad, rows * (H + pad) + pad), "white")
    for i in range(n):
        r, c = divmod(i, cols)
        grid.paste(to_pil(images[i], scale), (pad + c * (W + pad), pad + r * (H + pad)))
    return grid


def _colormap(v: torch.Tensor) -> torch.Tensor:
    """``(h, w)`` in [0, 1] -> ``(3, h, w)`` blue -> cyan -> yellow -> red."""
    r = (1.5 - (4 * v - 3).abs()).clamp(0, 1)
    g = (1.5 - (4 * v - 2).abs()).clamp(0, 1)
    b = (1.5 - (4 * v - 1).abs()).clamp(0, 1)
    return torch.stack([r, g, b])


def heatmap(image: torch.Tensor, amap: torch.Tensor, alpha: float = 0.55) -> torch.Tensor:
    """Overlay a map ``(h, w)`` (any scale, min-max normalised) on ``image`` ``(3, H, W)``."""
    m = amap.detach().float().cpu()
    m = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)
    m = F.interpolate(m[None, None], size=image.shape[-2:], mode="bilinear", align_corners=False)[
        0, 0
    ]
    return (1 - alpha) * image.detach().float().cpu() + alpha * _colormap(m)


def attention_figure(
    image: torch.Tensor, maps: Sequence[tuple[str, torch.Tensor]], scale: int = 6
) -> Image.Image:
    """The image and one heat map per ``(title, (h, w) map)``, side by side with titles."""
    tiles = [("image", image.detach().float().cpu())] + [(t, heatmap(image, m)) for t, m in maps]
    pils = [to_pil(t, scale) for _, t in tiles]
    W, H = pils[0].size
    fig = Image.new("RGB", (len(pils) * (W + 4) + 4, H + 20), "white")
    draw = ImageDraw.Draw(fig)
    for i, ((title, _), p) in enumerate(zip(tiles, pils)):
        fig.paste(p, (4 + i * (W + 4), 18))
        draw.text((4 + i * (W + 4), 3), title[:24], fill="black")
    return fig


def loss_curves(
    records: Sequence[dict], names: Sequence[str], size: tuple[int, int] = (520, 150)
) -> Image.Image:
    """One panel per loss term (each on its own y range): value against iteration, raw (light)
    and a moving average over 5% of the run (dark)."""
    names = [n for n in names if any(r.get(n) is not None for r in records)]
    W, H = size
    fig = Image.new("RGB", (W, max(1, len(names)) * H), "white")
    draw = ImageDraw.Draw(fig)
    for p, name in enumerate(names):
        pts = [(r["iteration"], r[name]) for r in records if r.get(name) is not None]
        top, left, right, bottom = p * H + 18, 60, W - 10, p * H + H - 18
        draw.rectangle([left, top, right, bottom], outline="gray")
        lo, hi = min(v for _, v in pts), max(v for _, v in pts)
        span = hi - lo or 1.0
        x0, x1 = pts[0][0], max(pts[-1][0], pts[0][0] + 1)
        xy = [
            (
                left + (x - x0) / (x1 - x0) * (right - left),
                bottom - (v - lo) / span * (bottom - top),
            )
            for x, v in pts
        ]
        if len(xy) > 1:
            draw.line(xy, fill=(235, 175, 175), width=1)  # raw values
            smooth = _moving_average([v for _, v in pts], max(1, len(pts) // 20))
            xy_s = [(x, bottom - (v - lo) / span * (bottom - top)) for (x, _), v in zip(xy, smooth)]
            draw.line(xy_s, fill=(190, 20, 20), width=2)  # moving average
        draw.text((left, p * H + 3), f"{name}  (last {pts[-1][1]:.4g})", fill="black")
        draw.text((2, top), f"{hi:.3g}", fill="black")
        draw.text((2, bottom - 10), f"{lo:.3g}", fill="black")
        draw.text((right - 60, bottom + 3), f"iter {pts[-1][0]}", fill="black")
    return fig


def _moving_average(values: Sequence[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def save(image: Image.Image, path: str | os.PathLike) -> None:
    """Write a PNG atomically."""
    with atomic_write(path) as tmp:
        image.save(tmp, format="PNG")
