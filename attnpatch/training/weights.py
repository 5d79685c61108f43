"""The ``[weights]`` section and how the terms' gradients are combined into the update.

``WeightsConfig`` is built from the registered loss terms (:mod:`.terms`): ``mode``,
``measure_every`` and one field per term, ``None`` meaning the mode's default. :class:`Update`
turns one iteration's :class:`~attnpatch.losses.LossTerms` into ``patch.pixels.grad`` by
``weights.mode``:

* ``"share"`` (default): each weight is the term's share of the update, whatever its raw scale
  (:class:`~attnpatch.losses.GradientShares`: each term's gradient divided by its running norm,
  measured every ``measure_every`` iterations with one backward per term; one backward on the
  other iterations);
* ``"sum"``: ``sum_i w_i L_i``, one backward (the raw scales decide: docs/losses.md).

In both modes a measuring iteration (``iteration % measure_every == 0``) also reports each
term's measured share of the update, which ``metrics.jsonl`` logs as ``share.<term>``.

>>> w = WeightsConfig(mode="sum", l2=0.5)
>>> w.resolved()["l2"], w.resolved()["classifier"]
(0.5, 10.0)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import field
from typing import Any

import torch

from ..errors import ConfigError
from ..losses import GradientShares, LossTerms, term_gradients, update_shares
from .terms import MODES, describe, terms

__all__ = ["WeightsConfig", "Update", "EXACT"]

#: ``weights.exact``: which terms share mode normalises by their own gradient norm at every
#: iteration: "cheap" (those that do not run the diffusion model: no extra UNet backward),
#: "all" (one backward per term, every iteration) or "none" (running norms for every term).
EXACT = ("cheap", "all", "none")

_DOC = """Loss weights (docs/losses.md); a weight of 0 removes a term without computing it.

    ``mode = "share"`` (default): each weight is the term's share of the update (relative:
    2/1/1 is 0.5/0.25/0.25), whatever the term's raw scale: each term's gradient is divided by
    its running norm, measured every ``measure_every`` iterations
    (:class:`~attnpatch.losses.GradientShares`). ``mode = "sum"``: the plain weighted sum
    ``sum_i w_i L_i`` (raw scales matter: the label map's variance is ~3e-3 on the embedded
    stack, the self-attention MSE ~6e-5). A term left at ``None`` takes its mode's default
    (``attnpatch.training.terms``). ``exact``: which terms are normalised by their own
    gradient's norm at every iteration ("cheap": those that do not run the diffusion model,
    such as the classifier loss, whose gradient norm varies by orders of magnitude between
    images; "all"; "none"); the others by a running mean of their norms (``momentum``). ``measure_every`` also sets how often each term's measured share of the update is
    logged (in "sum" mode each measurement costs one backward per term; 0 there: never).
    """


def _resolved(self: Any) -> dict[str, float]:
    """``{term: weight}`` for every registered term, each ``None`` replaced by the mode's
    default (a term registered after this class was built has no field: its default)."""
    defaults = describe(self.mode if self.mode in MODES else "share")
    out = {}
    for t in terms():
        value = getattr(self, t.name, None)
        out[t.name] = float(defaults[t.name] if value is None else value)
    return out


def _check(self: Any) -> None:
    """Raise :class:`~attnpatch.errors.ConfigError` on a value that would fail later."""
    if self.mode not in MODES:
        raise ConfigError(
            f"weights.mode must be one of {MODES}, got {self.mode!r} (docs/losses.md)"
        )
    low = 1 if self.mode == "share" else 0
    if self.measure_every < low:
        raise ConfigError(
            f"weights.measure_every must be >= {low} in {self.mode} mode, got "
            f"{self.measure_every} (e.g. 4)"
        )
    if self.exact not in EXACT:
        raise ConfigError(f"weights.exact must be one of {EXACT}, got {self.exact!r}")
    if not 0.0 <= self.momentum < 1.0:
        raise ConfigError(
            f"weights.momentum must be in [0, 1), got {self.momentum} (0: each measurement alone)"
        )
    resolved = self.resolved()
    for name, value in resolved.items():
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(
                f"weights.{name} must be >= 0 and finite, got {value} (0 switches the term off)"
            )
    if not any(resolved.values()):
        raise ConfigError(
            "every loss weight is 0: there is nothing to minimise (give a term a positive weight)"
        )


def _weights_config() -> type:
    fields: list[Any] = [
        ("mode", str, field(default="share")),
        ("measure_every", int, field(default=4)),
        ("momentum", float, field(default=0.9)),
        ("exact", str, field(default="cheap")),
    ]
    fields += [(t.name, float | None, field(default=None)) for t in terms()]
    cls = dataclasses.make_dataclass(
        "WeightsConfig", fields, namespace={"resolved": _resolved, "check": _check}
    )
    cls.__module__ = __name__
    cls.__doc__ = _DOC
    return cls


WeightsConfig = _weights_config()


def _exact(which: str) -> list[str]:
    if which == "none":
        return []
    return [t.name for t in terms() if which == "all" or not t.uses]


class Update:
    """Adds each iteration's gradient to the patch by ``weights.mode`` (see the module doc).

    Args:
        weights: the run's ``WeightsConfig``.
        reduce: the data-parallel mean of stacked per-term gradients ``(T, ...)`` on measuring
            iterations (identity in a single process), so shares and norms are the global
            batch's.
    """

    def __init__(self, weights: Any, reduce: Callable[[torch.Tensor], torch.Tensor]):
        self.mode = weights.mode
        self.every = weights.measure_every
        self.weights = weights.resolved()
        self.reduce = reduce
        self.shares = (
            GradientShares(
                self.weights,
                every=self.every,
                momentum=weights.momentum,
                reduce=reduce,
                exact=_exact(weights.exact),
            )
            if self.mode == "share"
            else None
        )

    def backward(
        self, terms: LossTerms, param: torch.Tensor, iteration: int
    ) -> tuple[LossTerms, dict[str, float] | None]:
        """Add iteration ``iteration``'s gradient to ``param.grad``. Returns the terms under the
        weights that were used (share mode: ``share / running norm``) and, on measuring
        iterations, each term's measured share of the update (else ``None``)."""
        measure = bool(self.every) and iteration % self.every == 0
        if self.shares is not None:
            measured = self.shares.backward(terms, param, measure=measure)
            used = {n: self.shares.weights().get(n, 0.0) for n in self.weights}
            return terms.with_weights(used), measured
        if not measure:
            terms.total().backward()
            return terms, None
        terms.total()  # its checks (missing terms, non-finite values) before any backward
        contributions = {n: self.weights[n] * g for n, g in term_gradients(terms, param).items()}
        combined = torch.stack(list(contributions.values())).sum(0)
        param.grad = combined if param.grad is None else param.grad + combined
        names = list(contributions)
        stacked = self.reduce(torch.stack([contributions[n] for n in names]))
        return terms, update_shares(dict(zip(names, stacked.unbind(0))))

    def state_dict(self) -> dict[str, Any] | None:
        return None if self.shares is None else self.shares.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.shares is not None and state is not None:
            self.shares.load_state_dict(state)
