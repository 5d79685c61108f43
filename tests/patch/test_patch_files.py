"""Patch files whose contents would reach the numbers unchecked: non-finite or out-of-range
pixels, missing or malformed metadata (docs/training.md, "Bad inputs")."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from attnpatch import AdversarialPatch
from attnpatch.errors import DataError


@pytest.fixture
def saved(tmp_path):
    path = AdversarialPatch(6, init="random", scale=0.3).save(tmp_path / "p.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    return path, load_file(str(path)), meta


@pytest.mark.parametrize(
    "value, words",
    [(float("nan"), ["NaN or Inf"]), (float("inf"), ["NaN or Inf"]), (3.0, ["not [0, 1]"])],
)
def test_bad_pixels_are_refused(saved, raises, value, words):
    # was: a patch with NaN pixels was applied and written out
    path, tensors, meta = saved
    tensors["pixels"][0, 0, 0, 0] = value
    save_file(tensors, str(path), metadata=meta)
    with raises(DataError, "p.safetensors", *words, "re-save"):
        AdversarialPatch.load(path)


@pytest.mark.parametrize("key", ["scale", "position", "eot", "size", "shape"])
def test_missing_metadata_is_named(saved, raises, key):
    # was: KeyError
    path, tensors, meta = saved
    del meta[key]
    save_file(tensors, str(path), metadata=meta)
    with raises(DataError, "p.safetensors", f"'{key}'", "re-save"):
        AdversarialPatch.load(path)


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("scale", "{not json", ["'scale'", "not valid JSON"]),
        ("size", "[4, 4]", ["size (4, 4)", "(1, 3, 6, 6)"]),
        ("shape", "hexagon", ["bad patch metadata", "hexagon"]),
        ("eot", '{"nonsense": 1}', ["bad patch metadata"]),
        ("format_version", "x", ["format version"]),
    ],
)
def test_malformed_metadata_is_named(saved, raises, key, value, words):
    path, tensors, meta = saved
    meta[key] = value
    save_file(tensors, str(path), metadata=meta)
    with raises(DataError, "p.safetensors", *words):
        AdversarialPatch.load(path)


def test_a_good_file_loads_exactly(saved):
    path, tensors, _ = saved
    assert torch.equal(AdversarialPatch.load(path).pixels.detach(), tensors["pixels"])
