"""Tests for attnpatch.models.shapes_classifier: the "tiny" classifier, its training and cache."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import attnpatch.models.shapes_classifier as shapes_mod
from attnpatch.data import ShapesConfig, shapes_dataset
from attnpatch.errors import InputError, ModelError
from attnpatch.models import (
    TINY_CLASSIFIER_VERSION,
    TINY_CLASSIFIERS,
    load_classifier,
    tiny_classifier_path,
    train_tiny_classifier,
)
from attnpatch.models.tiny_classifiers import TinyResNet, TinyStridedCNN
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
    monkeypatch.setenv("ATTNPATCH_CACHE", str(tmp_path / "cache"))  # a cache of its own
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
    with pytest.raises(InputError, match="train_per_class is 0"):
        train_tiny_classifier(ShapesConfig(train_per_class=0, heldout_per_class=1))


# --------------------------------------------------------------------------- tiny-b, tiny-c


@pytest.fixture(scope="module")
def tinies():
    """The three default tiny classifiers, from the session cache (tests/conftest.py)."""
    return {name: load_classifier(name) for name in TINY_CLASSIFIERS}


def _layer_types(clf):
    return {type(m) for m in clf.model.modules()}


def test_tiny_b_and_c_are_other_architectures_and_accurate(tinies):
    """Measured held-out accuracy (250 images): tiny 98.0%, tiny-b 99.6%, tiny-c 97.2%."""
    assert TINY_CLASSIFIERS == ("tiny", "tiny-b", "tiny-c")
    kinds = {name: _layer_types(clf) for name, clf in tinies.items()}
    assert nn.BatchNorm2d in kinds["tiny"] and nn.MaxPool2d in kinds["tiny"]
    assert nn.GroupNorm in kinds["tiny-b"] and nn.BatchNorm2d not in kinds["tiny-b"]
    assert isinstance(tinies["tiny-b"].model, TinyResNet)
    assert isinstance(tinies["tiny-c"].model, TinyStridedCNN)
    assert not kinds["tiny-c"] & {nn.BatchNorm2d, nn.GroupNorm, nn.MaxPool2d}
    strides = [m.stride for m in tinies["tiny-c"].model.modules() if isinstance(m, nn.Conv2d)]
    assert strides == [(2, 2), (2, 2)]
    held = shapes_dataset(ShapesConfig(), "heldout")
    for name, clf in tinies.items():
        assert clf.name == name and clf.classes == list(ShapesConfig().classes)
        assert all(not p.requires_grad for p in clf.parameters()) and not clf.training
        with torch.no_grad():
            acc = float((clf(held.images).argmax(1) == held.labels).float().mean())
        assert acc >= 0.9, name
        assert clf.info["heldout_accuracy"] == pytest.approx(acc), name
    params = {n: sum(p.numel() for p in c.parameters()) for n, c in tinies.items()}
    assert len(set(params.values())) == 3  # three different networks
    # different seeds as well as different architectures: each default path is its seed's
    for name, seed in zip(TINY_CLASSIFIERS, (0, 1, 2)):
        cached = Path(tinies[name].info["cache_path"]).name
        assert cached == tiny_classifier_path(seed=seed, arch=name).name


def test_cache_keys_distinct_and_tiny_key_unchanged():
    """The three files never collide; "tiny" keeps the key it had before tiny-b / tiny-c (the
    payload recomputed here as it was written), so existing caches stay valid."""
    cfg = ShapesConfig(size=16)
    paths = [tiny_classifier_path(cfg, seed=0, arch=a) for a in TINY_CLASSIFIERS]
    assert len(set(paths)) == 3 and len({p.name.rsplit("-", 1)[1] for p in paths}) == 3
    assert [p.name.rsplit("-", 1)[0] for p in paths] == list(TINY_CLASSIFIERS)
    old = {"version": TINY_CLASSIFIER_VERSION, "data": cfg.to_dict(), "seed": 0, "epochs": 10,
           "batch_size": 64, "lr": 2e-2, "width": 8}  # fmt: skip
    digest = hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()
    assert paths[0].name == f"tiny-{digest[:20]}.safetensors"
    assert tiny_classifier_path(cfg) == paths[0]  # arch="tiny", seed 0 are the defaults
    assert tiny_classifier_path(cfg, arch="tiny-b") == tiny_classifier_path(cfg, 1, arch="tiny-b")
    # the weights file layout of "tiny" is unchanged too (the names its cache files hold)
    assert list(TinyClassifier(5, 8).state_dict())[:3] == ["mean", "std", "features.0.0.weight"]


@pytest.mark.parametrize("arch", ["tiny-b", "tiny-c"])
def test_tiny_b_c_cache_round_trip(arch, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNPATCH_CACHE", str(tmp_path / "cache"))  # a cache of its own
    cfg = ShapesConfig(train_per_class=6, heldout_per_class=2, size=16)
    state = torch.get_rng_state()
    first = load_classifier(arch, config=cfg)
    assert torch.equal(torch.get_rng_state(), state)
    assert first.info["cache_hit"] is False and first.num_classes == 5
    path = tiny_classifier_path(cfg, arch=arch)
    assert path.is_file() and str(path).startswith(str(tmp_path / "cache"))
    second = load_classifier(arch, config=cfg)
    assert second.info["cache_hit"] is True
    for (k, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), k
    other = load_classifier(arch, config=cfg, seed=7, cache=False)
    assert not all(torch.equal(a, b) for a, b in zip(first.parameters(), other.parameters()))
    with torch.no_grad():  # trains even under no_grad
        fresh, _ = train_tiny_classifier(cfg, arch=arch)
    assert all(torch.equal(a, b) for a, b in zip(first.model.parameters(), fresh.parameters()))


def test_unknown_tiny_architecture():
    with pytest.raises(ModelError, match="unknown tiny classifier architecture 'tiny-x'"):
        train_tiny_classifier(ShapesConfig(train_per_class=1, heldout_per_class=1), arch="tiny-x")
