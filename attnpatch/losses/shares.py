"""Scale-free term weights: a weight is a share of the update, whatever the term's raw scale.

A weighted sum ``sum_i w_i L_i`` lets whichever gradient is largest decide the update: the
label-map variance (~3e-3) and the self-attention MSE (~6e-5) next to a classifier ``-CE`` of
0 to -22 need weights six orders of magnitude apart, retuned for every model and resolution
(docs/losses.md, "Weights that mean a share"). :class:`GradientShares` combines the terms'
gradients instead:

``grad += sum_i  s_i / S * g_i / n_i``,   ``g_i = dL_i/dθ``,   ``S = sum_j s_j``

where ``n_i`` is a running mean of ``||g_i||`` (measured with one backward per term every
``every``-th iteration; the other iterations run one backward of ``sum_i (s_i / S / n_i) L_i``).
Multiplying a term by any constant multiplies ``g_i`` and ``n_i`` alike, so the update does not
change; a term's share ``s_i / S`` is the fraction of the update's length it contributes on
average. :func:`update_shares` measures that fraction for any combination, so a term that is
logged but does not steer shows as a share near 0.

>>> import torch
>>> x = torch.tensor([1.0, 1.0], requires_grad=True)
>>> shares = GradientShares({"a": 1.0, "b": 1.0})
>>> terms = LossTerms({"a": 1.0, "b": 1.0})
>>> _ = terms.add("a", lambda: 1000 * x[0] ** 2)          # raw scales 1e6 apart
>>> _ = terms.add("b", lambda: 0.001 * x[1] ** 2)
>>> measured = shares.backward(terms, x)
>>> [round(v, 3) for v in x.grad.tolist()], measured
([0.5, 0.5], {'a': 0.5, 'b': 0.5})
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch

from ..errors import InputError
from .terms import LossTerms

__all__ = ["GradientShares", "term_gradients", "update_shares"]

#: The data-parallel mean of stacked per-term gradients ``(T, *param.shape)`` (identity alone).
Reduce = Callable[[torch.Tensor], torch.Tensor]


def _check_param(param: object) -> torch.Tensor:
    if not isinstance(param, torch.Tensor) or not param.requires_grad:
        raise InputError(
            "param must be the tensor being optimised, with requires_grad=True (e.g. "
            f"patch.pixels), got {type(param).__name__}"
        )
    return param


def term_gradients(
    terms: LossTerms | Mapping[str, torch.Tensor],
    param: torch.Tensor,
    *,
    retain_graph: bool = False,
) -> dict[str, torch.Tensor]:
    """Each term's gradient with respect to ``param``: one backward per term, the graph they
    share kept until the last one (then freed, unless ``retain_graph``). A term that does not
    reach ``param`` gets zeros. ``param.grad`` is not touched.

    Args:
        terms: a :class:`LossTerms` (its added terms) or ``{name: scalar tensor}``.
        param: the tensor being optimised, ``requires_grad=True``.
        retain_graph: keep the graph after the last term (another backward follows).

    Returns:
        ``{name: tensor shaped like param}``.
    """
    param = _check_param(param)
    values = terms.values() if isinstance(terms, LossTerms) else dict(terms)
    if not values:
        raise InputError("no term to differentiate: add terms with a non-zero weight first")
    out: dict[str, torch.Tensor] = {}
    names = list(values)
    for k, name in enumerate(names):
        value = values[name].reshape(())
        if not value.requires_grad:
            out[name] = torch.zeros_like(param)
            continue
        keep = retain_graph or k < len(names) - 1
        (g,) = torch.autograd.grad(value, param, retain_graph=keep, allow_unused=True)
        out[name] = torch.zeros_like(param) if g is None else g
    return out


def update_shares(contributions: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Each term's share of an update: ``||c_i|| / sum_j ||c_j||`` for the terms'
    contributions ``c_i`` to the combined gradient (``w_i * g_i`` in a weighted sum). Shares sum
    to 1 (all 0 when every contribution is 0).

    >>> update_shares({"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([0.0, 1.0])})
    {'a': 0.75, 'b': 0.25}
    """
    norms = {n: float(c.detach().double().norm()) for n, c in contributions.items()}
    total = sum(norms.values())
    return {n: (v / total if total > 0 else 0.0) for n, v in norms.items()}


