"""Tests for attnpatch.models.classifier: the wrapper, the probe, weights files, the errors of a
missing or broken torchvision / timm (the real libraries: tests/models/test_vision.py)."""

from __future__ import annotations

import doctest
import sys
import types

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import attnpatch.models.classifier as classifier_mod
from attnpatch.errors import ImageLayoutError, ImageRangeError, InputError, ModelError
from attnpatch.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    NormalizedClassifier,
    load_classifier,
    probe_classifier,
    register_classifier,
)


def test_doctests():
    result = doctest.testmod(classifier_mod)
    assert result.attempted > 0 and result.failed == 0


# --------------------------------------------------------------------------- the wrapper


def test_wrapper_matches_manual_normalisation(bn_net):
    net = bn_net()
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.125)
    clf = NormalizedClassifier(net, mean, std)
    x = torch.rand(3, 3, 8, 8)
    manual = x.clone()
    for c in range(3):
        manual[:, c] = (x[:, c] - mean[c]) / std[c]
    net.eval()
    torch.testing.assert_close(clf(x), net(manual))
    assert clf.normalize(x).shape == x.shape
    identity = NormalizedClassifier(net)
    torch.testing.assert_close(identity(x), net(x))


def test_wrapper_frozen_stays_eval_and_keeps_batchnorm_stats(bn_net):
    net = bn_net()
    clf = load_classifier(net, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    assert all(not p.requires_grad for p in clf.parameters())
    bn = net[1]
    stats = [t.clone() for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)]

    parent = nn.ModuleDict({"clf": clf, "other": nn.BatchNorm2d(3)})
    parent.train()  # a parent's train() must not reach the classifier
    assert parent["other"].training and not clf.training and not net.training
    clf.train(True)
    assert not any(m.training for m in clf.modules())
    net.train()  # directly on the bare model: forward puts it back
    x = torch.rand(4, 3, 8, 8, requires_grad=True)
    out = clf(x)
    assert not net.training
    out2 = clf(x)
    torch.testing.assert_close(out, out2)  # no dropout, no batch statistics
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # gradient reaches the images
    assert all(p.grad is None for p in clf.parameters())  # frozen weights get none
    for before, after in zip(stats, (bn.running_mean, bn.running_var, bn.num_batches_tracked)):
        assert torch.equal(before, after)


def test_wrapper_validates_inputs(bn_net):
    clf = load_classifier(bn_net(), mean=IMAGENET_MEAN, std=IMAGENET_STD)
    with pytest.raises(ImageRangeError, match=r"\[-1, 1\] diffusion input"):
        clf(torch.rand(1, 3, 8, 8) * 2 - 1)
    with pytest.raises(ImageLayoutError, match="channels-last"):
        clf(torch.rand(1, 8, 8, 3))
    clf.validate = False
    clf(torch.rand(1, 3, 8, 8) * 2 - 1)  # allowed when switched off
    with pytest.raises(InputError, match="both mean and std"):
        NormalizedClassifier(bn_net(), mean=IMAGENET_MEAN)
    with pytest.raises(InputError, match="3 values"):
        NormalizedClassifier(bn_net(), mean=(0.5, 0.5), std=(1, 1))
    with pytest.raises(InputError, match="positive"):
        NormalizedClassifier(bn_net(), mean=(0.5,) * 3, std=(1, 0, 1))


