"""The hook layer: read and edit a diffusion model's attention through diffusers processors.

UNets (SD 1.x/2.x/SDXL) and diffusion transformers (SD3/SD3.5, Flux) alike: where layers sit
and which tokens are image and which text is asked of the model's family
(:mod:`attnpatch.families`).

* :class:`AttnSite` — one attention layer (or one block of a joint layer) during one call
  (where, kind, heads, shapes).
* controllers — :class:`AttentionControl` (the interface), :class:`AttentionStore`,
  :class:`ComposeControl`, :class:`ReweightCrossAttention`.
* :class:`ControlledAttnProcessor` — the ``AttnProcessor2_0`` subclass a controller drives
  (:class:`ControlledRotaryProcessor` for Flux's positional call convention).
* :func:`hijack` — install controlled processors for a ``with`` block, always restore them;
  :func:`checkpoint` — activation checkpointing whose recompute replays the hijack.
* :func:`trace_attention` — every attention site of a model, as a table.
"""

from .controllers import AttentionControl, AttentionStore, ComposeControl, ReweightCrossAttention
from .hijack import attention_modules, checkpoint, hijack, in_backward, is_hijacked
from .processor import ControlledAttnProcessor, ControlledRotaryProcessor, attention_probs
from .site import (
    KINDS,
    AttnSite,
    JointTokens,
    Resolution,
    as_resolution,
    infer_resolution,
    parse_place,
)
from .trace import (
    format_sites,
    pick_cross_resolution,
    pick_self_resolutions,
    summarize_sites,
    trace_attention,
)

__all__ = [
    "AttnSite",
    "JointTokens",
    "KINDS",
    "Resolution",
    "as_resolution",
    "infer_resolution",
    "parse_place",
    "AttentionControl",
    "AttentionStore",
    "ComposeControl",
    "ReweightCrossAttention",
    "ControlledAttnProcessor",
    "ControlledRotaryProcessor",
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
