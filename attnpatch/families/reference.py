"""Public diffusion-transformer architectures, from their ``transformer/config.json`` values.

Written out by hand from the public model repositories' configs (nothing is downloaded), so
``trace_attention`` can document real-size SD3 and Flux attention on the ``meta`` device (no
weights, no memory) and benchmarks can build them with random weights:

===============  ==========================================  ==========================
name             repository                                  layers
===============  ==========================================  ==========================
``sd3-medium``   stabilityai/stable-diffusion-3-medium       24 joint, 24 heads x 64
``sd35-medium``  stabilityai/stable-diffusion-3.5-medium     24 joint (0-12 dual), qk RMS
``sd35-large``   stabilityai/stable-diffusion-3.5-large      38 joint, 38 heads x 64
``flux-dev``     black-forest-labs/FLUX.1-dev                19 double + 38 single, 24 x 128
``flux-schnell`` black-forest-labs/FLUX.1-schnell            as dev, no guidance embedding
===============  ==========================================  ==========================
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ModelError

__all__ = ["REFERENCE_TRANSFORMER_CONFIGS", "REFERENCE_TEXT_LENGTHS", "reference_transformer"]

_SD3: dict[str, Any] = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    attention_head_dim=64,
    joint_attention_dim=4096,
    pooled_projection_dim=2048,
    pos_embed_max_size=192,
)
_FLUX: dict[str, Any] = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    axes_dims_rope=(16, 56, 56),
)

#: ``(diffusers class name, config)`` of each public architecture
REFERENCE_TRANSFORMER_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "sd3-medium": (
        "SD3Transformer2DModel",
        dict(_SD3, num_layers=24, num_attention_heads=24, caption_projection_dim=1536),
    ),
    "sd35-medium": (
        "SD3Transformer2DModel",
        dict(
            _SD3,
            num_layers=24,
            num_attention_heads=24,
            caption_projection_dim=1536,
            pos_embed_max_size=384,
            qk_norm="rms_norm",
            dual_attention_layers=tuple(range(13)),
        ),
    ),
    "sd35-large": (
        "SD3Transformer2DModel",
        dict(
            _SD3,
            num_layers=38,
            num_attention_heads=38,
            caption_projection_dim=2432,
            qk_norm="rms_norm",
        ),
    ),
    "flux-dev": ("FluxTransformer2DModel", dict(_FLUX, guidance_embeds=True)),
    "flux-schnell": ("FluxTransformer2DModel", dict(_FLUX, guidance_embeds=False)),
}

#: text tokens the pipelines give these models by default: SD3 77 CLIP + 256 T5
#: (``max_sequence_length=256``); Flux-dev 512 T5, schnell 256
REFERENCE_TEXT_LENGTHS = {
    "sd3-medium": 333,
    "sd35-medium": 333,
    "sd35-large": 333,
    "flux-dev": 512,
    "flux-schnell": 256,
}


def reference_transformer(
    name: str, device: str | torch.device = "meta", dtype: torch.dtype | None = None
) -> nn.Module:
    """A public transformer's architecture (see the module docstring) with no weights
    (``"meta"``, the default: forward passes compute shapes only) or random ones.

    >>> model = reference_transformer("flux-dev")
    >>> type(model).__name__, len(model.single_transformer_blocks), model.device.type
    ('FluxTransformer2DModel', 38, 'meta')
    """
    import diffusers

    if name not in REFERENCE_TRANSFORMER_CONFIGS:
        raise ModelError(
            f"unknown reference transformer {name!r}; choose one of "
            f"{sorted(REFERENCE_TRANSFORMER_CONFIGS)}"
        )
    cls_name, config = REFERENCE_TRANSFORMER_CONFIGS[name]
    with torch.device(device):
        model = getattr(diffusers, cls_name)(**config)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval().requires_grad_(False)
