"""Shared fixtures: tiny, offline models (built once per test session), and a test that does not
depend on where it runs (``_isolated_environment``: its own cwd, HOME and caches)."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

# Nothing in the suite may reach the hub: huggingface_hub, transformers and diffusers read these
# when first imported (the fixture below also sets them per test).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# matplotlib builds its font cache once per session, here, not in ~/.cache/matplotlib.
os.environ["MPLCONFIGDIR"] = tempfile.mkdtemp(prefix="attnpatch-tests-mpl-")
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
def session_cache(tmp_path_factory) -> Path:
    """The attnpatch cache every test shares (``$ATTNPATCH_CACHE``): the tiny classifiers are
    trained into it once per session (the workers of ``-n 2`` share it: writes are atomic),
    never into ``~/.cache/attnpatch``."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    path = root / "attnpatch-cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(autouse=True)
def _isolated_environment(tmp_path_factory, monkeypatch, session_cache):
    """Every test runs in a fresh temporary folder (its cwd) with a temporary HOME, XDG cache,
    HF_HOME, TORCH_HOME, and the session's attnpatch cache, the hub offline: what a test or the
    CLI it runs writes lands there, and nothing of the user's (``runs/``, ``~/.cache``) is read.
    """
    cwd = tmp_path_factory.mktemp("cwd")
    home = tmp_path_factory.mktemp("home")
    cache = home / ".cache"
    env = {
        "HOME": home,
        "XDG_CACHE_HOME": cache,
        "HF_HOME": cache / "huggingface",
        "HF_HUB_CACHE": cache / "huggingface" / "hub",
        "TORCH_HOME": cache / "torch",
        "ATTNPATCH_CACHE": session_cache,
    }
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:  # it read the environment when imported: point it here too
        monkeypatch.setattr(constants, "HF_HOME", str(env["HF_HOME"]))
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(env["HF_HUB_CACHE"]))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(cwd)
