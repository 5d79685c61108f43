"""Tests for attnpatch.models.tiny (and its re-export attnpatch.testing): the tiny SD stacks."""

from __future__ import annotations

import doctest

import pytest
import torch

import attnpatch.models.tiny as tiny_mod
import attnpatch.testing as testing_mod
from attnpatch.diffusion import DiffusionParts
from attnpatch.errors import InputError, ModelError
from attnpatch.testing import (
    VOCAB_WORDS,
    mid_unet,
    reference_unet,
    tiny_sd,
    tiny_text_encoder,
    tiny_tokenizer,
    tiny_unet,
    tiny_vae,
)


@pytest.mark.parametrize("mod", [tiny_mod, testing_mod], ids=["models.tiny", "testing"])
def test_doctests(mod):
    result = doctest.testmod(mod)
    assert result.attempted > 0 and result.failed == 0


def test_testing_reexports_the_builders():
    for name in testing_mod.__all__:
        assert getattr(testing_mod, name) is not None, name
    assert not hasattr(testing_mod, "TinySD")  # the stacks are plain DiffusionParts
    assert isinstance(tiny_sd("sd2"), DiffusionParts)


def test_vocab_words_and_token_ids_are_pinned():
    """The tokenizer's ids come from VOCAB_WORDS' order: these values must never change."""
    assert len(VOCAB_WORDS) == len(set(VOCAB_WORDS)) == 56
    assert VOCAB_WORDS[:3] == ["a", "an", "the"] and VOCAB_WORDS[-2:] == ["patch", "sticker"]
    tok = tiny_tokenizer()
    assert len(tok) == 700
    ids = tok("a photo of a goldfish sticker zebra").input_ids
    assert ids == [698, 320, 527, 515, 320, 670, 697, 89, 68, 592, 320, 699]
    for word in VOCAB_WORDS:  # every listed word is one token
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word


def test_builders_are_seeded_frozen_and_leave_the_rng_alone():
    torch.manual_seed(5)
    state = torch.get_rng_state()
    builders = [
        lambda s: tiny_unet("sd15", s),
        lambda s: tiny_unet("sd15", s, deep=True),
        lambda s: tiny_vae(s),
        lambda s: tiny_text_encoder("sdxl", s),
        lambda s: mid_unet(s, width=8, cross_attention_dim=16),
    ]
    for build in builders:
        a, b, c = build(0), build(0), build(1)
        assert not a.training and all(not p.requires_grad for p in a.parameters())
        assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
        assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))
    assert torch.equal(torch.get_rng_state(), state)


def test_reference_unet_on_meta_and_errors():
    unet = reference_unet("sd15")
    assert unet.device.type == "meta" and unet.config.cross_attention_dim == 768
    assert all(not p.requires_grad for p in unet.parameters())
    with pytest.raises(ModelError, match="unknown reference UNet 'sd3'"):
        reference_unet("sd3")
    with pytest.raises(ModelError, match="unknown tiny variant 'sd3'"):
        tiny_sd("sd3")
    with pytest.raises(InputError, match="deep=True exists for the sd15 variant only"):
        tiny_unet("sd2", deep=True)
