"""What every figure shares: an Agg figure without pyplot, fixed dpi, PNG writes, pixels.

Figures are :class:`matplotlib.figure.Figure` objects with their own Agg canvas: no pyplot
global state, no display, so they can be drawn headless and in several threads at once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.layout_engine import PlaceHolderLayoutEngine

from .._util import atomic_write
from ..errors import InputError
from ..images import check_image

__all__ = ["DPI", "new_figure", "save", "to_array", "image_array", "check_lengths"]

#: Dots per inch of every figure and PNG: a PNG is ``figsize * DPI`` pixels.
DPI = 100


def new_figure(width: float, height: float) -> Figure:
    """A ``width x height`` inch figure (constrained layout) on its own Agg canvas."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _canvas(fig: Figure) -> FigureCanvasAgg:
    if not isinstance(fig, Figure):
        raise InputError(
            f"expected a matplotlib Figure, got {type(fig).__name__}; pass what an "
            "attnpatch.viz function returned"
        )
    canvas = fig.canvas
    canvas = canvas if isinstance(canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    engine = fig.get_layout_engine()
    if engine is not None and not isinstance(engine, PlaceHolderLayoutEngine):
        # constrained layout moves the axes a little on every draw: lay out once, then keep
        # the positions, so that save() and to_array() give the same pixels every time
        fig.draw_without_rendering()
        fig.set_layout_engine("none")
    return canvas


def save(fig: Figure, path: str | os.PathLike) -> None:
    """Write ``fig`` as a PNG of ``figsize * DPI`` pixels, atomically (a reader sees the old
    file or the new one: :func:`attnpatch._util.atomic_write`)."""
    _canvas(fig)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)


def to_array(fig: Figure) -> np.ndarray:
    """The rendered figure, ``(H, W, 3)`` uint8 RGB with ``(H, W) = figsize[::-1] * dpi``
    (e.g. for TensorBoard's ``add_image(..., dataformats="HWC")``)."""
    canvas = _canvas(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def image_array(image: torch.Tensor, name: str = "image") -> np.ndarray:
    """``(3, H, W)`` in [0, 1] (checked, values clamped) -> ``(H, W, 3)`` float numpy array."""
    if isinstance(image, torch.Tensor):
        image = (image[None] if image.ndim == 3 else image).detach().float().cpu()
    x = check_image(image, name=name)
    if x.shape[0] != 1:
        raise InputError(
            f"{name} must be one image (3, H, W), got shape {tuple(x.shape)}; pass images[i]"
        )
    return x[0].clamp(0, 1).permute(1, 2, 0).numpy()


def check_lengths(**sequences: Sequence | None) -> int:
    """The common length of the given sequences (``None`` ones skipped); an error naming them
    when they differ or are empty."""
    given = {k: len(v) for k, v in sequences.items() if v is not None}
    if len(set(given.values())) != 1 or 0 in given.values():
        what = ", ".join(f"{k}: {n}" for k, n in given.items())
        raise InputError(
            f"expected non-empty sequences of one length, got {what}; pass one value per item"
        )
    return next(iter(given.values()))
