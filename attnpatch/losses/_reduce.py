"""The reduction every loss shares: per-image values ``(B,)`` -> a scalar or ``(B,)``."""

from __future__ import annotations

import torch

from ..errors import InputError

__all__ = ["REDUCTIONS", "check_reduction", "reduce"]

REDUCTIONS = ("mean", "sum", "none")


def check_reduction(reduction: str) -> None:
    """Raise unless ``reduction`` is ``"mean"``, ``"sum"`` or ``"none"``."""
    if reduction not in REDUCTIONS:
        raise InputError(
            f"reduction must be one of {REDUCTIONS}, got {reduction!r}; use 'mean' for a scalar "
            f"loss, 'none' for one value per image"
        )


def reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    """``(B,)`` per-image values -> scalar (``mean`` / ``sum``) or ``(B,)`` (``none``)."""
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    return values