class GradientShares:
    """Combine loss terms so that each one's weight is its share of the update.

    Args:
        shares: ``{name: share >= 0}``, relative (``2, 1, 1`` is ``0.5, 0.25, 0.25``); a share
            of 0 switches a term off (build the :class:`LossTerms` from the same dict, so it is
            never computed).
        every: measure the per-term gradient norms on every ``every``-th call of
            :meth:`backward` (or when the caller says so); the others cost one backward.
        momentum: running-mean factor of the norms (0: the last measurement only).
        reduce: the data-parallel mean of the stacked per-term gradients ``(T, *param.shape)``
            on measuring calls (and of the ``exact`` terms' on every call), so every process
            uses the norms of the global batch.
        exact: names of terms normalised by their own gradient's norm on *every* call (one
            backward each, every call: meant for terms that are cheap to differentiate, such
            as a classifier loss whose gradient norm varies by orders of magnitude from one
            image to the next); the others use the running norms.

    State (:meth:`state_dict`): the running norms and the number of calls, so a resumed run
    continues bit for bit.
    """

    def __init__(
        self,
        shares: Mapping[str, float],
        *,
        every: int = 4,
        momentum: float = 0.9,
        reduce: Reduce | None = None,
        exact: Collection[str] = (),
    ):
        checked = LossTerms(shares).weights  # names and values checked as weights are
        total = sum(checked.values())
        if total <= 0:
            raise InputError(
                f"every share is 0 ({checked}): there is nothing to minimise; give one term a "
                "positive share"
            )
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise InputError(f"every must be an int >= 1, got {every!r}")
        if not 0.0 <= float(momentum) < 1.0:
            raise InputError(f"momentum must be in [0, 1), got {momentum!r}")
        self.shares = {n: s / total for n, s in checked.items()}
        self.every = every
        self.momentum = float(momentum)
        self.reduce = reduce
        self.exact = frozenset(exact)
        unknown = sorted(self.exact - set(checked))
        if unknown:
            raise InputError(f"exact names {unknown} are not terms of {sorted(checked)}")
        #: running mean of each term's gradient norm (an exact term: its last norm)
        self.norms: dict[str, float] = {}
        self.calls = 0

    def weights(self) -> dict[str, float]:
        """The effective weight of each term now, ``share / running norm`` (0 for a term whose
        gradient has been 0 so far, and for terms switched off). Empty before the first
        measurement."""
        if not self.norms:
            return {}
        return {
            n: (s / self.norms[n] if self.norms.get(n, 0.0) > 0 else 0.0)
            for n, s in self.shares.items()
        }

    def backward(
        self, terms: LossTerms, param: torch.Tensor, *, measure: bool | None = None
    ) -> dict[str, float] | None:
        """Add this iteration's combined gradient to ``param.grad`` (like ``loss.backward()``).

        Args:
            terms: this iteration's :class:`LossTerms`, built with the same names as
                ``shares`` (terms with share 0 not added).
            param: the tensor being optimised.
            measure: measure the norms now (``None``: on every ``every``-th call, and always
                on the first).

        Returns:
            On measuring calls, each term's measured share of this update
            (:func:`update_shares`); otherwise ``None``.
        """
        param = _check_param(param)
        values = terms.values()
        unknown = sorted(set(values) - set(self.shares))
        if unknown:
            raise InputError(
                f"terms {unknown} have no share; build GradientShares and LossTerms from the "
                "same {name: share} dict"
            )
        terms.total()  # the checks: missing terms, nothing added, non-finite values
        if measure is None:
            measure = self.calls % self.every == 0
        measure = measure or not self.norms
        self.calls += 1
        exact = [n for n in values if n in self.exact]
        names = list(values) if measure else exact
        rest = [] if measure else [n for n in values if n not in self.exact]
        # one backward per measured (or exact) term; the graph stays for the rest's backward
        grads = (
            term_gradients({n: values[n] for n in names}, param, retain_graph=bool(rest))
            if names
            else {}
        )
        seen = self._update_norms(grads)
        w = self.weights()
        if rest:  # one backward for the terms between their measurements
            loss = sum(w[n] * values[n].reshape(()) for n in rest if w[n] > 0)
            if isinstance(loss, torch.Tensor):
                loss.backward()
        if grads:
            combined = torch.stack([w[n] * grads[n] for n in grads]).sum(0)
            param.grad = combined if param.grad is None else param.grad + combined
        if not measure:
            return None
        return update_shares({n: w[n] * g for n, g in seen.items()})

    def _update_norms(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Update the norms from this call's per-term gradients (the global batch's, through
        ``reduce``); returns those global gradients."""
        if not grads:
            return {}
        names = list(grads)
        stacked = torch.stack([grads[n] for n in names])
        if self.reduce is not None:
            stacked = self.reduce(stacked)
        seen = dict(zip(names, stacked.unbind(0)))  # this process's alone without reduce
        for n, g in seen.items():
            norm = float(g.double().norm())
            if not math.isfinite(norm):
                raise InputError(f"term {n!r} has a non-finite gradient; check its inputs")
            old = self.norms.get(n)
            if old is None or n in self.exact:
                self.norms[n] = norm
            else:
                self.norms[n] = self.momentum * old + (1 - self.momentum) * norm
        return seen

    def state_dict(self) -> dict[str, Any]:
        return {"norms": dict(self.norms), "calls": self.calls}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.norms = {str(k): float(v) for k, v in state["norms"].items()}
        self.calls = int(state["calls"])

    def __repr__(self) -> str:
        return (
            f"GradientShares(shares={self.shares}, every={self.every}, exact={sorted(self.exact)}"
            f", norms={self.norms})"
        )
