"""encode_prompt against diffusers' pipelines, the embedding cache, token_indices, SDXL ids."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from torch import nn

import attnpatch.diffusion.prompts as prompts_mod
from attnpatch.diffusion.prompts import (
    PromptEmbeds,
    cached_embeddings,
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


class _ForwardCounter:
    def __init__(self, module: nn.Module):
        self.n = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, *args):
        self.n += 1


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
    got = encode_prompt(parts.tokenizer, parts.text_encoder, PROMPTS, cache=False)
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
    got = encode_prompt(sd_xl.tokenizer, sd_xl.text_encoder, PROMPTS, cache=False)
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
    got = encode_prompt((tok, sd_xl.tokenizer), (first, sd_xl.text_encoder), PROMPTS, cache=False)
    assert got.cond.shape == (2, 77, 8 + 16)
    for a, b in zip(got, (cond, uncond, pooled, uncond_pooled)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_negative_prompts_and_shapes(sd):
    one = encode_prompt(sd.tokenizer, sd.text_encoder, "a cat", cache=False)
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


def test_cache_encodes_each_prompt_once(sd):
    encoder = copy.deepcopy(sd.text_encoder)  # a fresh identity: no entries from other tests
    spy = _ForwardCounter(encoder)
    first = encode_prompt(sd.tokenizer, encoder, ["a cat", "a dog", "a cat"])
    assert spy.n == 3  # "a cat", "a dog", "" (the repeated prompt is encoded once)
    for _ in range(3):
        again = encode_prompt(sd.tokenizer, encoder, ["a cat", "a dog", "a cat"])
    assert spy.n == 3
    torch.testing.assert_close(again.cond, first.cond, atol=0, rtol=0)
    encode_prompt(sd.tokenizer, encoder, ["a dog", "a bird"])  # only "a bird" is new
    assert spy.n == 4
    uncached = encode_prompt(sd.tokenizer, encoder, ["a cat", "a dog", "a cat"], cache=False)
    assert spy.n == 7
    torch.testing.assert_close(uncached.cond, first.cond, atol=0, rtol=0)


def test_cache_refreshes_when_weights_change_and_detaches(sd):
    encoder = copy.deepcopy(sd.text_encoder).requires_grad_(True)
    spy = _ForwardCounter(encoder)
    before = encode_prompt(sd.tokenizer, encoder, "a cat")
    assert not before.cond.requires_grad and not before.uncond.requires_grad
    with torch.no_grad():
        encoder.final_layer_norm.bias.add_(1.0)  # an in-place update, as optimisers do
    after = encode_prompt(sd.tokenizer, encoder, "a cat")
    assert spy.n == 4
    torch.testing.assert_close(after.cond, before.cond + 1.0, atol=1e-5, rtol=0)
    assert all(p.grad is None for p in encoder.parameters())


def test_cache_filled_under_inference_mode_serves_training(sd):
    encoder = copy.deepcopy(sd.text_encoder)
    with torch.inference_mode():
        encode_prompt(sd.tokenizer, encoder, "a cat")
    emb = encode_prompt(sd.tokenizer, encoder, "a cat")
    assert not emb.cond.is_inference() and not emb.uncond.is_inference()
    w = torch.ones(8, requires_grad=True)
    x = torch.nn.functional.linear(emb.cond, torch.eye(8) * w)  # saves emb.cond for backward
    x.sum().backward()
    assert w.grad is not None


def test_cache_forgets_collected_encoders(sd):
    gc.collect()  # encoders of earlier tests leave first
    cache_len = len(prompts_mod._encode_one_cached)
    encoder = copy.deepcopy(sd.text_encoder)
    encode_prompt(sd.tokenizer, encoder, ["x1 y1", "x2 y2"])
    assert len(prompts_mod._encode_one_cached) == cache_len + 3
    del encoder
    gc.collect()
    assert len(prompts_mod._encode_one_cached) == cache_len


def test_cached_embeddings_decorator():
    calls = []

    @cached_embeddings(maxsize=2)
    def build(encoder, texts, scale=1.0):
        calls.append((tuple(texts), scale))
        return {"emb": encoder(torch.ones(len(texts), 2)) * scale, "n": len(texts)}

    enc = nn.Linear(2, 3)
    a = build(enc, ["a", "b"])
    assert build(enc, ["a", "b"]) is a and len(calls) == 1
    assert not a["emb"].requires_grad and a["n"] == 2
    build(enc, ["a", "b"], scale=2.0)  # a different key
    build(enc, ("a", "b"))  # a tuple is not the list: a third entry evicts the oldest
    assert len(calls) == 3 and len(build) == 2
    build(enc, ["a", "b"])
    assert len(calls) == 4 and build.hits == 1 and build.misses == 4
    other = nn.Linear(2, 3)
    build(other, ["a", "b"])
    assert len(calls) == 5
    build.cache_clear()
    assert len(build) == 0


def test_cached_embeddings_with_unweakrefable_owner():
    class Slotted:
        __slots__ = ("value",)

        def __init__(self, value):
            self.value = value

    @cached_embeddings
    def build(owner):
        return torch.full((1,), float(owner.value))

    owner = Slotted(3)
    assert build(owner).item() == 3.0 and build(owner) is build(owner)
    assert build.misses == 1


# ----------------------------------------------------------------------------- token_indices


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
