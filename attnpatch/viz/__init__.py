"""Figures with matplotlib: loss curves, attention heat maps, the patch, patched examples,
success rate vs patch scale and transfer bars.

Every function returns a :class:`matplotlib.figure.Figure` on its own Agg canvas (no pyplot,
no display: headless and thread-safe), which a notebook shows as it is; :func:`save` writes it
as a PNG of ``figsize * DPI`` pixels, :func:`to_array` renders it to ``(H, W, 3)`` uint8.
Not imported by ``import attnpatch`` (``from attnpatch import viz`` imports matplotlib).

>>> import torch
>>> from attnpatch import viz
>>> fig = viz.patch_figure(torch.rand(3, 8, 8))
>>> type(fig).__name__, viz.to_array(fig).shape, viz.to_array(fig).dtype.name
('Figure', (365, 340, 3), 'uint8')
"""

from ._base import DPI, save, to_array
from .curves import loss_curves, success_vs_scale, transfer_bars
from .grids import examples, patch_figure
from .maps import attention_maps, overlay

__all__ = [
    "loss_curves",
    "attention_maps",
    "overlay",
    "patch_figure",
    "examples",
    "success_vs_scale",
    "transfer_bars",
    "save",
    "to_array",
    "DPI",
]
