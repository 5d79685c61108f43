"""Attention sites: what one attention layer of a UNet is, as it runs.

An :class:`AttnSite` is derived from the module's path and the tensors it actually receives
(never from the order of ``unet.attn_processors``, which lists down, up, mid blocks while the
UNet executes down, mid, up).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .._util import as_pair
from ..errors import AttnPatchError

__all__ = ["AttnSite", "parse_place", "infer_resolution", "Resolution", "as_resolution"]

Resolution = tuple[int, int]

_PLACE = re.compile(r"^(down_blocks|up_blocks|mid_block)(?:\.(\d+))?")
_PLACES = {"down_blocks": "down", "up_blocks": "up", "mid_block": "mid"}


@dataclass(frozen=True)
class AttnSite:
    """One attention layer during one call.

    Attributes:
        name: module path, e.g. ``"down_blocks.1.attentions.0.transformer_blocks.0.attn2"``.
        place: ``"down"``, ``"mid"`` or ``"up"`` (``"other"`` outside those blocks).
        block: index of the down/up block (0 for the mid block).
        is_cross: True for cross-attention (``attn2``: queries from the image, keys from text).
        heads: number of attention heads.
        query_len: number of query tokens, ``h * w``.
        key_len: number of key tokens (77 text tokens for SD cross-attention, ``h * w`` for self).
        resolution: spatial ``(h, w)`` of the queries (non-square latents give non-square sites);
            ``None`` only when a processor runs outside :func:`~attnpatch.hijack` on a non-square
            layer, whose layout cannot be inferred from the token count.
    """

    name: str
    place: str
    block: int
    is_cross: bool
    heads: int
    query_len: int
    key_len: int
    resolution: Resolution | None

    @property
    def kind(self) -> str:
        """``"cross"`` or ``"self"``."""
        return "cross" if self.is_cross else "self"

    @property
    def map_shape(self) -> tuple[int, int, int]:
        """Shape of one head-averaged map from this site: ``(h, w, key_len)``."""
        if self.resolution is None:
            raise AttnPatchError(
                f"the spatial layout of {self.name} is unknown; run the UNet under attnpatch.hijack"
            )
        return (*self.resolution, self.key_len)

    @property
    def probs_shape(self) -> tuple[int, int, int]:
        """Per-sample shape of the probabilities a controller receives: ``(heads, query, key)``."""
        return (self.heads, self.query_len, self.key_len)


def parse_place(name: str) -> tuple[str, int]:
    """``("down" | "mid" | "up" | "other", block index)`` from a UNet module path.

    >>> parse_place("up_blocks.2.attentions.1.transformer_blocks.0.attn1")
    ('up', 2)
    >>> parse_place("mid_block.attentions.0.transformer_blocks.0.attn2")
    ('mid', 0)
    """
    m = _PLACE.match(name)
    if m is None:
        return "other", 0
    return _PLACES[m.group(1)], int(m.group(2) or 0)


def infer_resolution(query_len: int, latent_hw: Resolution | None) -> Resolution:
    """Spatial ``(h, w)`` of a layer with ``query_len`` tokens in a UNet fed ``latent_hw``.

    UNet levels halve the size with stride-2 convolutions (``ceil(h / 2)``), so the layer's size
    is ``(ceil(H / 2**k), ceil(W / 2**k))`` for the ``k`` whose product is ``query_len``. Without
    a known latent size, only square layouts can be inferred.

    >>> infer_resolution(192, (32, 24))
    (16, 12)
    """
    if latent_hw is not None:
        h0, w0 = latent_hw
        for k in range(12):
            f = 2**k
            h, w = -(-h0 // f), -(-w0 // f)
            if h * w == query_len:
                return (h, w)
            if h == 1 and w == 1:
                break
    side = math.isqrt(query_len)
    if side * side == query_len:
        return (side, side)
    raise AttnPatchError(
        f"cannot infer the spatial size of an attention layer with {query_len} query tokens "
        f"(latent size {latent_hw}); run the UNet under attnpatch.hijack, which records the "
        "latent size of each call"
    )


def as_resolution(resolution: int | Resolution) -> Resolution:
    """``16 -> (16, 16)``; ``(16, 12)`` unchanged. Raises on anything else."""
    return as_pair(resolution, "resolution")
