"""The public DiT architectures' summary (docs/attention-sites.md's "At a glance" table) is
computed from the models built on the meta device, and the docs hold exactly that output."""

from __future__ import annotations

from pathlib import Path

import pytest

from attnpatch.families import reference_summary, reference_table

DOC = Path(__file__).parents[2] / "docs" / "attention-sites.md"


@pytest.mark.parametrize(
    ("name", "joint", "single", "image_only", "heads", "head_dim", "text", "billions"),
    [  # from the public transformer/config.json files and their papers / model cards
        ("sd3-medium", 24, 0, 0, 24, 64, 333, 2.0),
        ("sd35-medium", 24, 0, 13, 24, 64, 333, 2.2),
        ("sd35-large", 38, 0, 0, 38, 64, 333, 8.1),
        ("flux-dev", 19, 38, 0, 24, 128, 512, 11.9),
    ],
)
def test_summary_matches_the_public_models(
    name, joint, single, image_only, heads, head_dim, text, billions
):
    s = reference_summary(name)
    assert (s["joint"], s["single"], s["image_only"]) == (joint, single, image_only)
    assert (s["heads"], s["head_dim"], s["text_tokens"]) == (heads, head_dim, text)
    assert s["grid"] == {512: (32, 32), 1024: (64, 64)}  # VAE 8, patch (or packing) 2
    assert round(s["parameters"] / 1e9, 1) == billions


def test_the_docs_hold_the_generated_table():
    assert reference_table() in DOC.read_text()
