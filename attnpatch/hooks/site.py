"""Attention sites: what one attention layer of a model is, as it runs.

An :class:`AttnSite` is derived from the module's path (its place, through the model's family:
:mod:`attnpatch.families`) and the tensors it actually receives (never from the order of
``model.attn_processors``, which lists a UNet's down, up, mid blocks while it executes down,
mid, up).

A UNet layer is one site: ``"self"`` (``attn1``) or ``"cross"`` (``attn2``). A joint attention
layer (SD3, Flux: one sequence of image and text tokens as queries and keys) is five sites, one
per block of its probability matrix: ``"cross"`` (image queries, text keys), ``"self"`` (image
queries, image keys), ``"text_cross"`` (text queries, image keys), ``"text_self"`` (text
queries, text keys) and ``"full"`` (the whole matrix in the model's token order). A controller
takes the blocks it asks for in ``needs(site)``: UNet-style controllers asking for ``"cross"``
and ``"self"`` work on transformers unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._util import as_pair
from ..errors import HookError
from ..families import family_names, get_family
from ..families import infer_resolution as _infer

__all__ = [
    "AttnSite",
    "JointTokens",
    "KINDS",
    "parse_place",
    "infer_resolution",
    "Resolution",
    "as_resolution",
]

Resolution = tuple[int, int]

#: the kinds of sites: image rows (``"cross"``, ``"self"``, what ``AttentionStore`` records),
#: the text rows of joint attention, and the whole joint matrix
KINDS = ("cross", "self", "text_cross", "text_self", "full")


@dataclass(frozen=True)
class JointTokens:
    """Where the image and text tokens sit in a joint attention's sequence (queries = keys).

    ``image`` and ``text`` are ``(start, stop)`` positions: SD3 ``[image, text]``, Flux
    ``[text, image]``.
    """

    image: tuple[int, int]
    text: tuple[int, int]

    @property
    def length(self) -> int:
        """Tokens in the joint sequence."""
        return max(self.image[1], self.text[1])

    @property
    def image_slice(self) -> slice:
        return slice(*self.image)

    @property
    def text_slice(self) -> slice:
        return slice(*self.text)


@dataclass(frozen=True)
class AttnSite:
    """One attention layer (or one block of a joint layer's attention) during one call.

    Attributes:
        name: module path, e.g. ``"down_blocks.1.attentions.0.transformer_blocks.0.attn2"`` or
            ``"transformer_blocks.3.attn"``.
        place: ``"down"``, ``"mid"``, ``"up"`` (UNet), ``"joint"`` (a DiT's double-stream
            block, SD3.5's ``attn2`` included), ``"single"`` (Flux's single-stream blocks);
            ``"other"`` outside those.
        block: index of the block within its place (0 for the mid block).
        is_cross: True for image queries attending text keys (a UNet's ``attn2``, the
            ``"cross"`` block of joint attention).
        heads: number of attention heads.
        query_len: number of query tokens (``h * w`` for image queries).
        key_len: number of key tokens (77 text tokens for SD cross-attention, ``h * w`` for
            self).
        resolution: ``(h, w)`` of the image tokens (non-square latents give non-square sites);
            ``None`` only when a processor runs outside :func:`~attnpatch.hijack` on a
            non-square layer, whose layout cannot be inferred from the token count.
        part: for a joint layer, which block of its attention this site is (``"cross"``,
            ``"self"``, ``"text_cross"``, ``"text_self"``, ``"full"``); ``None`` for a layer
            with one kind (a UNet's, SD3.5's ``attn2``).
        joint: for a joint layer, where its image and text tokens sit (:class:`JointTokens`).
    """

    name: str
    place: str
    block: int
    is_cross: bool
    heads: int
    query_len: int
    key_len: int
    resolution: Resolution | None
    part: str | None = None
    joint: JointTokens | None = None

    @property
    def kind(self) -> str:
        """``"cross"`` or ``"self"``; for the blocks of joint attention also
        ``"text_cross"``, ``"text_self"`` or ``"full"``."""
        if self.part is not None:
            return self.part
        return "cross" if self.is_cross else "self"

    @property
    def map_shape(self) -> tuple[int, ...]:
        """Shape of one head-averaged map from this site: ``(h, w, key_len)`` for image queries
        (``"cross"``, ``"self"``); ``(query_len, h, w)`` for ``"text_cross"``;
        ``(query_len, key_len)`` for ``"text_self"`` and ``"full"``."""
        kind = self.kind
        if kind in ("text_self", "full"):
            return (self.query_len, self.key_len)
        if self.resolution is None:
            raise HookError(
                f"the spatial layout of {self.name} is unknown; run the model under "
                "attnpatch.hijack"
            )
        if kind == "text_cross":
            return (self.query_len, *self.resolution)
        return (*self.resolution, self.key_len)

    @property
    def probs_shape(self) -> tuple[int, int, int]:
        """Per-sample shape of the probabilities a controller receives: ``(heads, query, key)``."""
        return (self.heads, self.query_len, self.key_len)


def parse_place(name: str, family: str | None = None) -> tuple[str, int]:
    """``(place, block index)`` from a module path, by the family's rules (``family``: its
    name; ``None``: the first registered family that recognises the path, else ``"other"``).

    >>> parse_place("up_blocks.2.attentions.1.transformer_blocks.0.attn1")
    ('up', 2)
    >>> parse_place("mid_block.attentions.0.transformer_blocks.0.attn2")
    ('mid', 0)
    >>> parse_place("single_transformer_blocks.7.attn")
    ('single', 7)
    """
    if family is not None:
        return get_family(family).place(name)
    for candidate in family_names():
        place = get_family(candidate).place(name)
        if place[0] != "other":
            return place
    return "other", 0


def infer_resolution(query_len: int, latent_hw: Resolution | None) -> Resolution:
    """Spatial ``(h, w)`` of a UNet layer with ``query_len`` tokens in a UNet fed ``latent_hw``.

    UNet levels halve the size with stride-2 convolutions (``ceil(h / 2)``), so the layer's size
    is ``(ceil(H / 2**k), ceil(W / 2**k))`` for the ``k`` whose product is ``query_len``. Without
    a known latent size, only square layouts can be inferred.

    >>> infer_resolution(192, (32, 24))
    (16, 12)
    """
    found = _infer(query_len, latent_hw)
    if found is None:
        raise HookError(
            f"cannot infer the spatial size of an attention layer with {query_len} query tokens "
            f"(latent size {latent_hw}); run the UNet under attnpatch.hijack, which records the "
            "latent size of each call"
        )
    return found


def as_resolution(resolution: int | Resolution) -> Resolution:
    """``16 -> (16, 16)``; ``(16, 12)`` unchanged. Raises on anything else."""
    return as_pair(resolution, "resolution")
