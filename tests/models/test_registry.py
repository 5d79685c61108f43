"""Tests for attnpatch.models.registry: names -> factories, errors for unknown names."""

from __future__ import annotations

import doctest

import pytest
import torch

from attnpatch.errors import InputError, ModelError
from attnpatch.models import (
    classifier_names,
    diffusion_names,
    load_classifier,
    load_diffusion,
    register_classifier,
    register_diffusion,
)
from attnpatch.models import registry as registry_mod


def test_doctests(registries):
    result = doctest.testmod(registry_mod)
    assert result.attempted > 0 and result.failed == 0
    assert "linear-demo" in classifier_names()  # the doctest's registration (undone after)


def test_built_in_names():
    assert "tiny" in classifier_names()
    assert diffusion_names() == [
        "shapes",
        "shapes-sd3",
        "tiny",
        "tiny-flux",
        "tiny-sd15",
        "tiny-sd2",
        "tiny-sd3",
        "tiny-sdxl",
    ]


# --------------------------------------------------------------------------- registration


def test_register_and_load_with_kwargs_and_normalisation(bn_net):
    calls = []

    def factory(num_classes=3):
        calls.append(num_classes)
        return bn_net(num_classes)

    register_classifier("mine", factory, mean=(0.5,) * 3, std=(0.25,) * 3, input_size=16)
    clf = load_classifier("mine", num_classes=6)
    assert calls == [6] and clf.num_classes == 6 and clf.input_size == (16, 16)
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(clf(x), clf.model((x - 0.5) / 0.25))
    assert "mine" in classifier_names()

    # Overriding mean/std at load time re-wraps the same model.
    clf2 = load_classifier("mine", mean=(0.0,) * 3, std=(1.0,) * 3)
    torch.testing.assert_close(clf2(x), clf2.model(x))

    @register_classifier("decorated", overwrite=True)
    def decorated():
        return bn_net(2)

    assert load_classifier("decorated").num_classes == 2


def test_registry_errors(bn_net):
    register_classifier("dup", lambda: bn_net())
    with pytest.raises(InputError, match="already registered.*overwrite=True"):
        register_classifier("dup", lambda: bn_net())
    register_classifier("dup", lambda: bn_net(7), overwrite=True)
    assert load_classifier("dup").num_classes == 7
    with pytest.raises(InputError, match="without ':'"):
        register_classifier("torchvision:x", lambda: bn_net())
    with pytest.raises(ModelError, match=r"unknown classifier 'tinny'.*'tiny'.*Registered"):
        load_classifier("tinny")
    register_classifier("not-a-module", lambda: "oops")
    with pytest.raises(ModelError, match="returned str, not an nn.Module"):
        load_classifier("not-a-module")
    with pytest.raises(InputError, match="must be a name"):
        load_classifier(42)
    with pytest.raises(ModelError, match="unknown diffusion stack 'tiny-sd4'.*tiny-sd3"):
        load_diffusion("tiny-sd4")
    with pytest.raises(ModelError, match="hf download stabilityai/stable-diffusion-2-1-base"):
        load_diffusion("stabilityai/stable-diffusion-2-1-base")  # offline, not in the tmp cache


def test_registered_diffusion_factory_gets_kwargs_and_name_checks(sd15):
    calls = []

    def factory(seed=0):
        calls.append(seed)
        return sd15

    register_diffusion("kw", factory)
    assert load_diffusion("kw", seed=5).unet is sd15.unet and calls == [5]
    with pytest.raises(InputError, match="without ':'"):
        register_diffusion("a:b", factory)
    with pytest.raises(InputError, match="must be callable"):
        register_diffusion("nope", 3)
