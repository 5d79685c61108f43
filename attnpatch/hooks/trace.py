"""Trace a model's attention sites: where each layer runs, its kind, heads and map shape.

:func:`trace_attention` runs one forward pass under :func:`~attnpatch.hijack` with a
controller that records every site and observes nothing; the model family builds the call's
inputs (:meth:`~attnpatch.families.Family.example_call`). On the ``meta`` device (see
:func:`attnpatch.testing.reference_unet`) it costs no memory, so SD1.5/SD2.1/SDXL, SD3 and Flux
tables are produced without weights (docs/attention-sites.md). A joint attention layer is
listed with its ``"full"`` matrix and the ``"cross"`` and ``"self"`` blocks a store records
(its text rows, ``"text_cross"`` and ``"text_self"``, follow from those). :func:`pick_cross_resolution` and
:func:`pick_self_resolutions` choose, from a trace, the map sizes attention losses read.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .._util import as_pair
from ..errors import AttnPatchError, InputError
from ..families import family_of
from .controllers import AttentionControl
from .hijack import hijack
from .site import AttnSite, Resolution

__all__ = [
    "trace_attention",
    "format_sites",
    "summarize_sites",
    "pick_cross_resolution",
    "pick_self_resolutions",
]


class _Tracer(AttentionControl):
    def __init__(self) -> None:
        self.sites: list[AttnSite] = []

    def needs(self, site: AttnSite) -> bool:
        if site.kind in ("cross", "self", "full"):
            self.sites.append(site)
        return False


def trace_attention(
    unet: nn.Module,
    sample_size: int | tuple[int, int] | None = None,
    *,
    batch_size: int = 1,
    text_len: int = 77,
) -> list[AttnSite]:
    """Every attention site of one model call, in execution order (a UNet: down, mid, up).

    Args:
        unet: the denoising model: a ``UNet2DConditionModel``, ``SD3Transformer2DModel`` or
            ``FluxTransformer2DModel`` (on any device, ``meta`` included).
        sample_size: latent ``(h, w)`` or one int, in the VAE's layout (Flux: before its 2x2
            packing); default: the family's (a UNet's or SD3's ``config.sample_size``, 128
            for Flux). The image size is this times the VAE factor (8 for SD: 64 -> 512 px).
        batch_size: batch of the dummy call.
        text_len: text tokens (keys of cross-attention; SD3: 77 CLIP + T5 tokens).

    Returns:
        One :class:`~attnpatch.AttnSite` per attention layer call (joint layers: its
        ``"full"``, ``"cross"`` and ``"self"`` sites).
    """
    family = family_of(unet)
    latent = family.default_latent(unet) if sample_size is None else sample_size
    call = family.example_call(
        unet, as_pair(latent, "sample_size"), batch=batch_size, text_len=text_len
    )
    tracer = _Tracer()
    with torch.no_grad(), hijack(unet, tracer):
        call()
    return tracer.sites


def format_sites(sites: list[AttnSite], *, markdown: bool = True) -> str:
    """A table of sites: index, layer, place, block, kind, heads, query/key length, (h, w) and
    the shape of the probabilities a controller receives ``(B, heads, query, key)``."""
    header = ["#", "layer", "place", "block", "kind", "heads", "query", "key", "(h, w)", "probs"]
    rows = [
        [
            str(i),
            s.name.replace("transformer_blocks", "tb").replace("attentions", "attn"),
            s.place,
            str(s.block),
            s.kind,
            str(s.heads),
            str(s.query_len),
            str(s.key_len),
            f"{s.resolution[0]}x{s.resolution[1]}" if s.resolution else "?",
            f"(B, {s.heads}, {s.query_len}, {s.key_len})",
        ]
        for i, s in enumerate(sites)
    ]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*r) for r in [header, *rows])


def summarize_sites(sites: list[AttnSite]) -> str:
    """One line per (place, kind, resolution): how many layers, heads and the map shape a store
    keeps (``"full"`` rows of joint layers: the whole ``(query, key)`` matrix)."""
    groups: dict[tuple[str, str, tuple[int, int] | None, int, int], list[AttnSite]] = {}
    for s in sites:
        key = (s.place, s.kind, s.resolution, s.heads, s.key_len)
        groups.setdefault(key, []).append(s)
    lines = [
        "| place | kind | (h, w) | layers | heads | stored map (B, h, w, key) |",
        "|---|---|---|---|---|---|",
    ]
    for (place, kind, res, heads, _), members in groups.items():
        hw = f"{res[0]}x{res[1]}" if res else "?"
        try:
            shape = "(B, " + ", ".join(map(str, members[0].map_shape)) + ")"
        except AttnPatchError:  # layout unknown
            shape = "?"
        lines.append(f"| {place} | {kind} | {hw} | {len(members)} | {heads} | {shape} |")
    return "\n".join(lines)


def _resolutions(sites: Sequence[AttnSite], kind: str, places: set[str]) -> set[Resolution]:
    return {s.resolution for s in sites if s.kind == kind and s.place in places}


#: every place but "other" (layers outside a family's known blocks)
def _known(sites: Sequence[AttnSite]) -> set[str]:
    return {s.place for s in sites} - {"other"}


def pick_cross_resolution(
    sites: Sequence[AttnSite], wanted: int | Resolution | None = None
) -> Resolution:
    """The cross-attention map size for losses: ``wanted`` if the trace has it, else (``None``
    or 0) the smallest size at which both down and up blocks attend — 16x16 for SD1.5 at
    512 px, as prompt-to-prompt uses; 7x7 for SD2 at 224 px, as DiffAttack uses; a DiT's
    token grid (all its layers work at one size).

    >>> from attnpatch.testing import tiny_unet
    >>> pick_cross_resolution(trace_attention(tiny_unet(), 32))
    (16, 16)
    """
    available = _resolutions(sites, "cross", _known(sites))
    if not available:
        raise InputError("this model has no cross-attention layers; attention losses need them")
    if wanted is not None and wanted != 0:
        res = as_pair(wanted, "cross resolution")
        if res not in available:
            raise InputError(
                f"no cross-attention at resolution {res} for this image size; available: "
                f"{sorted(available)} (set attention.cross_resolution to one of them, or 0)"
            )
        return res
    both = _resolutions(sites, "cross", {"down"}) & _resolutions(sites, "cross", {"up"})
    return min(both or available, key=lambda r: r[0] * r[1])


def pick_self_resolutions(
    sites: Sequence[AttnSite], wanted: Sequence[int | Resolution] | None = None
) -> list[Resolution]:
    """The self-attention map sizes to store: ``wanted`` if the trace has them all, else
    (``None`` or empty) the two smallest (self-attention maps grow as ``(h*w)**2``)."""
    available = sorted(_resolutions(sites, "self", _known(sites)), key=lambda r: r[0] * r[1])
    if not wanted:
        return available[:2]
    chosen = [as_pair(r, "self resolution") for r in wanted]
    missing = [r for r in chosen if r not in available]
    if missing:
        raise InputError(
            f"no self-attention at {missing} for this image size; available: {available}"
        )
    return chosen
