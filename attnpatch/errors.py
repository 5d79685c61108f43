"""The library's one error type."""

from __future__ import annotations

__all__ = ["AttnPatchError"]


class AttnPatchError(ValueError):
    """Raised for every problem attnpatch detects in its inputs or state.

    It subclasses :class:`ValueError`, so ``except ValueError`` also catches it. Messages name
    the problem and the fix, e.g. ``"images look channels-last (B, H, W, 3); pass
    images.permute(0, 3, 1, 2)"``.
    """