class _Returns(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


@pytest.mark.parametrize(
    "fn,match",
    [
        (lambda x: x, r"shape \(2, 3, 32, 32\)"),  # a feature map, not logits
        (lambda x: x.mean((1, 2, 3)), r"shape \(2,\)"),
        (lambda x: (x.flatten(1)[:, :3],), "returned tuple"),
        (lambda x: types.SimpleNamespace(logits=x.flatten(1)), r"\.logits"),
        (lambda x: x.flatten(1)[:1, :3], r"shape \(1, 3\)"),
        (lambda x: x.flatten(1)[:, :1], "at least 2 classes"),
        (lambda x: x.view(7, -1), "failed on a probe batch"),
    ],
)
def test_probe_rejects_non_logits(fn, match):
    with pytest.raises(ModelError, match=match):
        load_classifier(_Returns(fn))


def test_rewrap_overrides_normalisation_and_dtype(bn_net):
    clf = load_classifier(bn_net(), mean=(0.5,) * 3, std=(0.5,) * 3)
    again = load_classifier(clf, mean=(0.0,) * 3, std=(1.0,) * 3, dtype=torch.float64)
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    out = again(x)
    assert out.dtype == torch.float64 and again.mean.dtype == torch.float64
    torch.testing.assert_close(out, again.model(x))
    assert load_classifier(again) is again


def test_probe_checks_class_names_and_records_num_classes(bn_net):
    clf = load_classifier(bn_net(5), classes=list("abcde"))
    assert clf.num_classes == 5 and clf.classes == list("abcde")
    with pytest.raises(ModelError, match="5 logits per image but 3 class names"):
        load_classifier(bn_net(5), classes=["a", "b", "c"])


# --------------------------------------------------------------------------- weights files


def test_local_weights_files(tmp_path, bn_net):
    source = bn_net(3)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)
    register_classifier("w", lambda: bn_net(3))
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}},
        tmp_path / "w.pt",
    )
    x = torch.rand(2, 3, 8, 8)
    source.eval()
    for name in ("w.safetensors", "w.pt"):
        clf = load_classifier("w", weights=tmp_path / name)
        torch.testing.assert_close(clf(x), source(x))
    torch.save(bn_net(5).state_dict(), tmp_path / "other.pt")
    with pytest.raises(ModelError, match="do not fit the model"):
        load_classifier("w", weights=tmp_path / "other.pt")
    with pytest.raises(ModelError, match="not found"):
        load_classifier("w", weights=tmp_path / "missing.pt")


# --------------------------------------------------------------------------- torchvision / timm


@pytest.mark.parametrize("module", ["torchvision", "timm"])
def test_missing_extra_gives_install_hint(module, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(ModelError, match=rf"{module} is not installed.*attnpatch\[vision\]"):
        load_classifier(f"{module}:resnet18")


def test_a_torchvision_that_does_not_load_beside_this_torch(monkeypatch, tmp_path):
    """torchvision built for another torch fails at import with a RuntimeError about its ops
    (torch 2.13's CPU wheel + torchvision 0.28); the error names the matching-pair fix."""
    broken = tmp_path / "torchvision"
    broken.mkdir()
    (broken / "__init__.py").write_text(
        "raise RuntimeError('operator torchvision::nms does not exist')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    with pytest.raises(
        ModelError,
        match=r"torchvision is installed but does not import beside torch .*"
        r"torchvision::nms.*matching pair.*attnpatch\[vision\]",
    ):
        load_classifier("torchvision:resnet50")


# --------------------------------------------------------------------------- probe_classifier


def test_probe_classifier_returns_width_on_the_models_device_and_dtype(bn_net):
    seen = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = bn_net(3).double().eval()

        def forward(self, x):
            seen.append((tuple(x.shape), x.dtype, torch.is_grad_enabled(), float(x.min())))
            return self.net(x)

    assert probe_classifier(Spy(), 12) == 3
    assert seen == [((2, 3, 12, 12), torch.float64, False, 0.5)]
    assert probe_classifier(Spy(), (10, 6)) == 3 and seen[-1][0] == (2, 3, 10, 6)
    # No parameters or buffers at all: a CPU float32 batch.
    assert probe_classifier(nn.Sequential(nn.Flatten(), nn.Identity()), (1, 1)) == 3


def test_probe_classifier_errors_name_the_model_and_the_fix(bn_net):
    with pytest.raises(ModelError, match=r"classifier 'resnet' .*shape \(2, 3, 8, 8\)"):
        probe_classifier(_Returns(lambda x: x), 8, name="resnet")
    with pytest.raises(ModelError, match=r"classifier '_Returns' returned tuple"):
        probe_classifier(_Returns(lambda x: (x,)), 8)
    with pytest.raises(ModelError, match="4 logits per image but 2 class names"):
        probe_classifier(bn_net(4), 8, classes=["a", "b"])
    with pytest.raises(InputError, match="input_size must be a positive int"):
        probe_classifier(bn_net(4), 0)
