"""The hook layer: read and edit a UNet's attention through diffusers processors.

* :class:`AttnSite` — one attention layer during one call (where, kind, heads, shapes).
* controllers — :class:`AttentionControl` (the interface), :class:`AttentionStore`,
  :class:`ComposeControl`, :class:`ReweightCrossAttention`.
* :class:`ControlledAttnProcessor` — the ``AttnProcessor2_0`` subclass a controller drives.
* :func:`hijack` — install controlled processors for a ``with`` block, always restore them;
  :func:`checkpoint` — activation checkpointing whose recompute replays the hijack.
* :func:`trace_attention` — every attention site of a UNet, as a table.
"""

from .controllers import AttentionControl, AttentionStore, ComposeControl, ReweightCrossAttention
from .hijack import attention_modules, checkpoint, hijack, in_backward, is_hijacked
from .processor import ControlledAttnProcessor, attention_probs
from .site import AttnSite, Resolution, as_resolution, infer_resolution, parse_place
from .trace import (
    format_sites,
    pick_cross_resolution,
    pick_self_resolutions,
    summarize_sites,
    trace_attention,
)

__all__ = [
    "AttnSite",
    "Resolution",
    "as_resolution",
    "infer_resolution",
    "parse_place",
    "AttentionControl",
    "AttentionStore",
    "ComposeControl",
    "ReweightCrossAttention",
    "ControlledAttnProcessor",
    "attention_probs",
    "attention_modules",
    "hijack",
    "is_hijacked",
    "checkpoint",
    "in_backward",
    "trace_attention",
    "format_sites",
    "summarize_sites",
    "pick_cross_resolution",
    "pick_self_resolutions",
]
