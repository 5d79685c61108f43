"""encode_prompt against diffusers' pipelines, class prompts, token_indices, SDXL ids."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from attnpatch.diffusion.prompts import (
    PromptEmbeds,
    class_prompt,
    encode_prompt,
    sdxl_added_cond_kwargs,
    token_indices,
)
from attnpatch.errors import AttnPatchError
from attnpatch.testing import tiny_sd, tiny_text_encoder, tiny_tokenizer

PROMPTS = ["a photo of a cat", "a red zebra on a ship"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def sd():
    return tiny_sd("sd15")


@pytest.fixture(scope="module")
def sd_xl():
    return tiny_sd("sdxl")


def _xl_pipeline(sd_xl, text_encoder=None, tokenizer=None):
    return StableDiffusionXLPipeline(
        vae=sd_xl.vae,
        text_encoder=text_encoder,
        text_encoder_2=sd_xl.text_encoder,
        tokenizer=tokenizer,
        tokenizer_2=sd_xl.tokenizer,
        unet=sd_xl.unet,
        scheduler=sd_xl.scheduler,
        add_watermarker=False,
    )


# ----------------------------------------------------------------------------- encode_prompt


@pytest.mark.parametrize("variant", ["sd15", "sd2"])
def test_matches_diffusers_sd_pipeline(variant):
    parts = tiny_sd(variant)
    pipe = parts.pipeline()
    with torch.no_grad():
        ref_cond, ref_uncond = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
    got = encode_prompt(parts.tokenizer, parts.text_encoder, PROMPTS)
    assert isinstance(got, PromptEmbeds) and got.pooled is None and got.uncond_pooled is None
    assert got.cond.shape == (2, 77, parts.text_encoder.config.hidden_size)
    torch.testing.assert_close(got.cond, ref_cond, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got.uncond, ref_uncond, atol=1e-6, rtol=1e-6)


def test_matches_diffusers_sdxl_pipeline(sd_xl):
    pipe = _xl_pipeline(sd_xl)
    with torch.no_grad():
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
            PROMPTS, device="cpu", negative_prompt=["", ""]
        )
    got = encode_prompt(sd_xl.tokenizer, sd_xl.text_encoder, PROMPTS)
    for a, b in zip(got, (cond, uncond, pooled, uncond_pooled)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert got.pooled.shape == (2, 16)


def test_matches_diffusers_sdxl_two_encoders(sd_xl, tok):
    first = tiny_text_encoder("sd15")  # a plain CLIPTextModel, width 8, like SDXL's first
    pipe = _xl_pipeline(sd_xl, text_encoder=first, tokenizer=tok)
    with torch.no_grad():
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
            PROMPTS, device="cpu", negative_prompt=["", ""]
        )
    got = encode_prompt((tok, sd_xl.tokenizer), (first, sd_xl.text_encoder), PROMPTS)
    assert got.cond.shape == (2, 77, 8 + 16)
    for a, b in zip(got, (cond, uncond, pooled, uncond_pooled)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_negative_prompts_and_shapes(sd):
    one = encode_prompt(sd.tokenizer, sd.text_encoder, "a cat")
    assert one.cond.shape == one.uncond.shape == (1, 77, 8)
    many = encode_prompt(sd.tokenizer, sd.text_encoder, PROMPTS, negative_prompt="noise")
    noise = encode_prompt(sd.tokenizer, sd.text_encoder, "noise")
    torch.testing.assert_close(many.uncond, noise.cond.expand(2, -1, -1), atol=0, rtol=0)
    per_row = encode_prompt(sd.tokenizer, sd.text_encoder, PROMPTS, negative_prompt=["a", "b"])
    assert not torch.equal(per_row.uncond[0], per_row.uncond[1])
    for bad in ([], [1, 2], None):
        with pytest.raises(AttnPatchError, match="list of strings"):
            encode_prompt(sd.tokenizer, sd.text_encoder, bad)
    with pytest.raises(AttnPatchError, match="3 negative prompts for 2 prompts"):
        encode_prompt(sd.tokenizer, sd.text_encoder, PROMPTS, negative_prompt=["", "", ""])
    with pytest.raises(AttnPatchError, match="one tokenizer per encoder"):
        encode_prompt([sd.tokenizer, sd.tokenizer], sd.text_encoder, PROMPTS)


class _ForwardCounter:
    """Counts the encoder's forward calls and the rows each one got."""

    def __init__(self, module):
        self.rows = []
        self.handle = module.register_forward_pre_hook(
            lambda m, args: self.rows.append(args[0].shape[0])
        )


