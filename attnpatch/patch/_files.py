"""The checks :meth:`AdversarialPatch.load` runs on a patch file's contents: pixels and
placement metadata, each problem named with the fix (a :class:`~attnpatch.errors.DataError`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError

__all__ = ["RESAVE", "check_pixels", "read_metadata"]


RESAVE = "re-save the patch with AdversarialPatch.save (or train it again)"
#: The metadata keys :meth:`AdversarialPatch.load` needs, each JSON.
_META_KEYS = ("size", "shape", "scale", "position", "eot")


def check_pixels(pixels: torch.Tensor, path: Path) -> None:
    """A patch file's pixels: ``(1, 3, h, w)``, finite, in [0, 1]."""
    if pixels.ndim != 4 or pixels.shape[:2] != (1, 3) or not pixels.is_floating_point():
        raise DataError(
            f"{str(path)!r}: pixels must be a float (1, 3, h, w) tensor, got "
            f"{tuple(pixels.shape)} {pixels.dtype}; {RESAVE}"
        )
    if not torch.isfinite(pixels).all():
        raise DataError(f"{str(path)!r}: the patch pixels contain NaN or Inf; {RESAVE}")
    lo, hi = float(pixels.min()), float(pixels.max())
    if lo < 0.0 or hi > 1.0:
        raise DataError(
            f"{str(path)!r}: the patch pixels lie in [{lo:.4g}, {hi:.4g}], not [0, 1]; {RESAVE}"
        )


def read_metadata(meta: dict[str, str], path: Path) -> dict[str, Any]:
    """The placement metadata of a patch file, JSON-decoded; missing or broken keys are named."""
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        raise DataError(f"{str(path)!r} lacks the patch metadata {missing}; {RESAVE}")
    out: dict[str, Any] = {"shape": meta["shape"]}
    for key in ("size", "scale", "position", "eot"):
        try:
            out[key] = json.loads(meta[key])
        except ValueError:
            raise DataError(
                f"{str(path)!r}: its patch metadata {key!r} is not valid JSON; {RESAVE}"
            ) from None
    if not isinstance(out["size"], list) or not isinstance(out["eot"], dict):
        raise DataError(f"{str(path)!r}: its patch metadata is malformed; {RESAVE}")
    return out
