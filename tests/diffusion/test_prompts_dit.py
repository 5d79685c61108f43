"""encode_prompt and token_indices on SD3's (CLIP-L, CLIP-G, T5) and Flux's (CLIP-L, T5) text
stacks, against the pipelines' own encode_prompt; the T5-convention tokenizer's rules."""

from __future__ import annotations

import pytest
import torch

from attnpatch.diffusion import encode_prompt, token_indices
from attnpatch.errors import InputError, ModelError
from attnpatch.testing import tiny_t5_tokenizer, tiny_tokenizer

PROMPTS = ["a photo of a circle", "a red star on a blue and green background"]
# each distinct text is encoded once, in one batch: other batches, other rounding
TOL = dict(atol=1e-6, rtol=1e-6)


@pytest.fixture(scope="module")
def t5():
    return tiny_t5_tokenizer()


# ----------------------------------------------------------------------------- encode_prompt


@pytest.mark.parametrize("msl", [None, 40])
def test_sd3_matches_the_pipelines_encode_prompt(sd3, msl):
    pipe = sd3.pipeline()
    kw = {} if msl is None else {"max_sequence_length": msl}
    with torch.no_grad():
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
            PROMPTS, None, None, device="cpu", do_classifier_free_guidance=True, **kw
        )
    got = encode_prompt(sd3.tokenizers, sd3.text_encoders, PROMPTS, max_sequence_length=msl)
    assert got.cond.shape == (2, 77 + (msl or 256), 32) and got.pooled.shape == (2, 24)
    for name, ref in zip(got._fields, (cond, uncond, pooled, uncond_pooled)):
        torch.testing.assert_close(getattr(got, name), ref, **TOL, msg=name)


def test_sd3_negative_prompt_matches_the_pipeline(sd3):
    pipe = sd3.pipeline()
    with torch.no_grad():
        _, uncond, _, uncond_pooled = pipe.encode_prompt(
            PROMPTS, None, None, device="cpu", negative_prompt=["a star", "a cross"]
        )
    got = encode_prompt(
        sd3.tokenizers, sd3.text_encoders, PROMPTS, negative_prompt=["a star", "a cross"]
    )
    torch.testing.assert_close(got.uncond, uncond, **TOL)
    torch.testing.assert_close(got.uncond_pooled, uncond_pooled, **TOL)


@pytest.mark.parametrize("msl", [None, 24])
def test_flux_matches_the_pipelines_encode_prompt(flux, msl):
    pipe = flux.pipeline()
    kw = {} if msl is None else {"max_sequence_length": msl}
    with torch.no_grad():
        cond, pooled, text_ids = pipe.encode_prompt(PROMPTS, None, device="cpu", **kw)
        neg, neg_pooled, _ = pipe.encode_prompt(["", ""], None, device="cpu", **kw)
    got = encode_prompt(flux.tokenizers, flux.text_encoders, PROMPTS, max_sequence_length=msl)
    assert got.cond.shape == (2, msl or 512, 32) and got.pooled.shape == (2, 8)
    assert text_ids.shape == (got.cond.shape[1], 3)
    for name, ref in zip(got._fields, (cond, neg, pooled, neg_pooled)):
        torch.testing.assert_close(getattr(got, name), ref, **TOL, msg=name)


def test_the_t5_part_of_sd3_is_the_t5_encoders_output(sd3, t5):
    """The columns token_indices points at hold the word's T5 states."""
    prompt = "a photo of a circle"
    e = encode_prompt(sd3.tokenizers, sd3.text_encoders, prompt, max_sequence_length=16)
    ids = t5(prompt, padding="max_length", max_length=16, return_tensors="pt").input_ids
    with torch.no_grad():
        states = sd3.text_encoder_3(ids).last_hidden_state
    torch.testing.assert_close(e.cond[:, 77:], states)
    pos = token_indices(sd3.tokenizers, prompt, "circle", max_sequence_length=16)
    assert pos == [5, 77 + 4]
    assert t5.convert_ids_to_tokens(int(ids[0, 4])) == "\u2581circle"
    torch.testing.assert_close(e.cond[0, pos[1]], states[0, 4])


def test_long_prompts_warn_in_the_t5_part(flux):
    long = " ".join(["circle"] * 30)
    with pytest.warns(UserWarning, match="longer than 16 tokens"):
        encode_prompt(flux.tokenizers, flux.text_encoders, long, max_sequence_length=16)


def test_stack_errors(sd3, flux, sd15, t5):
    with pytest.raises(ModelError, match="unsupported text stack"):
        encode_prompt((t5, tiny_tokenizer()), (sd3.text_encoder_3, sd3.text_encoder), "a circle")
    with pytest.raises(ModelError, match="CLIPTextModelWithProjection"):
        encode_prompt(
            sd3.tokenizers, (flux.text_encoder, sd3.text_encoder_2, sd3.text_encoder_3), "a"
        )
    with pytest.raises(InputError, match="max_sequence_length"):
        encode_prompt(flux.tokenizers, flux.text_encoders, "a", max_sequence_length=1)
    # CLIP stacks ignore it and stay as they were
    a = encode_prompt(sd15.tokenizer, sd15.text_encoder, "a cat", max_sequence_length=16)
    b = encode_prompt(sd15.tokenizer, sd15.text_encoder, "a cat")
    torch.testing.assert_close(a.cond, b.cond, atol=0, rtol=0)


