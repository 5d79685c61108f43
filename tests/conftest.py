"""Shared fixtures: tiny, offline models (built once per test session), and a test that does not
depend on where it runs (``_isolated_environment``: its own cwd, HOME and caches)."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
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
def sd3():
    """The tiny SD3.5-shaped stack (its pipeline steps ``sd3.scheduler``: copy it to compare)."""
    from attnpatch.testing import tiny_sd3

    return tiny_sd3()


@pytest.fixture(scope="session")
def flux():
    """The tiny Flux-dev-shaped stack (guidance embedding on)."""
    from attnpatch.testing import tiny_flux

    return tiny_flux()


@contextlib.contextmanager
def _raises(error: type[BaseException], *words: str) -> Iterator[pytest.ExceptionInfo]:
    """``pytest.raises(error)``, then each of ``words`` in its message (case-insensitive): the
    type says what to fix, the words name the field or file; the wording may change."""
    with pytest.raises(error) as info:
        yield info
    message = str(info.value).lower()
    missing = [w for w in words if w.lower() not in message]
    assert not missing, f"{missing} not in {str(info.value)!r}"


@pytest.fixture
def raises():
    """``with raises(ConfigError, "train.lr", "> 0"): ...`` (see ``_raises``)."""
    return _raises


@pytest.fixture
def registries():
    """Restore attnpatch's model registries after a test that registers names."""
    from attnpatch.models import registry

    saved = dict(registry._CLASSIFIERS), dict(registry._DIFFUSION)
    yield
    registry._CLASSIFIERS.clear()
    registry._CLASSIFIERS.update(saved[0])
    registry._DIFFUSION.clear()
    registry._DIFFUSION.update(saved[1])


@pytest.fixture(autouse=True)
def _registries_left_as_found(request):
    """Every test leaves the model registries as it found them (a test that registers names
    uses the ``registries`` fixture, which restores them)."""
    from attnpatch.models import registry

    before = set(registry._CLASSIFIERS), set(registry._DIFFUSION)
    yield
    if "registries" in request.fixturenames:
        return  # restored by that fixture's teardown, which runs after this check
    after = set(registry._CLASSIFIERS), set(registry._DIFFUSION)
    left = sorted((after[0] - before[0]) | (after[1] - before[1]))
    assert after == before, f"the test left {left} in the registries; use `registries`"


# -- tiny diffusion transformers (random weights, built from the diffusers classes) -----------
def _tiny_sd3(dual: bool = False):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=12,
        out_channels=4,
        pos_embed_max_size=16,
        dual_attention_layers=(0, 1) if dual else (),
        qk_norm="rms_norm" if dual else None,
    ).eval()


def _tiny_flux(dev: bool = False):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels, packed 2x2
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=12,
        guidance_embeds=dev,
        axes_dims_rope=(2, 2, 4),
    ).eval()


@pytest.fixture(scope="session")
def dit_builders():
    """Builders of fresh tiny DiTs: ``{"sd3", "sd35", "flux", "flux-dev"}`` -> ``() -> model``
    (SD3: 3 joint blocks; SD3.5: dual attention in blocks 0 and 1, RMS qk-norm; Flux: 2 double-
    and 2 single-stream blocks, 4 latent channels; Flux-dev: with the guidance embedding)."""
    return {
        "sd3": _tiny_sd3,
        "sd35": lambda: _tiny_sd3(dual=True),
        "flux": _tiny_flux,
        "flux-dev": lambda: _tiny_flux(dev=True),
    }


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
