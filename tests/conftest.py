"""Shared fixtures: tiny, offline models (built once per test session)."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The tiny classifier is trained once and cached; tests share one cache outside $HOME.
os.environ.setdefault(
    "ATTNPATCH_CACHE", os.path.join(tempfile.gettempdir(), "attnpatch-test-cache")
)
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


@pytest.fixture(scope="session")
def sd3():
    """The tiny SD3.5-shaped stack (its pipeline steps ``sd3.scheduler``: copy it to compare)."""
    from attnpatch.testing import tiny_sd3

    return tiny_sd3()


@pytest.fixture(scope="session")
def flux():
    """The tiny Flux-dev-shaped stack (guidance embedding on)."""
    from attnpatch.testing import tiny_flux

    return tiny_flux()
