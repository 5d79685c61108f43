"""Tests for attnpatch.models.shapes_classifier: the "tiny" classifier, its training and cache."""

from __future__ import annotations

import json

import pytest
import torch

import attnpatch.models.shapes_classifier as shapes_mod
from attnpatch.data import ShapesConfig, shapes_dataset
from attnpatch.errors import AttnPatchError
from attnpatch.models import load_classifier, tiny_classifier_path, train_tiny_classifier
from attnpatch.testing import TinyClassifier, tiny_classifier

# --------------------------------------------------------------------------- tiny classifier


def test_tiny_classifier_accuracy_and_rng_restored():
    """The default recipe: measured 98.4% held-out (250 images); assert well below."""
    torch.manual_seed(7)
    state = torch.get_rng_state()
    clf = load_classifier("tiny")
    assert torch.equal(torch.get_rng_state(), state)
    assert clf.classes == ["circle", "cross", "square", "star", "triangle"]
    assert clf.num_classes == 5 and clf.input_size == (32, 32)
    held = shapes_dataset(ShapesConfig(), "heldout")
    with torch.no_grad():
        acc = float((clf(held.images).argmax(1) == held.labels).float().mean())
    assert acc > 0.85
    assert clf.info["heldout_accuracy"] == pytest.approx(acc)
    assert all(not p.requires_grad for p in clf.parameters()) and not clf.training


def test_freshly_trained_tiny_classifier_has_no_stale_gradients(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNPATCH_CACHE", str(tmp_path))  # empty cache: trains now
    clf = load_classifier("tiny", config=ShapesConfig(train_per_class=20, heldout_per_class=2))
    assert all(p.grad is None for p in clf.parameters())


def test_tiny_classifier_cache_hit_deterministic_atomic(monkeypatch, tmp_path):
    cfg = ShapesConfig(train_per_class=12, heldout_per_class=2, size=16)
    calls = []
    real = shapes_mod.train_tiny_classifier

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(shapes_mod, "train_tiny_classifier", spy)
    first = load_classifier("tiny", config=cfg, seed=3)
    assert len(calls) == 1 and first.info["cache_hit"] is False
    path = tiny_classifier_path(cfg, seed=3)
    assert str(path).startswith(str(tmp_path / "cache")) and path.is_file()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    second = load_classifier("tiny", config=cfg.to_dict(), seed=3)
    assert len(calls) == 1 and second.info["cache_hit"] is True
    for (k, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), k
    # Same seed retrained without the cache, with another caller thread count: bit-identical
    # weights (training runs on one thread; the caller's count is restored). Another seed:
    # different weights.
    threads = torch.get_num_threads()
    torch.set_num_threads(2 if threads == 1 else 1)
    try:
        fresh = load_classifier("tiny", config=cfg, seed=3, cache=False)
        assert torch.get_num_threads() == (2 if threads == 1 else 1)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), fresh.parameters()))
    other = load_classifier("tiny", config=cfg, seed=4)
    assert not all(torch.equal(a, b) for a, b in zip(first.parameters(), other.parameters()))
    assert tiny_classifier_path(cfg, seed=4) != path
    # A corrupt cache file is retrained and replaced.
    path.write_bytes(b"garbage")
    n = len(calls)
    again = load_classifier("tiny", config=cfg, seed=3)
    assert len(calls) == n + 1 and again.info["cache_hit"] is False
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["config"])["data"] == cfg.to_dict()


def test_untrained_tiny_classifier_is_seeded_and_leaves_the_rng_alone():
    torch.manual_seed(11)
    state = torch.get_rng_state()
    a, b, c = tiny_classifier(5, seed=2), tiny_classifier(5, seed=2), tiny_classifier(5, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert isinstance(a, TinyClassifier) and not a.training
    assert all(p.requires_grad for p in a.parameters())  # untrained: weights trainable
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))
    logits = a(torch.rand(3, 3, 32, 32))
    assert logits.shape == (3, 5)


def test_train_tiny_classifier_needs_training_images():
    with pytest.raises(AttnPatchError, match="train_per_class is 0"):
        train_tiny_classifier(ShapesConfig(train_per_class=0, heldout_per_class=1))
