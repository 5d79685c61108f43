"""A weighted sum of named loss terms that logs every term separately.

>>> import torch
>>> x = torch.tensor(2.0, requires_grad=True)
>>> terms = LossTerms({"classifier": 1.0, "l2": 0.5, "tv": 0.0})
>>> terms.add("classifier", lambda: x * 3)      # weight 1: called now
tensor(6., grad_fn=<MulBackward0>)
>>> terms.add("l2", x**2)
tensor(4., grad_fn=<PowBackward0>)
>>> terms.add("tv", lambda: 1 / 0)              # weight 0: never called
>>> terms.total()
tensor(8., grad_fn=<AddBackward0>)
>>> terms.as_dict()
{'classifier': 6.0, 'l2': 4.0, 'tv': None, 'total': 8.0}
>>> terms.as_dict(weighted=True)
{'classifier': 6.0, 'l2': 2.0, 'tv': None, 'total': 8.0}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from numbers import Real

import torch

from ..errors import InputError

__all__ = ["LossTerms"]

#: A term's value: a scalar tensor, or a zero-argument callable returning one (called only when
#: the term's weight is not 0).
TermValue = torch.Tensor | Callable[[], torch.Tensor]


def _check_weight(name: object, weight: object) -> float:
    if not isinstance(name, str) or not name:
        raise InputError(f"loss term names must be non-empty strings, got {name!r}")
    if name == "total":
        raise InputError("'total' is reserved for the weighted sum; name the term otherwise")
    if isinstance(weight, bool) or not isinstance(weight, Real):
        raise InputError(f"weight of term {name!r} must be a number, got {weight!r}")
    w = float(weight)
    if not math.isfinite(w) or w < 0:
        raise InputError(
            f"weight of term {name!r} must be finite and >= 0, got {weight!r}: every attnpatch "
            f"loss is already minimised (flip a loss with its own option, e.g. targeted= or "
            f"mode=, not with a negative weight); 0 switches the term off"
        )
    return w


class LossTerms:
    """Named loss terms, their weights, their weighted total; create one per iteration.

    ``total = sum_name weight[name] * value[name]`` over the terms added with a non-zero weight.

    Args:
        weights: ``{name: weight}``, weights finite and ``>= 0``. A weight of 0 switches a term
            off: :meth:`add` does not call its callable, it is left out of :meth:`total` (no
            ``0 * NaN``) and logged as ``None``.

    Rules that catch silent mistakes:

    * :meth:`add` with a name not in ``weights`` raises (a typo would drop the loss), unless
      the call opts in by passing ``weight=`` for the new name.
    * Adding a name twice raises (call :meth:`clear` between iterations).
    * :meth:`total` raises if a term with a non-zero weight was never added
      (``allow_missing=True`` to permit), if nothing was added, and if a term is NaN/Inf
      (``check_finite=False`` to skip; that check syncs with the device once).
    """

    def __init__(self, weights: Mapping[str, float]):
        if not isinstance(weights, Mapping):
            raise InputError(
                f"weights must be a dict {{name: weight}}, got {type(weights).__name__}"
            )
        self._weights: dict[str, float] = {n: _check_weight(n, w) for n, w in weights.items()}
        self._values: dict[str, torch.Tensor] = {}
        self._skipped: set[str] = set()

    # -- weights ------------------------------------------------------------------------------
    @property
    def weights(self) -> dict[str, float]:
        """A copy of ``{name: weight}`` (including terms registered by ``add(..., weight=)``)."""
        return dict(self._weights)

    def _known(self, name: str) -> float:
        if name not in self._weights:
            raise InputError(
                f"unknown loss term {name!r}; known terms: {sorted(self._weights)}. Fix the "
                f"name, or register a new term with add({name!r}, value, weight=w)"
            )
        return self._weights[name]

    def wants(self, *names: str) -> bool:
        """True if any of ``names`` has a non-zero weight (use it to skip expensive paths).

        >>> LossTerms({"cross_attention": 0.0, "self_attention": 100.0}).wants(
        ...     "cross_attention", "self_attention")
        True
        """
        if not names:
            raise InputError("wants() needs at least one term name")
        return any(self._known(n) != 0.0 for n in names)

    # -- values -------------------------------------------------------------------------------
    def add(
        self, name: str, value: TermValue, *, weight: float | None = None
    ) -> torch.Tensor | None:
        """Add term ``name``; returns its raw value, or ``None`` when the term is switched off.

        Args:
            name: a name from ``weights``, or a new name together with ``weight=``.
            value: a scalar tensor (0-d or one element) or a zero-argument callable returning
                one; the callable runs only if the weight is not 0.
            weight: only for a name not in ``weights``: registers it with this weight.
        """
        if weight is not None:
            if name in self._weights:
                raise InputError(
                    f"term {name!r} already has weight {self._weights[name]:g}; weight= only "
                    f"registers new names (change weights in LossTerms({{...}}))"
                )
            self._weights[name] = _check_weight(name, weight)
        w = self._known(name)
        if name in self._values or name in self._skipped:
            raise InputError(
                f"term {name!r} was already added; call terms.clear() (or create a new "
                f"LossTerms) before the next iteration"
            )
        if w == 0.0:
            self._skipped.add(name)
            return None
        if callable(value) and not isinstance(value, torch.Tensor):
            value = value()
        if not isinstance(value, torch.Tensor):
            raise InputError(
                f"term {name!r} must be a tensor (or a callable returning one), got "
                f"{type(value).__name__}"
            )
        if value.numel() != 1:
            raise InputError(
                f"term {name!r} must be a scalar, got shape {tuple(value.shape)}; reduce it "
                f"first (reduction='mean')"
            )
        if not (value.is_floating_point() or value.is_complex()):
            raise InputError(f"term {name!r} must be floating point, got {value.dtype}")
        self._values[name] = value
        return value

    def clear(self) -> LossTerms:
        """Forget every added value (weights stay); returns ``self``."""
        self._values.clear()
        self._skipped.clear()
        return self

    def values(self) -> dict[str, torch.Tensor]:
        """``{name: raw value}`` of the terms added with a non-zero weight, in order (the
        tensors themselves, with their graphs)."""
        return dict(self._values)

    def with_weights(self, weights: Mapping[str, float]) -> LossTerms:
        """A copy holding the same values under new ``weights`` (same names; a term switched
        off stays off). What a balancer (:class:`~attnpatch.losses.GradientShares`) used is
        then what :meth:`total`, :meth:`as_dict` and ``print`` show."""
        if set(weights) != set(self._weights):
            raise InputError(
                f"with_weights needs the same names {sorted(self._weights)}, got {sorted(weights)}"
            )
        out = LossTerms(weights)
        out._values = dict(self._values)
        out._skipped = set(self._skipped)
        return out

    def __contains__(self, name: object) -> bool:
        """True if ``name`` was added with a non-zero weight."""
        return name in self._values

    def total(self, *, allow_missing: bool = False, check_finite: bool = True) -> torch.Tensor:
        """The weighted sum of the added terms: a scalar tensor with their graphs."""
        if not self._values:
            if self._skipped:
                raise InputError(
                    f"every term added has weight 0 ({sorted(self._skipped)}): there is nothing "
                    f"to minimise; give one a non-zero weight"
                )
            raise InputError(
                "no loss term was added; call terms.add(name, value) before terms.total()"
            )
        if not allow_missing:
            missing = [
                n
                for n, w in self._weights.items()
                if w != 0.0 and n not in self._values and n not in self._skipped
            ]
            if missing:
                raise InputError(
                    f"terms {missing} have non-zero weights but were never added; add them, "
                    f"set their weight to 0, or call total(allow_missing=True)"
                )
        if check_finite:
            vals = torch.stack([v.detach().reshape(()) for v in self._values.values()])
            if not bool(torch.isfinite(vals).all()):
                bad = {n: float(v) for n, v in self._values.items() if not torch.isfinite(v).all()}
                raise InputError(
                    f"non-finite loss terms {bad}: a backward pass would corrupt the patch. "
                    f"Check the inputs of these terms (or total(check_finite=False))"
                )
        parts = [self._weights[n] * v.reshape(()) for n, v in self._values.items()]
        out = parts[0]
        for p in parts[1:]:
            out = out + p
        return out

    def as_dict(self, *, weighted: bool = False) -> dict[str, float | None]:
        """``{name: float | None, ..., "total": float | None}`` for logging.

        Raw (unweighted) values by default, ``weight * value`` with ``weighted=True``. Terms
        switched off or not added are ``None`` (never NaN); ``"total"`` is always the weighted
        sum (``None`` if nothing was added). One device sync per term.
        """
        out: dict[str, float | None] = {}
        total = None
        for name, w in self._weights.items():
            v = self._values.get(name)
            if v is None:
                out[name] = None
                continue
            raw = float(v.detach().reshape(()))
            out[name] = w * raw if weighted else raw
            total = w * raw if total is None else total + w * raw
        out["total"] = total
        return out

    def __str__(self) -> str:
        """One log line: ``total=… | name=raw (xweight) …``; ``-`` for terms switched off."""
        d = self.as_dict()
        parts = []
        for name, w in self._weights.items():
            v = d[name]
            parts.append(f"{name}=-" if v is None else f"{name}={v:.4g} (x{w:g})")
        total = d["total"]
        head = "total=-" if total is None else f"total={total:.4g}"
        return " | ".join([head, " ".join(parts)])

    def __repr__(self) -> str:
        return f"LossTerms(weights={self._weights}, added={list(self._values)})"
