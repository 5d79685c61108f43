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
# The low mode on the CPU fixes glibc's mmap threshold for the whole process
# (attnpatch.diffusion._memory.return_freed_memory): in a test worker, thousands of small
# tensors would then pay page faults for the rest of the session. Its own tests run it in
# child processes without this variable.
os.environ["ATTNPATCH_MALLOC"] = "0"
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


# --------------------------------------------------------------------------- scheduling
# `pytest -n 2` (pytest-xdist's "load") deals tests out one by one, alternating workers, so a
# module-scoped fixture (a reference run, three training processes) was built in both
# workers. Here: the tests of a module with a module-scoped fixture of its own go to one
# worker as a group ("loadgroup"), and the slow tests (real processes) are dealt first, so
# that the many quick ones fill in around them instead of queueing behind them at the end.


def pytest_configure(config):
    if getattr(config.option, "dist", "no") == "load":
        config.option.dist = "loadgroup"
        config.option.loadscopereorder = False  # keep the order below


def _has_module_fixture(item) -> bool:
    module = item.nodeid.split("::")[0]
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return False
    for defs in info.name2fixturedefs.values():
        for d in defs:
            if d.scope == "module" and getattr(d, "baseid", "") == module:
                return True
    return False


@pytest.hookimpl(tryfirst=True)  # before xdist's worker reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        if _has_module_fixture(item):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable
