"""Shared fixtures: tiny, offline models (built once per test session)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# pytest -n 2 runs two workers on two cores: one thread each avoids oversubscription.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def sd15():
    from attnpatch.testing import tiny_sd

    return tiny_sd("sd15")


@pytest.fixture(scope="session")
def sd2():
    from attnpatch.testing import tiny_sd

    return tiny_sd("sd2")


@pytest.fixture(scope="session")
def sdxl():
    from attnpatch.testing import tiny_sd

    return tiny_sd("sdxl")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
