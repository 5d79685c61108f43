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

__all__ = [
    "REFERENCE_TRANSFORMER_CONFIGS",
    "REFERENCE_TEXT_LENGTHS",
    "reference_transformer",
    "reference_summary",
    "reference_table",
]

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

#: the public repository of each architecture
REFERENCE_REPOSITORIES = {
    "sd3-medium": "stabilityai/stable-diffusion-3-medium-diffusers",
    "sd35-medium": "stabilityai/stable-diffusion-3.5-medium",
    "sd35-large": "stabilityai/stable-diffusion-3.5-large",
    "flux-dev": "black-forest-labs/FLUX.1-dev",
    "flux-schnell": "black-forest-labs/FLUX.1-schnell",
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


def reference_summary(name: str, sizes: tuple[int, ...] = (512, 1024)) -> dict[str, Any]:
    """What :func:`reference_transformer` ``name`` is, read from the model built on the ``meta``
    device and its family (nothing typed by hand): block counts, heads, the token grid at each
    image size in ``sizes`` (px; the VAE factor is 8 for SD3 and Flux), the text tokens and the
    parameter count.

    >>> s = reference_summary("flux-dev")
    >>> s["joint"], s["single"], s["heads"], s["head_dim"], s["grid"][1024], s["text"]
    (19, 38, 24, 128, (64, 64), '512 T5')
    """
    from .registry import family_of

    model = reference_transformer(name)
    family = family_of(model)
    config = model.config
    patch = family.latent_multiple(model)
    joint = len(model.transformer_blocks)
    single = len(getattr(model, "single_transformer_blocks", ()))
    dual = sum(getattr(b, "attn2", None) is not None for b in model.transformer_blocks)
    text = REFERENCE_TEXT_LENGTHS[name]
    clip = 77 if family.name == "sd3" else 0  # SD3's sequence: [CLIP 77; T5], Flux: T5 only
    return {
        "name": name,
        "repository": REFERENCE_REPOSITORIES[name],
        "family": family.name,
        "joint": joint,
        "single": single,
        "image_only": dual,
        "heads": int(config.num_attention_heads),
        "head_dim": int(config.attention_head_dim),
        "attention_layers": joint + single + dual,
        "grid": {px: (px // 8 // patch, px // 8 // patch) for px in sizes},
        "text": f"{clip} CLIP + {text - clip} T5" if clip else f"{text} T5",
        "text_tokens": text,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def reference_table(sizes: tuple[int, ...] = (512, 1024)) -> str:
    """The markdown table of every reference architecture (docs/attention-sites.md holds its
    output; ``python -c "from attnpatch.families import reference_table as t; print(t())"``
    prints it)."""
    header = [
        "model",
        "repository",
        "joint blocks",
        "single blocks",
        "image-only attn2",
        "heads x dim",
        "text tokens",
        *(f"grid at {px} px (image tokens)" for px in sizes),
        "parameters",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in REFERENCE_TRANSFORMER_CONFIGS:
        s = reference_summary(name, sizes)
        grids = [f"{h}x{w} ({h * w})" for h, w in (s["grid"][px] for px in sizes)]
        row = [
            name,
            f"`{s['repository']}`",
            str(s["joint"]),
            str(s["single"]),
            str(s["image_only"]),
            f"{s['heads']} x {s['head_dim']}",
            f"{s['text_tokens']} ({s['text']})",
            *grids,
            f"{s['parameters'] / 1e9:.2f} B",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
