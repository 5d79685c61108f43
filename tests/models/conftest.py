"""Fixtures of the model-layer tests: registries restored after each test."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attnpatch.models import registry


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
