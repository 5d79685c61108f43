"""Captions of the shapes world (attnpatch/data/captions.py)."""

from __future__ import annotations

import colorsys

import pytest
import torch

from attnpatch.data import COLOUR_WORDS, SHAPE_CLASSES, colour_names, render_shapes, shape_captions
from attnpatch.data import captions as cap
from attnpatch.errors import InputError
from attnpatch.testing import tiny_tokenizer


@pytest.mark.parametrize(
    "rgb,name",
    [
        ((1.0, 0.0, 0.0), "red"),
        ((1.0, 0.5, 0.0), "orange"),
        ((1.0, 1.0, 0.0), "yellow"),
        ((0.0, 1.0, 0.0), "green"),
        ((0.0, 0.2, 1.0), "blue"),
        ((0.6, 0.0, 1.0), "purple"),
        ((1.0, 0.2, 0.6), "pink"),
        ((0.5, 0.5, 0.5), "gray"),
        ((0.3, 0.28, 0.29), "gray"),  # saturation 0.07
    ],
)
def test_colour_names_of_known_colours(rgb, name):
    assert colour_names(torch.tensor([rgb])) == [name]


def test_colour_names_match_colorsys_hues():
    # An independent hue: Python's colorsys, then the nearest anchor by hand.
    g = torch.Generator().manual_seed(0)
    rgb = torch.rand(500, 3, generator=g)
    expected = []
    for r, gg, b in rgb.tolist():
        h, s, _ = colorsys.rgb_to_hsv(r, gg, b)
        deg = h * 360
        dist = {n: min(abs(deg - a), 360 - abs(deg - a)) for n, a in cap._HUES.items()}
        expected.append("gray" if s < 0.25 else min(dist, key=dist.get))
    got = colour_names(rgb)
    # atan2's hue differs from the hexagonal one by a few degrees; allow rare boundary cases.
    agree = sum(a == b for a, b in zip(got, expected)) / len(got)
    assert agree > 0.9
    assert set(got) <= set(COLOUR_WORDS)


def test_colour_words_are_single_tokens():
    tok = tiny_tokenizer()
    for word in (*COLOUR_WORDS, *SHAPE_CLASSES, "background", "on", "and"):
        assert len(tok.tokenize(word)) == 1, word


def _scene(n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 5
    images, masks, colours = render_shapes(
        labels, SHAPE_CLASSES, 32, generator=g, return_masks=True, return_colours=True
    )
    return labels, images, masks, colours


def test_captions_name_the_shape_and_its_rendered_colours():
    labels, images, masks, colours = _scene()
    caps = shape_captions(
        labels, SHAPE_CLASSES, colours, generator=torch.Generator().manual_seed(1)
    )
    fills = colour_names(colours[:, 0])
    # The returned fill is the colour drawn inside the shape (up to pixel noise).
    inside = (images * (masks > 0.99)).sum((2, 3)) / (masks > 0.99).sum((2, 3))
    assert torch.allclose(inside, colours[:, 0], atol=0.02)
    empty = [c for c in caps if c == ""]
    assert 0.05 < len(empty) / len(caps) < 0.15
    for c, label, fill in zip(caps, labels.tolist(), fills):
        if not c:
            continue
        words = c.split()
        assert c.startswith("a photo of a ")
        assert SHAPE_CLASSES[label] in words
        if words[4] != SHAPE_CLASSES[label]:
            assert words[4] == fill  # the colour word comes right before the shape
        if "background" in words:
            assert c.endswith(" background") and "on" in words
    plain = [
        c for c, lab in zip(caps, labels.tolist()) if c == f"a photo of a {SHAPE_CLASSES[lab]}"
    ]
    assert len(plain) > 0.1 * len(caps)  # the trainer's default prompt is common


def test_captions_are_a_function_of_the_generator():
    labels, _, _, colours = _scene(50)
    a = shape_captions(labels, SHAPE_CLASSES, colours, generator=torch.Generator().manual_seed(3))
    b = shape_captions(labels, SHAPE_CLASSES, colours, generator=torch.Generator().manual_seed(3))
    c = shape_captions(labels, SHAPE_CLASSES, colours, generator=torch.Generator().manual_seed(4))
    assert a == b and a != c


def test_bad_inputs_are_named():
    with pytest.raises(InputError, match=r"\(N, 3\)"):
        colour_names(torch.rand(3))
    with pytest.raises(InputError, match=r"\(2, 3, 3\)"):
        shape_captions(torch.zeros(2), SHAPE_CLASSES, torch.rand(2, 3), generator=torch.Generator())
