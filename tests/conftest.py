"""Shared fixtures: tiny, offline models (built once per test session)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

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
