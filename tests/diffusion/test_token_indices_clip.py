"""token_indices on SD's real CLIP tokenizer (attnpatch.testing.clip_tokenizer()).

Expected positions never come from token_indices itself: :func:`_spelled` walks the token
sequence, joins BPE pieces up to each end-of-word mark and decodes them back to text, and the
word is looked up among those spelled words by string comparison.
"""

from __future__ import annotations

import pytest
import torch

from attnpatch.diffusion import encode_prompt, token_indices
from attnpatch.errors import AttnPatchError
from attnpatch.testing import clip_tokenizer

EOS = 49407


@pytest.fixture(scope="module")
def tok():
    try:
        return clip_tokenizer()
    except AttnPatchError as exc:
        pytest.skip(
            f"needs open-clip-torch's BPE file (pip install --no-deps open-clip-torch): {exc}"
        )


def _spelled(tok, ids: list[int]) -> list[tuple[str, list[int]]]:
    """``(text, positions)`` of each CLIP word of ``ids``: consecutive pieces up to one ending
    in ``</w>``, decoded back to text (BOS, EOS and padding skipped)."""
    words, pieces = [], []
    for pos, token in enumerate(tok.convert_ids_to_tokens(ids)):
        if ids[pos] in tok.all_special_ids:
            continue
        pieces.append(pos)
        if token.endswith("</w>"):
            words.append((tok.decode([ids[p] for p in pieces]), pieces))
            pieces = []
    return words


def _expected(tok, prompt: str, spelling: list[str], every: bool = False) -> list[int]:
    """Positions of the runs of spelled words equal to ``spelling`` (the first run, or all)."""
    words = _spelled(tok, tok(prompt).input_ids)
    texts = [text for text, _ in words]
    runs = [
        [p for _, ps in words[i : i + len(spelling)] for p in ps]
        for i in range(len(words) - len(spelling) + 1)
        if texts[i : i + len(spelling)] == spelling
    ]
    assert runs, f"{spelling} not spelled in {prompt!r}: {texts}"
    return [p for run in (runs if every else runs[:1]) for p in run]


@pytest.mark.parametrize(
    ("prompt", "word", "spelling"),
    [
        ("a photo of a goldfinch", "goldfinch", ["goldfinch"]),
        ("a photo of a traffic light at night", "traffic light", ["traffic", "light"]),
        ("a tabby cat on a sofa", "tabby cat", ["tabby", "cat"]),
        ("an axolotl in a tank", "axolotl", ["axolotl"]),
        ("a triceratops skeleton", "triceratops", ["triceratops"]),
        ("a great white shark", "great white shark", ["great", "white", "shark"]),
        ("a jack-o'-lantern on the porch", "jack-o'-lantern", ["jack", "-", "o", "'-", "lantern"]),
    ],
)
def test_multi_token_words_and_phrases(tok, prompt, word, spelling):
    positions = token_indices(tok, prompt, word)
    assert positions == _expected(tok, prompt, spelling)
    ids = tok(prompt, padding="max_length", max_length=77).input_ids
    assert tok.decode([ids[p] for p in positions]).replace(" ", "") == word.replace(" ", "")


def test_some_words_split_into_three_or_more_pieces(tok):
    for word in ("axolotl", "triceratops"):
        positions = token_indices(tok, f"an {word}", word)
        assert len(positions) == len(tok.tokenize(word)) >= 3
        assert not any(t.endswith("</w>") for t in tok.tokenize(word)[:-1])  # one word


@pytest.mark.parametrize(
    ("prompt", "word", "spelling"),
    [
        ("a photo of a cat.", "cat", ["cat"]),
        ("a cat, a dog", "cat", ["cat"]),
        ("a cat, a dog", "dog", ["dog"]),
        ("the cat's toy", "cat", ["cat"]),
        ("(cat) [dog]", "dog", ["dog"]),
        ('a "cat"!', "cat", ["cat"]),
        ("a photo of a cat.", "cat.", ["cat", "."]),
        ("a photo of a cat...", "cat...", ["cat", "..."]),
        ("salt, pepper", ",", [","]),
    ],
)
def test_punctuation(tok, prompt, word, spelling):
    assert token_indices(tok, prompt, word) == _expected(tok, prompt, spelling)


def test_punctuation_run_must_match_exactly(tok):
    with pytest.raises(AttnPatchError, match="not in the prompt"):
        token_indices(tok, "a photo of a cat...", "cat.")  # "..." is one token, not "."


@pytest.mark.parametrize("prompt", ["A Photo Of A Cat", "A PHOTO OF A CAT", "a photo of a cat"])
@pytest.mark.parametrize("word", ["cat", "Cat", "CAT"])
def test_case_does_not_matter(tok, prompt, word):
    assert token_indices(tok, prompt, word) == _expected(tok, prompt.lower(), ["cat"]) == [5]
    assert token_indices(tok, "  a   photo\tof a\n" + prompt[-3:], word) == [5]  # spacing


