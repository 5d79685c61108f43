"""GradientShares: weights that are shares of the update, whatever a term's raw scale."""

from __future__ import annotations

import pytest
import torch

from attnpatch.errors import InputError
from attnpatch.losses import GradientShares, LossTerms, term_gradients, update_shares

TARGETS = torch.tensor([[0.2, -0.3, 0.5, 0.1], [1.0, 0.4, -0.2, 0.3]])


def losses(x: torch.Tensor, scale_a: float = 1.0) -> dict[str, torch.Tensor]:
    """Two terms with different raw scales and overlapping gradients."""
    return {
        "a": scale_a * (x - TARGETS[0]).square().sum(),
        "b": 1e-4 * (x - TARGETS[1]).abs().pow(1.5).sum() + 1e-4 * x.sin().sum(),
    }


def train(shares, *, scale_a=1.0, steps=6, every=2, optimizer="adam", state=None, start=0):
    """``steps`` optimizer steps, two iterations each (K = 2); returns (x, GradientShares)."""
    x = torch.nn.Parameter(torch.zeros(4))
    combine = GradientShares(shares, every=every)
    opt = torch.optim.Adam([x], lr=0.05) if optimizer == "adam" else torch.optim.SGD([x], lr=0.05)
    for it in range(start, 2 * steps):
        terms = LossTerms(shares)
        for name, value in losses(x + 0.01 * it, scale_a).items():
            terms.add(name, value)
        combine.backward(terms, x)
        if it % 2 == 1:
            opt.step()
            opt.zero_grad()
    return x.detach(), combine


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("scale", [1e-3, 1e3])
def test_scaling_one_term_leaves_the_patch_unchanged(scale, optimizer):
    shares = {"a": 0.7, "b": 0.3}
    reference, _ = train(shares, optimizer=optimizer)
    scaled, _ = train(shares, scale_a=scale, optimizer=optimizer)
    assert not torch.equal(reference, torch.zeros(4))  # it moved
    torch.testing.assert_close(scaled, reference, rtol=1e-5, atol=1e-6)


def test_a_plain_weighted_sum_is_not_scale_free():
    """The property above can fail: the same loop on the raw weighted sum moves elsewhere."""
    x = [torch.nn.Parameter(torch.zeros(4)) for _ in range(2)]
    for p, scale in zip(x, (1.0, 1e-4)):
        opt = torch.optim.Adam([p], lr=0.05)
        for it in range(12):
            terms = LossTerms({"a": 0.7, "b": 0.3})
            for name, value in losses(p + 0.01 * it, scale).items():
                terms.add(name, value)
            terms.total().backward()
            if it % 2:
                opt.step()
                opt.zero_grad()
    assert (x[0] - x[1]).abs().max() > 1e-3


def test_each_term_contributes_its_share_of_the_update():
    x = torch.nn.Parameter(torch.zeros(4))
    terms = LossTerms({"a": 3.0, "b": 1.0})
    for name, value in losses(x).items():
        terms.add(name, value)
    grads = term_gradients(losses(x), x)
    measured = GradientShares({"a": 3.0, "b": 1.0}).backward(terms, x)
    assert measured == pytest.approx({"a": 0.75, "b": 0.25})
    expected = 0.75 * grads["a"] / grads["a"].norm() + 0.25 * grads["b"] / grads["b"].norm()
    torch.testing.assert_close(x.grad, expected)


def test_the_update_along_a_terms_gradient_grows_with_its_share():
    x0 = torch.zeros(4)
    along = {}
    for share in (0.1, 0.3, 0.5, 0.7, 0.9):
        x = torch.nn.Parameter(x0.clone())
        terms = LossTerms({"a": share, "b": 1 - share})
        for name, value in losses(x).items():
            terms.add(name, value)
        own = {n: g / g.norm() for n, g in term_gradients(terms, x).items()}
        terms = LossTerms({"a": share, "b": 1 - share})
        for name, value in losses(x).items():
            terms.add(name, value)
        GradientShares({"a": share, "b": 1 - share}).backward(terms, x)
        along[share] = (float(x.grad @ own["a"]), float(x.grad @ own["b"]))
    a = [v[0] for v in along.values()]
    b = [v[1] for v in along.values()]
    assert a == sorted(a) and a[0] < a[-1]  # grows with a's share
    assert b == sorted(b, reverse=True) and b[0] > b[-1]  # shrinks as b's share falls


def test_between_measurements_one_backward_uses_the_running_norms():
    x = torch.nn.Parameter(torch.zeros(4))
    combine = GradientShares({"a": 1.0, "b": 1.0}, every=3, momentum=0.5)
    seen = []
    for it in range(4):
        terms = LossTerms({"a": 1.0, "b": 1.0})
        for name, value in losses(x + 0.1 * it).items():
            terms.add(name, value)
        grads = term_gradients(
            {n: v for n, v in losses(x + 0.1 * it).items()}, x
        )  # the same values, recomputed
        x.grad = None
        measured = combine.backward(terms, x)
        seen.append(measured is not None)
        w = combine.weights()
        torch.testing.assert_close(x.grad, w["a"] * grads["a"] + w["b"] * grads["b"])
    assert seen == [True, False, False, True]
    # the running norm after the 2nd measurement: 0.5 * first + 0.5 * that iteration's norm
    assert combine.calls == 4


