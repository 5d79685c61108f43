"""Captions for the shapes world: what a text-to-image model is trained to read.

:func:`colour_names` names RGB colours with the tiny tokenizer's colour words;
:func:`shape_captions` writes one caption per image from its label and the colours that
:func:`~attnpatch.data.render_shapes` drew (``return_colours=True``).

Every caption starts with the trainer's default class prompt ``"a photo of a {shape}"``; some
put the fill's colour word before the shape and some add the background's colours after it:

>>> import torch
>>> colours = torch.tensor([[[0.9, 0.1, 0.1], [0.1, 0.2, 0.9], [0.1, 0.8, 0.2]]])
>>> colour_names(colours[0])
['red', 'blue', 'green']
>>> g = torch.Generator().manual_seed(0)
>>> shape_captions(torch.tensor([0]), ["circle"], colours, generator=g, p_empty=0.0,
...                p_colour=1.0, p_background=1.0)
['a photo of a red circle on a blue and green background']

The background phrase is there so that background pixels have words of their own to attend
to: without it, nothing in the caption is about the background, and the shape word's
cross-attention spreads over it too (measurements in docs/models.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import InputError

__all__ = ["COLOUR_WORDS", "colour_names", "shape_captions"]

#: Hue anchors in degrees of the chromatic colour words (each one token of the tiny tokenizer).
_HUES = {"red": 0.0, "orange": 30.0, "yellow": 60.0, "green": 125.0, "blue": 220.0}
_HUES.update({"purple": 275.0, "pink": 325.0})
#: Every word :func:`colour_names` can return.
COLOUR_WORDS = (*_HUES, "gray")


def colour_names(rgb: torch.Tensor, gray_below: float = 0.25) -> list[str]:
    """Name ``(N, 3)`` RGB colours in [0, 1]: the nearest hue anchor of :data:`COLOUR_WORDS`,
    or ``"gray"`` when the HSV saturation is below ``gray_below``."""
    if rgb.ndim != 2 or rgb.shape[1] != 3:
        raise InputError(f"colours must be (N, 3) RGB, got shape {tuple(rgb.shape)}")
    rgb = rgb.float()
    hi, lo = rgb.max(dim=1).values, rgb.min(dim=1).values
    sat = torch.where(hi > 0, (hi - lo) / hi.clamp_min(1e-8), torch.zeros_like(hi))
    r, g, b = rgb.unbind(1)
    # Hue in degrees (atan2 of the opponent axes: continuous, no case split).
    hue = torch.rad2deg(torch.atan2(3**0.5 * (g - b), 2 * r - g - b)).remainder(360)
    anchors = torch.tensor(list(_HUES.values()))
    dist = (hue[:, None] - anchors[None]).abs()
    dist = torch.minimum(dist, 360 - dist)
    names = [list(_HUES)[i] for i in dist.argmin(dim=1).tolist()]
    return [("gray" if s < gray_below else n) for n, s in zip(names, sat.tolist())]


def shape_captions(
    labels: torch.Tensor,
    classes: Sequence[str],
    colours: torch.Tensor,
    *,
    generator: torch.Generator,
    p_colour: float = 0.5,
    p_background: float = 0.5,
    p_empty: float = 0.1,
) -> list[str]:
    """One caption per image: ``"a photo of a [colour] {shape}[ on a {bg} background]"``.

    Args:
        labels: ``(N,)`` indices into ``classes``.
        colours: ``(N, 3, 3)`` from ``render_shapes(..., return_colours=True)``: fill, then
            the two background colours.
        generator: the only source of randomness (three draws per image, always, so a
            caption depends on its image's index only).
        p_colour: chance of naming the fill colour before the shape word.
        p_background: chance of the background phrase (``"on a blue background"``, or
            ``"on a blue and green background"`` when its two colours have different names).
        p_empty: chance of the empty caption ``""`` instead (classifier-free guidance's
            unconditional prompt; the others are then unused).
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    n = labels.shape[0]
    if colours.shape != (n, 3, 3):
        raise InputError(f"colours must be ({n}, 3, 3), got {tuple(colours.shape)}")
    draws = torch.rand(n, 3, generator=generator)
    fill = colour_names(colours[:, 0])
    bg1, bg2 = colour_names(colours[:, 1]), colour_names(colours[:, 2])
    out = []
    for i, (u_empty, u_colour, u_bg) in enumerate(draws.tolist()):
        if u_empty < p_empty:
            out.append("")
            continue
        words = ["a photo of a"]
        words += [fill[i]] if u_colour < p_colour else []
        words += [classes[int(labels[i])]]
        if u_bg < p_background:
            bg = bg1[i] if bg1[i] == bg2[i] else f"{bg1[i]} and {bg2[i]}"
            words += [f"on a {bg} background"]
        out.append(" ".join(words))
    return out