def test_each_distinct_text_is_encoded_once_in_one_call(sd):
    encoder = copy.deepcopy(sd.text_encoder)
    spy = _ForwardCounter(encoder)
    got = encode_prompt(sd.tokenizer, encoder, ["a cat", "a dog", "a cat"], negative_prompt="")
    assert spy.rows == [3]  # "a cat", "a dog", "" in one batch
    torch.testing.assert_close(got.cond[0], got.cond[2], atol=0, rtol=0)
    alone = [encode_prompt(sd.tokenizer, encoder, p) for p in ("a cat", "a dog")]
    torch.testing.assert_close(got.cond[1], alone[1].cond[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got.uncond, alone[0].uncond.expand(3, -1, -1), atol=1e-6, rtol=1e-6)
    assert not got.cond.requires_grad and all(p.grad is None for p in encoder.parameters())
    with torch.enable_grad():
        encoder.requires_grad_(True)
        e = encode_prompt(sd.tokenizer, encoder, "a cat")
    assert not e.cond.requires_grad  # the encoder runs under no_grad: no graph into it


def test_take_selects_rows_of_every_field(sd_xl):
    e = encode_prompt(sd_xl.tokenizer, sd_xl.text_encoder, PROMPTS, negative_prompt=["x", "y"])
    t = e.take(torch.tensor([1, 1, 0]))
    assert isinstance(t, PromptEmbeds) and t.cond.shape[0] == 3
    for got, full in zip(t, e):
        torch.testing.assert_close(got, full[[1, 1, 0]], atol=0, rtol=0)
    plain = encode_prompt(sd_xl.tokenizer, sd_xl.text_encoder, "a cat")._replace(pooled=None)
    assert plain.take([0, 0]).pooled is None


def test_class_prompt():
    assert class_prompt("star") == "a photo of a star"
    assert class_prompt("cat", "a close up view of a {label}") == "a close up view of a cat"
    assert class_prompt("a{b}", "{label}!") == "a{b}!"  # braces in a name are kept verbatim
    with pytest.raises(AttnPatchError, match="no '\\{label\\}' placeholder"):
        class_prompt("cat", "a photo of a cat")
    with pytest.raises(AttnPatchError, match="label name is empty"):
        class_prompt(" ")


def _position(tok, prompt, token):
    """Independent: the position of ``token`` in the tokenizer's token list, +1 for BOS."""
    return tok.tokenize(prompt).index(token) + 1


def test_token_indices_single_token(tok):
    assert token_indices(tok, "a photo of a cat", "cat") == [
        _position(tok, "a photo of a cat", "cat</w>")
    ]
    assert token_indices(tok, "A photo of a CAT", "Cat") == [5]
    ids = tok("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert tok.decode([ids[i] for i in token_indices(tok, "a photo of a cat", "cat")]) == "cat"


def test_token_indices_multi_token_word_and_phrase(tok):
    prompt = "a red zebra on a ship"
    pos = token_indices(tok, prompt, "zebra")
    pieces = tok.tokenize("zebra")
    assert len(pieces) > 1 and pos == list(range(3, 3 + len(pieces)))
    ids = tok(prompt).input_ids
    assert tok.decode([ids[i] for i in pos]).replace(" ", "") == "zebra"
    assert token_indices(tok, prompt, "on a ship") == [3 + len(pieces) + j for j in range(3)]


def test_token_indices_repeated_words(tok):
    prompt = "a cat and a cat"
    assert token_indices(tok, prompt, "cat") == [2]
    assert token_indices(tok, prompt, "cat", all_occurrences=True) == [2, 5]


def test_token_indices_whole_words_only(tok):
    assert tok.tokenize("bobcat")[-1] == "cat</w>"  # the trap: same last token as "cat"
    with pytest.raises(AttnPatchError, match=r"not in the prompt .*'bobcat'"):
        token_indices(tok, "a bobcat", "cat")
    assert token_indices(tok, "a bobcat and a cat", "cat") == [
        len(tok.tokenize("a bobcat and a")) + 1
    ]


def test_token_indices_errors(tok):
    with pytest.raises(AttnPatchError, match=r"\['a', 'photo', 'of', 'a', 'dog'\]"):
        token_indices(tok, "a photo of a dog", "cat")
    with pytest.raises(AttnPatchError, match="non-empty"):
        token_indices(tok, "a cat", " ")
    long_prompt = " ".join(["a"] * 80) + " cat"
    with pytest.raises(AttnPatchError, match="truncated"):
        token_indices(tok, long_prompt, "cat")
    edge = " ".join(["a"] * 74) + " cat"  # cat at position 75, the last kept slot
    assert token_indices(tok, edge, "cat") == [75]


# ----------------------------------------------------------------------------- SDXL


def test_sdxl_added_cond_kwargs_match_diffusers(sd_xl):
    pipe = _xl_pipeline(sd_xl)
    pooled = torch.randn(2, 16)
    kw = sdxl_added_cond_kwargs(
        pooled,
        (48, 64),
        original_size=(96, 128),
        crops_coords_top_left=(4, 8),
        unet=sd_xl.unet,
    )
    ref = pipe._get_add_time_ids((96, 128), (4, 8), (48, 64), torch.float32, 16)
    assert kw["time_ids"].shape == (2, 6)
    torch.testing.assert_close(kw["time_ids"], ref.expand(2, -1), atol=0, rtol=0)
    torch.testing.assert_close(kw["text_embeds"], pooled, atol=0, rtol=0)


def test_sdxl_added_cond_kwargs_rows_and_errors(sd_xl):
    p, u = torch.randn(1, 16), torch.randn(1, 16)
    kw = sdxl_added_cond_kwargs(p, 32, uncond_pooled=u, batch_size=3)
    assert kw["text_embeds"].shape == (6, 16) and kw["time_ids"].shape == (6, 6)
    assert torch.equal(kw["text_embeds"][:3], u.expand(3, -1))
    assert torch.equal(kw["text_embeds"][3:], p.expand(3, -1))
    with pytest.raises(AttnPatchError, match="add_embedding takes 40"):
        sdxl_added_cond_kwargs(torch.randn(1, 8), 32, unet=sd_xl.unet)
    with pytest.raises(AttnPatchError, match="batch 2 for batch_size 3"):
        sdxl_added_cond_kwargs(torch.randn(2, 16), 32, batch_size=3)
    with pytest.raises(AttnPatchError, match=r"\(B, P\)"):
        sdxl_added_cond_kwargs(torch.randn(16), 32)
