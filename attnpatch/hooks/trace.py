"""Trace a UNet's attention sites: where each layer runs, its kind, heads and map shape.

:func:`trace_attention` runs one forward pass under :func:`~attnpatch.hijack` with a
controller that records every site and observes nothing. On the ``meta`` device (see
:func:`attnpatch.testing.reference_unet`) it costs no memory, so SD1.5/SD2.1/SDXL tables are
produced without weights (docs/attention-sites.md). :func:`pick_cross_resolution` and
:func:`pick_self_resolutions` choose, from a trace, the map sizes attention losses read.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .._util import as_pair
from ..errors import AttnPatchError
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
        self.sites.append(site)
        return False


def trace_attention(
    unet: nn.Module,
    sample_size: int | tuple[int, int] | None = None,
    *,
    batch_size: int = 1,
    text_len: int = 77,
) -> list[AttnSite]:
    """Every attention site of one UNet call, in execution order (down, mid, up).

    Args:
        unet: a ``UNet2DConditionModel`` (on any device, ``meta`` included).
        sample_size: latent ``(h, w)`` or one int; default ``unet.config.sample_size``. The image
            size is this times the VAE factor (8 for SD: 64 -> 512 px).
        batch_size: batch of the dummy call.
        text_len: text tokens (keys of cross-attention).

    Returns:
        One :class:`~attnpatch.AttnSite` per attention layer call.
    """
    config = unet.config
    if sample_size is None:
        sample_size = config.sample_size
    h, w = as_pair(sample_size, "sample_size")
    param = next(unet.parameters())
    device, dtype = param.device, param.dtype
    sample = torch.zeros(batch_size, config.in_channels, h, w, device=device, dtype=dtype)
    text = torch.zeros(batch_size, text_len, config.cross_attention_dim, device=device, dtype=dtype)
    kwargs = {}
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.zeros(batch_size, pooled, device=device, dtype=dtype),
            "time_ids": torch.zeros(batch_size, 6, device=device, dtype=dtype),
        }
    tracer = _Tracer()
    timestep = torch.tensor(1, device=device)
    with torch.no_grad(), hijack(unet, tracer):
        unet(sample, timestep, text, **kwargs)
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
    """One line per (place, kind, resolution): how many layers, heads and the map shape."""
    groups: dict[tuple[str, str, tuple[int, int] | None, int, int], int] = {}
    for s in sites:
        key = (s.place, s.kind, s.resolution, s.heads, s.key_len)
        groups[key] = groups.get(key, 0) + 1
    lines = [
        "| place | kind | (h, w) | layers | heads | stored map (B, h, w, key) |",
        "|---|---|---|---|---|---|",
    ]
    for (place, kind, res, heads, key), n in groups.items():
        hw = f"{res[0]}x{res[1]}" if res else "?"
        shape = f"(B, {res[0]}, {res[1]}, {key})" if res else "?"
        lines.append(f"| {place} | {kind} | {hw} | {n} | {heads} | {shape} |")
    return "\n".join(lines)


def _resolutions(sites: Sequence[AttnSite], kind: str, places: set[str]) -> set[Resolution]:
    return {s.resolution for s in sites if s.kind == kind and s.place in places}


def pick_cross_resolution(
    sites: Sequence[AttnSite], wanted: int | Resolution | None = None
) -> Resolution:
    """The cross-attention map size for losses: ``wanted`` if the trace has it, else (``None``
    or 0) the smallest size at which both down and up blocks attend — 16x16 for SD1.5 at
    512 px, as prompt-to-prompt uses; 7x7 for SD2 at 224 px, as DiffAttack uses.

    >>> from attnpatch.testing import tiny_unet
    >>> pick_cross_resolution(trace_attention(tiny_unet(), 32))
    (16, 16)
    """
    available = _resolutions(sites, "cross", {"down", "mid", "up"})
    if not available:
        raise AttnPatchError("this UNet has no cross-attention layers; attention losses need them")
    if wanted is not None and wanted != 0:
        res = as_pair(wanted, "cross resolution")
        if res not in available:
            raise AttnPatchError(
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
    available = sorted(
        _resolutions(sites, "self", {"down", "mid", "up"}), key=lambda r: r[0] * r[1]
    )
    if not wanted:
        return available[:2]
    chosen = [as_pair(r, "self resolution") for r in wanted]
    missing = [r for r in chosen if r not in available]
    if missing:
        raise AttnPatchError(
            f"no self-attention at {missing} for this image size; available: {available}"
        )
    return chosen