def test_a_term_without_gradient_takes_no_share():
    x = torch.nn.Parameter(torch.zeros(3))
    terms = LossTerms({"a": 1.0, "b": 1.0})
    terms.add("a", (x - 1).square().sum())
    terms.add("b", torch.tensor(5.0, requires_grad=True) * 2)  # does not reach x
    measured = GradientShares({"a": 1.0, "b": 1.0}).backward(terms, x)
    assert measured == {"a": 1.0, "b": 0.0}
    torch.testing.assert_close(x.grad, -torch.ones(3) / 3**0.5 * 0.5)


def test_data_parallel_reduce_sees_the_stacked_term_gradients():
    seen = []

    def reduce(stacked):
        seen.append(stacked.shape)
        return 2 * stacked  # a stand-in "mean": norms double, weights halve

    x = torch.nn.Parameter(torch.zeros(4))
    terms = LossTerms({"a": 1.0, "b": 1.0})
    for name, value in losses(x).items():
        terms.add(name, value)
    combine = GradientShares({"a": 1.0, "b": 1.0}, reduce=reduce)
    combine.backward(terms, x)
    assert seen == [torch.Size([2, 4])]
    grads = term_gradients(losses(x), x)
    torch.testing.assert_close(
        x.grad, 0.5 * sum(g / (2 * g.norm()) for g in grads.values())
    )  # local gradients combined with the global norms


def test_resume_from_state_dict_is_exact():
    shares = {"a": 0.6, "b": 0.4}
    full, _ = train(shares, steps=4, every=3)
    # the same run, stopped after 4 iterations and continued from the saved state
    x = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.Adam([x], lr=0.05)
    first = GradientShares(shares, every=3)
    for it in range(8):
        if it == 4:
            state, opt_state = first.state_dict(), opt.state_dict()
            x = torch.nn.Parameter(x.detach().clone())
            opt = torch.optim.Adam([x], lr=0.05)
            opt.load_state_dict(opt_state)
            first = GradientShares(shares, every=3)
            first.load_state_dict(state)
        terms = LossTerms(shares)
        for name, value in losses(x + 0.01 * it).items():
            terms.add(name, value)
        first.backward(terms, x)
        if it % 2 == 1:
            opt.step()
            opt.zero_grad()
    torch.testing.assert_close(x.detach(), full, rtol=0, atol=0)


def test_bad_input_is_refused():
    with pytest.raises(InputError, match="every share is 0"):
        GradientShares({"a": 0.0})
    with pytest.raises(InputError, match="every must be an int"):
        GradientShares({"a": 1.0}, every=0)
    x = torch.nn.Parameter(torch.zeros(2))
    terms = LossTerms({"a": 1.0, "c": 1.0})
    terms.add("a", x.sum())
    terms.add("c", x.sum())
    with pytest.raises(InputError, match=r"terms \['c'\] have no share"):
        GradientShares({"a": 1.0}).backward(terms, x)
    with pytest.raises(InputError, match="requires_grad=True"):
        GradientShares({"a": 1.0, "c": 1.0}).backward(terms, x.detach())
    bad = LossTerms({"a": 1.0})
    bad.add("a", (x * 0).sqrt().sum())  # a finite value (0), a NaN gradient
    with pytest.raises(InputError, match="non-finite gradient"):
        GradientShares({"a": 1.0}).backward(bad, x)


def test_term_gradients_match_autograd_and_leave_grad_alone():
    x = torch.nn.Parameter(torch.randn(4, generator=torch.Generator().manual_seed(0)))
    x.grad = torch.ones(4)
    values = losses(x)
    grads = term_gradients(values, x)
    for name, value in losses(x).items():
        (g,) = torch.autograd.grad(value, x)
        torch.testing.assert_close(grads[name], g)
    assert torch.equal(x.grad, torch.ones(4))


def test_update_shares_are_norm_fractions():
    shares = update_shares(
        {"a": torch.tensor([3.0, 4.0]), "b": torch.zeros(2), "c": -torch.ones(1)}
    )
    assert shares == pytest.approx({"a": 5 / 6, "b": 0.0, "c": 1 / 6})
    assert update_shares({"a": torch.zeros(2)}) == {"a": 0.0}


def test_with_weights_keeps_values_and_switched_off_terms():
    x = torch.tensor(2.0, requires_grad=True)
    terms = LossTerms({"a": 1.0, "b": 0.0})
    terms.add("a", x * 3)
    terms.add("b", lambda: 1 / 0)
    other = terms.with_weights({"a": 0.5, "b": 0.0})
    assert other.as_dict() == {"a": 6.0, "b": None, "total": 3.0}
    assert list(other.values()) == ["a"]
    with pytest.raises(ValueError, match="same names"):
        terms.with_weights({"a": 1.0})


def test_exact_terms_are_normalised_at_every_call():
    """An exact term gets its share of every call's update; the others keep running norms."""
    x = torch.nn.Parameter(torch.zeros(4))
    combine = GradientShares({"a": 1.0, "b": 1.0}, every=100, exact=["a"])
    first_b = None
    for it in range(3):
        scale = 10.0**it  # a's raw scale changes from call to call
        values = losses(x + 0.1 * it, scale)
        grads = term_gradients(losses(x + 0.1 * it, scale), x)
        terms = LossTerms({"a": 1.0, "b": 1.0})
        for name, value in values.items():
            terms.add(name, value)
        x.grad = None
        combine.backward(terms, x)
        if first_b is None:
            first_b = grads["b"].norm()
        expected = 0.5 * grads["a"] / grads["a"].norm() + 0.5 * grads["b"] / first_b
        torch.testing.assert_close(x.grad, expected)
    with pytest.raises(InputError, match="exact names"):
        GradientShares({"a": 1.0}, exact=["z"])
