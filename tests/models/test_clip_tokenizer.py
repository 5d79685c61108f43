"""clip_tokenizer(): SD's real CLIP tokenizer, built offline, against open_clip's SimpleTokenizer.

The reference is open_clip's own ``tokenizer.py`` (OpenAI's CLIP tokenizer, copied), loaded by
itself from the installed open-clip-torch: importing ``open_clip`` needs torchvision, the file
alone needs ftfy and regex. Tests that need the file skip, with the reason, where it is absent.
"""

from __future__ import annotations

import gzip
import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
import transformers

from attnpatch.errors import AttnPatchError, InputError, ModelError
from attnpatch.testing import clip_tokenizer

CLASS_NAMES = Path(__file__).parents[1] / "data" / "imagenet_class_names.txt"
_MODULE = sys.modules["attnpatch.models.clip_bpe"]


def _bpe_path() -> Path:
    try:
        return _MODULE.clip_bpe_path()
    except AttnPatchError as exc:
        pytest.skip(
            f"needs open-clip-torch's BPE file (pip install --no-deps open-clip-torch): {exc}"
        )


@pytest.fixture(scope="module")
def bpe() -> Path:
    return _bpe_path()


@pytest.fixture(scope="module")
def tok(bpe):
    return clip_tokenizer()


@pytest.fixture(scope="module")
def simple(bpe):
    """open_clip's ``SimpleTokenizer`` (OpenAI CLIP's reference tokenizer), and its module."""
    pytest.importorskip("ftfy", reason="open_clip's tokenizer.py needs ftfy (pip install ftfy)")
    pytest.importorskip("regex", reason="open_clip's tokenizer.py needs regex")
    spec = importlib.util.spec_from_file_location(
        "_open_clip_tokenizer", bpe.parent / "tokenizer.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # no relative imports: the file loads on its own
    return module.SimpleTokenizer(str(bpe)), module


def _reference_ids(st, prompt: str) -> list[int]:
    """Unpadded, untruncated ids as SD sees them: BOS, the prompt's BPE tokens, EOS."""
    return [st.sot_token_id, *st.encode(prompt), st.eot_token_id]


def _class_names() -> list[str]:
    lines = CLASS_NAMES.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


#: Templates cycled over the class names: punctuation, capitals, digits, apostrophes, spacing.
TEMPLATES = (
    "a photo of a {}",
    "A Photo Of A {}.",
    "A PHOTO OF THE {}!",
    "a close-up photo of the {}, in the wild",
    "{}'s portrait; it's 3 years old (maybe 12?)",
    'two {}s and 1 dog: "{}"',
    "   a  painting\tof a\n{}   ",
    "the {} #42 - 50% off... @home",
    "a café photo of a {} à Paris, naïve style",
    "一只{} in Tokyo 東京 🐱",
)

#: Prompts that open_clip cleans (ftfy, HTML unescaping) before tokenizing and SD's tokenizers
#: do not: curly quotes, HTML entities, a ligature, full-width letters.
CLEANED_BY_OPEN_CLIP = (
    "a cat\u2019s toy",
    "\u201ca photo\u201d of a dog",
    "salt &amp; pepper",
    "a \ufb01sh",  # the fi ligature
    "\uff43\uff41\uff54",  # full-width "cat"
)


def _prompts() -> list[str]:
    names = _class_names()
    prompts = [TEMPLATES[0].format(n) for n in names]
    prompts += [TEMPLATES[1 + i % (len(TEMPLATES) - 1)].format(n, n) for i, n in enumerate(names)]
    prompts += [", ".join(names[i : i + 30]) for i in range(0, 120, 30)]  # over 77 tokens
    return prompts


def test_class_names_file_holds_hundreds_of_distinct_names():
    names = _class_names()
    assert len(names) >= 200 and len(set(names)) == len(names)


def test_vocabulary_and_special_tokens(tok):
    assert isinstance(tok, transformers.CLIPTokenizer)  # the class load_diffusers_folder uses
    assert tok.is_fast and transformers.CLIPTokenizerFast is transformers.CLIPTokenizer
    assert len(tok) == 49408 == len(tok.get_vocab())
    assert (tok.bos_token, tok.bos_token_id) == ("<|startoftext|>", 49406)
    assert (tok.eos_token, tok.eos_token_id) == ("<|endoftext|>", 49407)
    assert tok.pad_token_id == 49407 and tok.model_max_length == 77  # SD1.x


def test_known_ids(tok, simple):
    st, _ = simple
    cases = {
        "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
        "traffic light": [49406, 3399, 1395, 49407],
        "goldfinch": [49406, 4999, 18523, 49407],
    }
    for prompt, ids in cases.items():
        assert tok(prompt).input_ids == ids == _reference_ids(st, prompt), prompt
    assert tok.convert_ids_to_tokens([4999, 18523]) == ["gold", "finch</w>"]
    assert st.decode([4999, 18523]).strip() == "goldfinch" == tok.decode([4999, 18523])


def test_ids_equal_open_clip_on_hundreds_of_prompts(tok, simple):
    st, _ = simple
    prompts = _prompts()
    assert len(prompts) > 500
    got = tok(prompts).input_ids
    wrong = [(p, g) for p, g in zip(prompts, got) if g != _reference_ids(st, p)]
    assert not wrong, f"{len(wrong)} of {len(prompts)} prompts differ, e.g. {wrong[:3]}"
    assert sum(len(g) > 77 for g in got) >= 3  # long prompts are in the set, untruncated
    multi = [n for n in _class_names() if len(tok(n, add_special_tokens=False).input_ids) >= 3]
    assert len(multi) > 100  # the names exercise multi-piece words and phrases


def test_only_open_clips_text_cleaning_differs(tok, simple):
    """SD's tokenizers skip ftfy and HTML unescaping; after open_clip's own cleaning the ids
    agree again."""
    st, module = simple
    for prompt in CLEANED_BY_OPEN_CLIP:
        cleaned = module.basic_clean(prompt)
        assert cleaned != prompt
        assert tok(prompt).input_ids != _reference_ids(st, prompt), prompt
        assert tok(cleaned).input_ids == _reference_ids(st, prompt), prompt


def test_sd2_padding_and_truncation_equal_open_clips(simple):
    """SD2.x's tokenizer pads with "!" (id 0), as open_clip's ``tokenize`` does; both truncate
    to BOS, 75 tokens, EOS."""
    st, _ = simple
    sd2 = clip_tokenizer(pad_token="!")
    assert (sd2.pad_token, sd2.pad_token_id) == ("!", 0)
    prompts = [p for p in _prompts() if "!" not in p]
    got = sd2(prompts, padding="max_length", max_length=77, truncation=True).input_ids
    want = st(prompts, context_length=77).tolist()
    assert got == want
    assert any(row[-1] == 49407 and 0 not in row for row in got)  # some were truncated


def test_sd1_pads_with_end_of_text(tok, simple):
    st, _ = simple
    for prompt in ("a photo of a cat", _prompts()[3]):
        ids = tok(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        ref = _reference_ids(st, prompt)
        assert len(ids) == 77 and ids[: len(ref)] == ref
        assert set(ids[len(ref) :]) == {49407}


def test_sd2_exclamation_marks_become_pad_tokens():
    """With pad "!", a "!" in a prompt is the special pad token: what SDXL's tokenizer_2 gives
    for this prompt in diffusers issue #4153 (open_clip would give 256, 748, 995)."""
    _bpe_path()
    ids = clip_tokenizer(pad_token="!")("! !! !!!", padding="max_length", max_length=77)
    assert ids.input_ids == [49406] + [0] * 6 + [49407] + [0] * 69


def test_save_pretrained_round_trip(tok, tmp_path):
    prompts = _prompts()[:50]
    tok.save_pretrained(tmp_path / "tokenizer")
    back = transformers.CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")
    assert len(back) == 49408 and back.pad_token_id == tok.pad_token_id
    assert back(prompts).input_ids == tok(prompts).input_ids


def test_explicit_path_gz_or_plain_text(tok, bpe, tmp_path):
    prompts = _prompts()[::97]
    gz = tmp_path / "merges.txt.gz"
    shutil.copy(bpe, gz)
    plain = tmp_path / "merges.txt"
    plain.write_bytes(gzip.decompress(bpe.read_bytes()))
    for path in (gz, plain):
        assert clip_tokenizer(path)(prompts).input_ids == tok(prompts).input_ids
    short = clip_tokenizer(gz, model_max_length=10)
    assert len(short(prompts[0], padding="max_length", truncation=True).input_ids) == 10


def test_missing_open_clip_names_the_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        _MODULE.importlib.util, "find_spec", lambda n, *a: None if n == "open_clip" else real(n, *a)
    )
    with pytest.raises(ModelError, match=r"pip install --no-deps open-clip-torch.*path="):
        clip_tokenizer()


def test_bad_arguments(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        clip_tokenizer(tmp_path / "nope.txt.gz")
    junk = tmp_path / "junk.txt"
    junk.write_text("#version: 0.2\na b\nc d\n")
    with pytest.raises(ModelError, match="not CLIP's BPE merge list"):
        clip_tokenizer(junk)
    broken = tmp_path / "broken.txt.gz"
    broken.write_bytes(b"not gzip")
    with pytest.raises(ModelError, match="cannot read"):
        clip_tokenizer(broken)
    _bpe_path()
    with pytest.raises(InputError, match="pad_token"):
        clip_tokenizer(pad_token="<pad>")
    for bad in (1, 77.0, True):
        with pytest.raises(InputError, match="model_max_length"):
            clip_tokenizer(model_max_length=bad)
