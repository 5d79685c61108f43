"""Pictures: the patch alone, and a grid of (patched) images with predictions under each."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from matplotlib.figure import Figure

from ..errors import InputError
from ..images import check_image
from ._base import check_lengths, image_array, new_figure

__all__ = ["patch_figure", "examples"]


def patch_figure(patch: torch.Tensor) -> Figure:
    """The patch ``(3, h, w)`` in [0, 1] (or ``(1, 3, h, w)``: ``AdversarialPatch.pixels``),
    drawn nearest-neighbour (one square per pixel), its size in the title."""
    if isinstance(patch, torch.Tensor) and patch.ndim == 4 and patch.shape[0] == 1:
        patch = patch[0]
    rgb = image_array(patch, "patch")
    h, w = rgb.shape[:2]
    side = 3.2
    fig = new_figure(side * min(1.0, w / h) + 0.2, side * min(1.0, h / w) + 0.45)
    ax = fig.add_subplot()
    ax.imshow(rgb, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(f"patch ({h}x{w} px)", fontsize=9)
    return fig


def examples(
    images: torch.Tensor,
    predictions: Sequence[str],
    labels: Sequence[str] | None = None,
    ncols: int = 8,
) -> Figure:
    """A grid of images, ``ncols`` per row, the classifier's prediction under each (and the
    true label, when given: then a wrong prediction, a success of an untargeted attack, is
    written in red).

    Args:
        images: ``(N, 3, H, W)`` in [0, 1].
        predictions: ``N`` class names; labels: ``N`` class names or ``None``.
        ncols: images per row (>= 1).
    """
    check_image(images)
    n = check_lengths(images=images, predictions=predictions, labels=labels)
    if isinstance(ncols, bool) or not isinstance(ncols, int) or ncols < 1:
        raise InputError(f"ncols must be a positive int, got {ncols!r}; e.g. ncols=8")
    cols = min(ncols, n)
    rows = math.ceil(n / cols)
    fig = new_figure(0.2 + 1.35 * cols, 0.1 + (1.75 if labels is not None else 1.6) * rows)
    for i in range(n):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(image_array(images[i], f"images[{i}]"), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        text, color = f"pred: {predictions[i]}", "black"
        if labels is not None:
            text += f"\ntrue: {labels[i]}"
            color = "black" if predictions[i] == labels[i] else "tab:red"
        ax.set_xlabel(text, fontsize=8, color=color)
    return fig
