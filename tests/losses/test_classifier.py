"""attnpatch.losses.classifier: cross-entropy and Carlini-Wagner losses, (un)targeted."""

from __future__ import annotations

import doctest
import math

import pytest
import torch

from attnpatch.errors import InputError
from attnpatch.losses import classifier as classifier_mod
from attnpatch.losses.classifier import ClassifierLoss, classifier_loss
from attnpatch.testing import tiny_classifier

LOGITS = [[2.0, 0.5, -1.0], [0.0, 3.0, 1.0]]


def _log_softmax(row: list[float], k: int) -> float:
    return row[k] - math.log(sum(math.exp(v) for v in row))


def test_docstring_examples_run():
    result = doctest.testmod(classifier_mod, extraglobs={"torch": torch})
    assert result.attempted > 0 and result.failed == 0


def test_ce_by_hand():
    logits, labels = torch.tensor(LOGITS), [0, 2]
    untargeted = [_log_softmax(r, k) for r, k in zip(LOGITS, labels)]  # -CE = log p_y
    got = classifier_loss(logits, labels, reduction="none")
    torch.testing.assert_close(got, torch.tensor(untargeted))
    got_t = classifier_loss(logits, torch.tensor(labels), targeted=True, reduction="none")
    torch.testing.assert_close(got_t, -torch.tensor(untargeted))
    assert classifier_loss(logits, labels).item() == pytest.approx(sum(untargeted) / 2, abs=1e-6)
    assert classifier_loss(logits, labels, reduction="sum").item() == pytest.approx(
        sum(untargeted), abs=1e-6
    )


def test_cw_by_hand():
    logits = torch.tensor(LOGITS)
    # untargeted: max(z_y - max_{j != y} z_j, -kappa); image 0 label 0: 2 - 0.5; image 1
    # label 2: 1 - 3 = -2, clamped at -kappa = 0 (the default) ...
    got = classifier_loss(logits, [0, 2], kind="cw", reduction="none")
    assert got.tolist() == [1.5, 0.0]
    # ... or at -0.5 for kappa = 0.5
    got = classifier_loss(logits, [0, 2], kind="cw", kappa=0.5, reduction="none")
    assert got.tolist() == [1.5, -0.5]
    # targeted: max_{j != t} z_j - z_t; image 0 target 1: 2 - 0.5; image 1 target 1: 1 - 3
    got = classifier_loss(logits, [1, 1], targeted=True, kind="cw", kappa=1.0, reduction="none")
    assert got.tolist() == [1.5, -1.0]


def test_labels_forms_agree():
    logits = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    ref = classifier_loss(logits, torch.tensor([4, 4, 4]))
    for labels in (4, [4, 4, 4], (4, 4, 4), torch.tensor(4)):
        torch.testing.assert_close(classifier_loss(logits, labels), ref)


def test_module_matches_function():
    logits = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 3])
    mod = ClassifierLoss(targeted=True, kind="cw", kappa=2.0, reduction="none")
    torch.testing.assert_close(
        mod(logits, labels),
        classifier_loss(logits, labels, targeted=True, kind="cw", kappa=2.0, reduction="none"),
    )
    assert "kappa=2.0" in repr(mod)


@pytest.mark.parametrize("targeted", [False, True])
@pytest.mark.parametrize("kind, kappa", [("ce", 0.0), ("cw", 0.0), ("cw", 10.0)])
def test_gradcheck(kind, kappa, targeted):
    # Distinct logits (no ties for the max), margins inside the clamp for kappa = 10.
    logits = torch.tensor(
        [[0.3, -1.2, 2.1, 0.7], [1.5, 0.2, -0.4, 0.9]], dtype=torch.float64, requires_grad=True
    )
    labels = torch.tensor([2, 3])

    def fn(z):
        return classifier_loss(z, labels, targeted=targeted, kind=kind, kappa=kappa)

    assert torch.autograd.gradcheck(fn, (logits,))


def test_cw_gradient_zero_beyond_margin():
    logits = torch.tensor([[5.0, 0.0, 0.0]], requires_grad=True)
    classifier_loss(logits, 1, kind="cw", kappa=1.0).backward()  # 0 - 5 < -1: clamped
    assert torch.count_nonzero(logits.grad) == 0


@pytest.mark.parametrize("kind, kappa", [("ce", 0.0), ("cw", 0.0), ("cw", 3.0)])
def test_one_step_moves_argmax_on_linear_model(kind, kappa):
    """One gradient step on the input of a linear classifier moves the prediction as intended."""
    g = torch.Generator().manual_seed(2)
    model = torch.nn.Linear(8, 5).requires_grad_(False)
    with torch.no_grad():
        model.weight.copy_(torch.randn(5, 8, generator=g))
        model.bias.zero_()
    x0 = torch.randn(1, 8, generator=g)
    y = int(model(x0).argmax())
    target = int(model(x0).argmin())
    for targeted, label in ((False, y), (True, target)):
        x = x0.clone().requires_grad_(True)
        loss = classifier_loss(model(x), [label], targeted=targeted, kind=kind, kappa=kappa)
        loss.backward()
        assert model.weight.grad is None and model.bias.grad is None  # frozen
        step = x.grad / x.grad.norm()
        with torch.no_grad():
            logits = model(x - 3.0 * step)[0]
            before = model(x0)[0]
        if targeted:
            assert int(logits.argmax()) == target
            assert logits[target] - logits.max() > before[target] - before.max()
        else:
            assert int(logits.argmax()) != y
            others = torch.cat([logits[:y], logits[y + 1 :]])
            assert logits[y] - others.max() < before[y] - before[torch.arange(5) != y].max()


def test_gradient_reaches_image_not_frozen_classifier():
    model = tiny_classifier(num_classes=4)
    model.requires_grad_(False)
    images = torch.rand(2, 3, 16, 16, requires_grad=True)
    classifier_loss(model(images), [1, 2], kind="cw").backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    "logits, labels, kwargs, match",
    [
        (torch.randn(5), 1, {}, "unsqueeze"),
        (torch.randn(2, 1), [0, 0], {}, "at least 2 classes"),
        (torch.randn(2, 3), [0, 3], {}, "label 3 is out of range for 3 classes"),
        (torch.randn(2, 3), [-1, 0], {}, "label -1 is out of range"),
        (torch.randn(2, 3), torch.eye(3)[:2], {}, "argmax"),
        (torch.randn(2, 3), [0, 1, 2], {}, r"shape \(B,\)"),
        (torch.randn(2, 3), True, {}, "bool"),
        (torch.randn(2, 3).long(), [0, 1], {}, "floating point"),
        (torch.randn(2, 3), [0, 1], {"kappa": 1.0}, "only applies to kind='cw'"),
        (torch.randn(2, 3), [0, 1], {"kind": "cw", "kappa": -1.0}, ">= 0"),
        (torch.randn(2, 3), [0, 1], {"kind": "hinge"}, "kind must be"),
        (torch.randn(2, 3), [0, 1], {"reduction": "batchmean"}, "reduction"),
    ],
)
def test_errors(logits, labels, kwargs, match):
    with pytest.raises(InputError, match=match):
        classifier_loss(logits, labels, **kwargs)


def test_module_validates_options_early():
    with pytest.raises(InputError, match="kind must be"):
        ClassifierLoss(kind="nll")
