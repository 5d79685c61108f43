"""attnpatch.losses.terms: the weighted-sum container."""

from __future__ import annotations

import doctest
import math

import pytest
import torch

import attnpatch.losses
from attnpatch.errors import InputError
from attnpatch.losses import terms as terms_mod
from attnpatch.losses.terms import LossTerms

WEIGHTS = {"classifier": 1.0, "cross_attention": 10000.0, "self_attention": 100.0, "l2": 0.0}


def test_docstring_examples_run():
    result = doctest.testmod(terms_mod, extraglobs={"torch": torch})
    assert result.attempted > 0 and result.failed == 0
    # The package docstring's example is a LossTerms loop too.
    result = doctest.testmod(attnpatch.losses, extraglobs={"torch": torch})
    assert result.attempted > 0 and result.failed == 0


def _boom():
    raise AssertionError("a term with weight 0 must not be computed")


def test_loop_usage_weighted_sum_and_log():
    x = torch.tensor([0.5, 2.0], requires_grad=True)
    terms = LossTerms(WEIGHTS)
    terms.add("classifier", lambda: x.sum())  # 2.5
    if terms.wants("cross_attention", "self_attention"):
        terms.add("cross_attention", x.prod() * 1e-4)  # 1e-4
        terms.add("self_attention", lambda: (x**2).mean())  # 2.125
    assert terms.add("l2", _boom) is None
    total = terms.total()
    expected = 1.0 * 2.5 + 10000.0 * 1e-4 + 100.0 * 2.125
    assert total.item() == pytest.approx(expected)
    total.backward()
    # d/dx: 1 + 10000 * 1e-4 * prod/x_i + 100 * 2 x_i / 2
    by_hand = [1 + 1.0 * 2.0 + 100 * 0.5, 1 + 1.0 * 0.5 + 100 * 2.0]
    torch.testing.assert_close(x.grad, torch.tensor(by_hand))

    log = terms.as_dict()
    assert list(log) == ["classifier", "cross_attention", "self_attention", "l2", "total"]
    assert log["classifier"] == pytest.approx(2.5)
    assert log["cross_attention"] == pytest.approx(1e-4)
    assert log["l2"] is None
    assert log["total"] == pytest.approx(expected)
    weighted = terms.as_dict(weighted=True)
    assert weighted["cross_attention"] == pytest.approx(1.0)
    assert weighted["self_attention"] == pytest.approx(212.5)
    assert weighted["total"] == pytest.approx(expected)
    assert not any(isinstance(v, float) and math.isnan(v) for v in log.values())


def test_zero_weight_skips_nan_terms():
    terms = LossTerms({"a": 1.0, "b": 0.0})
    terms.add("a", torch.tensor(3.0, requires_grad=True))
    terms.add("b", torch.tensor(float("nan")))  # a tensor: stored nowhere, not summed
    assert terms.total().item() == 3.0
    assert terms.as_dict() == {"a": 3.0, "b": None, "total": 3.0}
    assert "b" not in terms and "a" in terms


def test_wants():
    terms = LossTerms(WEIGHTS)
    assert terms.wants("classifier")
    assert not terms.wants("l2")
    assert terms.wants("l2", "self_attention")
    with pytest.raises(InputError, match="unknown loss term 'cross_atention'"):
        terms.wants("cross_atention")
    with pytest.raises(InputError, match="at least one"):
        terms.wants()


def test_unknown_name_raises_unless_registered_with_weight():
    terms = LossTerms({"classifier": 1.0})
    with pytest.raises(InputError, match=r"unknown loss term 'clasifier'.*weight=w"):
        terms.add("clasifier", torch.tensor(1.0))
    terms.add("tv", torch.tensor(2.0), weight=0.5)
    terms.add("classifier", torch.tensor(1.0))
    assert terms.weights == {"classifier": 1.0, "tv": 0.5}
    assert terms.total().item() == 2.0
    with pytest.raises(InputError, match="already has weight 1"):
        terms.add("classifier", torch.tensor(1.0), weight=2.0)


def test_add_twice_raises_and_clear_resets():
    terms = LossTerms({"a": 1.0, "z": 0.0})
    terms.add("a", torch.tensor(1.0))
    terms.add("z", torch.tensor(1.0))
    with pytest.raises(InputError, match="already added.*clear"):
        terms.add("a", torch.tensor(2.0))
    with pytest.raises(InputError, match="already added"):
        terms.add("z", torch.tensor(2.0))
    assert terms.clear() is terms
    assert terms.as_dict() == {"a": None, "z": None, "total": None}
    terms.add("a", torch.tensor(2.0))
    assert terms.total().item() == 2.0


def test_total_errors():
    with pytest.raises(InputError, match="no loss term was added"):
        LossTerms({"a": 1.0}).total()
    only_zero = LossTerms({"a": 1.0, "b": 0.0})
    only_zero.add("b", _boom)
    with pytest.raises(InputError, match="every term added has weight 0"):
        only_zero.total()
    missing = LossTerms({"a": 1.0, "b": 2.0})
    missing.add("a", torch.tensor(1.0))
    with pytest.raises(InputError, match=r"\['b'\] have non-zero weights but were never added"):
        missing.total()
    assert missing.total(allow_missing=True).item() == 1.0
    assert missing.as_dict()["b"] is None


def test_non_finite_term_is_named_before_backward():
    terms = LossTerms({"a": 1.0, "b": 1.0})
    terms.add("a", torch.tensor(1.0))
    terms.add("b", torch.tensor(float("inf")))
    with pytest.raises(InputError, match=r"non-finite loss terms \{'b': inf\}"):
        terms.total()
    assert math.isinf(terms.total(check_finite=False).item())


@pytest.mark.parametrize(
    "weights, match",
    [
        ({"a": -1.0}, "finite and >= 0"),
        ({"a": float("nan")}, "finite and >= 0"),
        ({"a": True}, "must be a number"),
        ({"a": "1"}, "must be a number"),
        ({"total": 1.0}, "reserved"),
        ({"": 1.0}, "non-empty strings"),
        ([("a", 1.0)], "must be a dict"),
    ],
)
def test_bad_weights(weights, match):
    with pytest.raises(InputError, match=match):
        LossTerms(weights)


@pytest.mark.parametrize(
    "value, match",
    [
        (torch.ones(3), r"must be a scalar, got shape \(3,\).*reduction='mean'"),
        (1.5, "must be a tensor"),
        (lambda: 2.0, "must be a tensor"),
        (torch.tensor(1), "floating point"),
    ],
)
def test_bad_values(value, match):
    with pytest.raises(InputError, match=match):
        LossTerms({"a": 1.0}).add("a", value)


def test_one_element_tensor_and_str():
    terms = LossTerms({"classifier": 10.0, "tv": 0.0})
    terms.add("classifier", torch.tensor([0.25]))
    assert terms.total().shape == ()
    line = str(terms)
    assert line.startswith("total=2.5 |")
    assert "classifier=0.25 (x10)" in line and "tv=-" in line
