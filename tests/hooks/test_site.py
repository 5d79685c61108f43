"""AttnSite parsing and resolution inference."""

from __future__ import annotations

import pytest

import attnpatch as ap
from attnpatch.hooks.site import as_resolution, infer_resolution, parse_place


@pytest.mark.parametrize(
    "name, expected",
    [
        ("down_blocks.2.attentions.1.transformer_blocks.0.attn2", ("down", 2)),
        ("mid_block.attentions.0.transformer_blocks.3.attn1", ("mid", 0)),
        ("up_blocks.3.attentions.2.transformer_blocks.0.attn1", ("up", 3)),
        ("encoder.mid_block.attentions.0", ("other", 0)),
    ],
)
def test_parse_place(name, expected):
    assert parse_place(name) == expected


@pytest.mark.parametrize(
    "latent, tokens, expected",
    [
        ((64, 64), 4096, (64, 64)),
        ((64, 64), 256, (16, 16)),
        ((32, 24), 768, (32, 24)),
        ((32, 24), 192, (16, 12)),
        ((32, 24), 48, (8, 6)),
        ((27, 27), 196, (14, 14)),  # ceil(27/2) = 14: stride-2 convs round up
        ((28, 20), 35, (7, 5)),
    ],
)
def test_infer_resolution(latent, tokens, expected):
    assert infer_resolution(tokens, latent) == expected


def test_infer_resolution_without_latent():
    assert infer_resolution(256, None) == (16, 16)
    with pytest.raises(ap.AttnPatchError, match="hijack"):
        infer_resolution(192, None)


def test_as_resolution():
    assert as_resolution(16) == (16, 16)
    assert as_resolution((16, 12)) == (16, 12)
    for bad in ("16", 16.0, (1, 2, 3), True):
        with pytest.raises(ap.AttnPatchError):
            as_resolution(bad)