# ----------------------------------------------------------------------------- the tokenizer


def test_tiny_t5_tokenizer_follows_t5s_conventions(t5, tmp_path):
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2)
    assert t5.convert_ids_to_tokens(len(t5) - 1) == "<extra_id_0>"
    ids = t5("a photo of a circle").input_ids
    assert ids[-1] == 1 and ids[0] != 0  # </s> appended, no BOS
    tokens = t5.convert_ids_to_tokens(t5("A Circle").input_ids)
    assert tokens[:2] == ["\u2581", "A"]  # case kept: "A" is not "a"
    assert t5("a circle é").input_ids[-2] == 2  # unknown characters are <unk>
    assert tiny_t5_tokenizer()("two circles").input_ids == t5("two circles").input_ids
    t5.save_pretrained(tmp_path)
    from transformers import T5TokenizerFast

    again = T5TokenizerFast.from_pretrained(tmp_path)
    assert again("a goldfinch, 12 stars").input_ids == t5("a goldfinch, 12 stars").input_ids


# ----------------------------------------------------------------------------- token_indices on T5


def _tokens(t5, prompt, positions):
    ids = t5(prompt).input_ids
    return [t5.convert_ids_to_tokens(ids[p]) for p in positions]


def test_t5_single_piece_and_multi_piece_words(t5):
    assert token_indices(t5, "a photo of a circle", "circle") == [4]
    prompt = "a goldfinch on a star"
    pos = token_indices(t5, prompt, "goldfinch")
    assert _tokens(t5, prompt, pos) == ["\u2581", "g", "o", "l", "d", "f", "in", "c", "h"]
    assert token_indices(t5, prompt, "star") == [len(pos) + 3]


def test_t5_phrases_case_and_spacing(t5):
    prompt = "a red  star on a Blue and green background"
    assert _tokens(t5, prompt, token_indices(t5, prompt, "red star")) == ["▁red", "▁star"]
    assert token_indices(t5, prompt, "blue") == token_indices(t5, prompt, "Blue")
    assert _tokens(t5, prompt, token_indices(t5, prompt, "BLUE")) == ["▁", "B", "l", "u", "e"]


def test_t5_whole_words_and_punctuation(t5):
    for prompt, word in [("a tomcat", "cat"), ("two circles", "circle"), ("12 stars", "2")]:
        with pytest.raises(InputError, match="not in the prompt"):
            token_indices(t5, prompt, word)
    assert _tokens(t5, "a cat.", token_indices(t5, "a cat.", "cat")) == ["▁cat"]
    assert _tokens(t5, "a cat's", token_indices(t5, "a cat's", "cat")) == ["▁cat"]
    with pytest.raises(InputError, match="not in the prompt"):
        token_indices(t5, "a cat...", "cat.")
    assert (
        token_indices(t5, "a tomcat and a cat", "cat")[-1]
        == len(t5("a tomcat and a").input_ids) - 1
    )


def test_t5_repeated_words(t5):
    prompt = "a circle and a circle"
    assert token_indices(t5, prompt, "circle") == [1]
    assert token_indices(t5, prompt, "circle", all_occurrences=True) == [1, 4]


def test_t5_length_limit(t5):
    prompt = " ".join(["a"] * 14 + ["circle", "and", "circle"])  # circles at 14 and 16
    assert token_indices(t5, prompt, "circle", max_sequence_length=16) == [14]
    with pytest.raises(InputError, match="position 14, past the 15-token limit"):
        token_indices(t5, prompt, "circle", max_sequence_length=15)
    with pytest.warns(UserWarning, match="1 of the 2 occurrences"):
        assert token_indices(t5, prompt, "circle", all_occurrences=True,
                             max_sequence_length=17) == [14]  # fmt: skip


# ----------------------------------------------------------------------------- whole stacks


def test_stack_positions(sd3, flux, sd15, sdxl):
    prompt = "a photo of a red star"
    clip = token_indices(sd15.tokenizer, prompt, "star")
    assert token_indices(sd15.tokenizers, prompt, "star") == clip == [6]
    assert token_indices(sdxl.tokenizers, prompt, "star") == clip  # unchanged: SDXL's first
    assert token_indices(flux.tokenizers, prompt, "star") == [5]
    assert token_indices(sd3.tokenizers, prompt, "star") == [6, 77 + 5]
    assert token_indices(sd3.tokenizers, prompt, "red star") == [5, 6, 77 + 4, 77 + 5]
    with pytest.raises(InputError, match="not in the prompt"):
        token_indices(sd3.tokenizers, prompt, "circle")


def test_sd3_word_past_clips_limit_keeps_its_t5_positions(sd3):
    prompt = " ".join(["a"] * 80 + ["star"])
    with pytest.warns(UserWarning, match="0 in the CLIP part and 1 in the T5 part"):
        assert token_indices(sd3.tokenizers, prompt, "star") == [77 + 80]
    with pytest.raises(InputError, match="past both SD3 length limits"):
        token_indices(sd3.tokenizers, prompt, "star", max_sequence_length=32)
