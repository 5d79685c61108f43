"""Trace a UNet's attention sites: where each layer runs, its kind, heads and map shape.

The seed's "trace UNet attention maps (where & shape), document clearly": one forward pass
under :func:`~attnpatch.hijack` with a controller that records every site and observes
nothing. On the ``meta`` device (see :func:`attnpatch.testing.reference_unet`) it costs no
memory, so SD1.5/SD2.1/SDXL tables are produced without weights.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import AttnPatchError
from .controllers.base import AttentionControl
from .hijack import hijack
from .site import AttnSite

__all__ = ["trace_attention", "format_sites"]


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
    h, w = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
    if h < 1 or w < 1:
        raise AttnPatchError(f"sample_size must be positive, got {(h, w)}")
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