def test_a_word_that_appears_twice(tok):
    prompt = "a cat sitting next to a tabby cat and a dog"
    assert token_indices(tok, prompt, "cat") == _expected(tok, prompt, ["cat"])
    every = token_indices(tok, prompt, "cat", all_occurrences=True)
    assert every == _expected(tok, prompt, ["cat"], every=True) and len(every) == 2
    prompt = "a goldfinch and a goldfinch"
    every = token_indices(tok, prompt, "goldfinch", all_occurrences=True)
    assert every == _expected(tok, prompt, ["goldfinch"], every=True) and len(every) == 4


@pytest.mark.parametrize(
    ("prompt", "word"),
    [
        ("a tomcat", "cat"),  # tom + cat</w>: the same last piece as "cat"
        ("a bobcat", "cat"),  # one token in CLIP
        ("a catfish", "cat"),
        ("a goldfinch", "finch"),  # gold + finch</w>
        ("a goldfinch", "gold"),
        ("a photo of 12 cats", "2"),  # CLIP gives each digit its own </w>
        ("a photo of 123 cats", "12"),
        ("a cat5 cable", "cat"),
    ],
)
def test_a_word_inside_another_is_not_found(tok, prompt, word):
    assert word in prompt
    with pytest.raises(AttnPatchError, match="not in the prompt"):
        token_indices(tok, prompt, word)


def test_the_whole_word_is_found_beside_the_longer_one(tok):
    prompt = "a tomcat, 12 birds and a cat with 2 goldfinches"
    assert token_indices(tok, prompt, "cat") == _expected(tok, prompt, ["cat"])
    twos = _expected(tok, prompt, ["2"], every=True)  # CLIP spells "12" as "1", "2"
    assert len(twos) == 2 and twos[0] == _expected(tok, prompt, ["1", "2"])[1]
    assert token_indices(tok, prompt, "2", all_occurrences=True) == twos[1:]  # not "12"'s
    assert token_indices(tok, prompt, "12") == _expected(tok, prompt, ["1", "2"])


def _long_prompt(n_filler: int, word: str) -> str:
    """``n_filler`` single-token words, then ``word``: its first token at ``n_filler + 1``."""
    return " ".join(["a"] * n_filler) + f" {word} and a dog"


def test_the_77_token_limit(tok):
    edge = _long_prompt(74, "cat")
    assert token_indices(tok, edge, "cat") == _expected(tok, edge, ["cat"]) == [75]
    with pytest.raises(AttnPatchError, match="position 76, past the 77-token limit"):
        token_indices(tok, _long_prompt(75, "cat"), "cat")
    assert token_indices(tok, _long_prompt(73, "goldfinch"), "goldfinch") == [74, 75]
    with pytest.raises(AttnPatchError, match="truncated away"):  # a word cut in two
        token_indices(tok, _long_prompt(74, "goldfinch"), "goldfinch")


def test_occurrences_past_the_limit_are_left_out_with_a_warning(tok):
    prompt = "a cat " + " ".join(["a"] * 80) + " cat"
    assert token_indices(tok, prompt, "cat") == [2]
    with pytest.warns(UserWarning, match="1 of the 2 occurrences of 'cat'"):
        assert token_indices(tok, prompt, "cat", all_occurrences=True) == [2]


def _clip_text_encoder(tok):
    """A 1-layer CLIP text encoder over the full 49408-token vocabulary (random weights)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=8,
        intermediate_size=16,
        num_attention_heads=2,
        num_hidden_layers=1,
        max_position_embeddings=77,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return CLIPTextModel(config).eval()


def test_encode_prompt_truncates_where_token_indices_counts(tok):
    """The ids encode_prompt feeds the text encoder hold the word at token_indices' positions,
    and a word token_indices refuses is gone from them."""
    encoder = _clip_text_encoder(tok)
    seen: list[torch.Tensor] = []
    encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    prompt = _long_prompt(72, "goldfinch") + " " + " ".join(["a"] * 10) + " tench"
    with pytest.warns(UserWarning, match="longer than 77 tokens and was truncated"):
        embeds = encode_prompt(tok, encoder, prompt)
    assert tuple(embeds.cond.shape) == (1, 77, 8)
    ids = seen[0][0].tolist()  # row 0: the prompt (row 1: the empty negative prompt)
    assert len(ids) == 77 and ids[0] == tok.bos_token_id and ids[-1] == EOS
    positions = token_indices(tok, prompt, "goldfinch")
    assert positions == [73, 74] and tok.decode([ids[p] for p in positions]) == "goldfinch"
    with pytest.raises(AttnPatchError, match="truncated away"):
        token_indices(tok, prompt, "tench")
    assert "tench" not in [t for t, _ in _spelled(tok, ids)]


def test_sd2_pad_token_keeps_the_positions(tok):
    sd2 = clip_tokenizer(pad_token="!")
    for prompt, word in [("a photo of a cat!", "cat"), ("wow! a tabby cat", "tabby cat")]:
        assert token_indices(sd2, prompt, word) == token_indices(tok, prompt, word)
