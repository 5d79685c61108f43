"""The config fields of the memory modes and half precision: attention.memory, models.dtype."""

from __future__ import annotations

import warnings

import pytest
import torch

import attnpatch as ap
from attnpatch.errors import ConfigError
from attnpatch.training import load_config
from attnpatch.training.trainer import attention_pipeline


@pytest.fixture(scope="module")
def parts():
    return ap.load_diffusion("tiny")


def test_defaults():
    cfg = load_config(None)
    assert cfg.attention.memory == "auto" and cfg.attention.checkpoint is False
    assert cfg.models.dtype == "float32"


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({}, "fast"),  # auto on the CPU
        ({"attention.memory": "low"}, "low"),
        ({"attention.memory": "fast"}, "fast"),
        ({"attention.checkpoint": True}, "balanced"),  # the older switch still works
        ({"attention.checkpoint": True, "attention.memory": "low"}, "low"),
    ],
)
def test_memory_reaches_the_pipeline(parts, overrides, expected):
    legacy = overrides.get("attention.checkpoint", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = load_config(None, overrides)
        assert attention_pipeline(cfg, parts).memory == expected
    # the older switch warns once, at the config (the pipeline gets memory= alone)
    assert [str(w.message) for w in caught if w.category is FutureWarning] == (
        ["attention.checkpoint: true is deprecated and will be removed in attnpatch 0.3.0; "
         "use attention.memory: balanced"] if legacy else []
    )  # fmt: skip


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"attention.memory": "tiny"}, "attention.memory must be"),
        ({"attention.checkpoint": True, "attention.memory": "fast"}, "attention.checkpoint"),
        ({"models.dtype": "float64"}, "models.dtype must be"),
    ],
)
@pytest.mark.filterwarnings("ignore:attention.checkpoint:FutureWarning")
def test_bad_values_are_refused(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, overrides)


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
def test_dtype_loads_the_stack_in_it(name):
    cfg = load_config(None, {"models.dtype": name, "models.diffusion": "tiny"})
    parts = ap.load_diffusion(cfg.models.diffusion, torch_dtype=cfg.models.dtype)
    dtype = getattr(torch, name)
    assert parts.unet.dtype == dtype and parts.text_encoder.dtype == dtype
    assert parts.vae.dtype == (torch.float32 if name == "float16" else dtype)
