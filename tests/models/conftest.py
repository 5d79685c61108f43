"""Fixtures of the model-layer tests: registries restored after each test, and the checks both
shapes stacks' semantic tests share."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from attnpatch.data import SHAPE_CLASSES
from attnpatch.models import load_classifier, registry
from attnpatch.models.shapes_eval import centre_of_mass, generate, heldout_scenes, word_maps
from attnpatch.models.shapes_sd import label_mass_ratio


@pytest.fixture(autouse=True)
def _isolated():
    """Registries restored after each test, before the root conftest's check that they were
    (the caches are the session's: tests/conftest.py; a test of the cache itself points
    $ATTNPATCH_CACHE at its own folder)."""
    saved = registry._CLASSIFIERS, registry._DIFFUSION
    registry._CLASSIFIERS, registry._DIFFUSION = dict(saved[0]), dict(saved[1])
    yield
    registry._CLASSIFIERS, registry._DIFFUSION = saved


def _bn_net(num_classes: int = 4) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, num_classes),
    )


@pytest.fixture
def bn_net():
    """``bn_net(num_classes=4)``: a small conv-BN-dropout classifier, seeded (seed 1)."""
    return _bn_net


def _quadrant_hits(parts, size: tuple[int, int]):
    """Word maps of 20 ``size`` scenes with the object centred in each quadrant in turn:
    ``(maps (20, h, w), centres of mass (20, 2), share whose centre falls in the object's
    quadrant)``. A transposed (h, w) anywhere between the processor and the maps fails it."""
    corners = torch.tensor([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]])
    centres = corners.repeat(5, 1)
    scenes = heldout_scenes(20, seed=2, size=size, centres=centres)
    maps = word_maps(parts, scenes["images"], scenes["labels"])
    com = centre_of_mass(maps)
    right = ((com > 0.5) == (centres > 0.5)).all(dim=1).float().mean()
    return maps, com, right


def _cfg_half_ratios(parts, scenes):
    """The label word's mass ratios ``(N,)`` in the conditional and the unconditional half
    under guidance 3.0: ``(cond, uncond)``."""
    kw = dict(guidance_scale=3.0)
    cond = label_mass_ratio(
        word_maps(parts, scenes["images"], scenes["labels"], **kw), scenes["masks"]
    )
    uncond = word_maps(parts, scenes["images"], scenes["labels"], half="uncond", **kw)
    return cond, label_mass_ratio(uncond, scenes["masks"])


def _recognition_rate(parts) -> float:
    """Share (in [0, 1]) of 40 generated samples (8 per class, ``parts.pipeline()``) that the
    tiny classifier recognises as the prompted shape; chance is 0.2."""
    prompts = [f"a photo of a {c}" for c in SHAPE_CLASSES for _ in range(8)]
    images = generate(parts, prompts, seed=0)
    assert images.shape == (40, 3, 32, 32)
    clf = load_classifier("tiny")
    with torch.no_grad():
        pred = clf(images).argmax(1)
    wanted = torch.arange(5).repeat_interleave(8)
    return float((pred == wanted).float().mean())


@pytest.fixture(scope="session")
def shapes_checks():
    """The measurements both shapes stacks' semantic tests make (test_shapes_semantics.py,
    test_shapes_sd3_semantics.py): ``.quadrant_hits(parts, size)``,
    ``.cfg_half_ratios(parts, scenes)``, ``.recognition_rate(parts)``."""
    return SimpleNamespace(
        quadrant_hits=_quadrant_hits,
        cfg_half_ratios=_cfg_half_ratios,
        recognition_rate=_recognition_rate,
    )
