"""Measure what the ``"shapes"`` stack's attention means, through the library's own path.

:func:`heldout_scenes` renders held-out shapes images with their masks (a stream no training
image came from); :func:`word_maps` runs :class:`~attnpatch.diffusion.AttentionPipeline`
(VAE -> DDIM inversion -> denoising under hijack -> ``store.aggregate("cross", r)``) and returns
one token's maps (for an SD3 stack such as ``"shapes-sd3"``: VAE -> ``flow_invert`` ->
``flow_denoise`` under ``hijack``, the joint layers' image-to-text block, :func:`dit_maps`);
:func:`localisation` turns them into the label word's mass ratio
(:func:`~attnpatch.models.shapes_sd.label_mass_ratio`); :func:`centre_of_mass` locates a map;
:func:`generate` samples images with the plain diffusers pipeline of the parts.
``benchmarks/eval_shapes.py`` prints all of it (``--model shapes-sd3`` for the DiT stack);
``tests/models/test_shapes_semantics.py`` and ``test_shapes_sd3_semantics.py`` assert it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .._util import derive_seed, one_thread
from ..data import SHAPE_CLASSES, render_shapes
from ..diffusion import PROMPT_TEMPLATE, AttentionPipeline, DiffusionParts, token_indices
from ..errors import InputError
from .shapes_sd import label_mass_ratio

__all__ = [
    "heldout_scenes",
    "word_maps",
    "dit_maps",
    "localisation",
    "centre_of_mass",
    "generate",
]


def heldout_scenes(
    n: int = 100,
    seed: int = 0,
    size: int | tuple[int, int] = 32,
    centres: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """``n`` held-out images: ``images (n, 3, H, W)`` in [0, 1], ``masks (n, 1, H, W)`` in
    [0, 1], ``labels (n,)`` cycling through :data:`~attnpatch.data.SHAPE_CLASSES`; ``centres``
    as in :func:`~attnpatch.data.render_shapes`."""
    g = torch.Generator().manual_seed(derive_seed("attnpatch-shapes-heldout-scenes", seed))
    labels = torch.arange(n) % len(SHAPE_CLASSES)
    with one_thread():
        images, masks = render_shapes(
            labels, SHAPE_CLASSES, size, generator=g, centres=centres, return_masks=True
        )
    return {"images": images, "masks": masks, "labels": labels}


def word_maps(
    parts: DiffusionParts,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    classes: Sequence[str] = SHAPE_CLASSES,
    template: str = PROMPT_TEMPLATE,
    offset: int = 0,
    resolution: int | tuple[int, int] | None = None,
    places: Sequence[str] | None = None,
    half: str = "cond",
    blocks: Sequence[int] | None = None,
    **pipeline: Any,
) -> torch.Tensor:
    """The label word's cross-attention ``(B, h, w)`` (heads, layers and steps averaged).

    Args:
        images: ``(B, 3, H, W)`` in [0, 1]; labels: ``(B,)`` indices into ``classes``.
        template: the prompt, ``{label}`` the class name (the trainer's default).
        offset: read the token ``offset`` places after the word's (0: the word itself) — the
            neighbours an off-by-one index would read.
        resolution: map side (default: the pipeline's ``cross_resolution``).
        places: which blocks to average (UNet: ``"down"``, ``"mid"``, ``"up"``, default all;
            SD3: ``"joint"``).
        half: ``"cond"`` or, with ``guidance_scale != 1``, ``"uncond"``: which half of the
            classifier-free batch ``[uncond; cond]`` to read.
        blocks: SD3 only: which transformer blocks to average (default all).
        **pipeline: :class:`~attnpatch.diffusion.AttentionPipeline` arguments
            (``num_inference_steps``, ``num_steps``, ``guidance_scale``; ``image_size``
            defaults to the images' size); for an SD3 stack :func:`dit_maps`' (the first
            three).
    """
    if half not in ("cond", "uncond"):
        raise InputError(f"half must be 'cond' or 'uncond', got {half!r}")
    if half == "uncond" and pipeline.get("guidance_scale", 1.0) == 1.0:
        raise InputError(
            'half="uncond" needs guidance_scale != 1 (a classifier-free batch); pass one'
        )
    prompts = [template.format(label=classes[int(i)]) for i in labels]
    if parts.is_dit:
        maps = dit_maps(parts, images, prompts, resolution=resolution, blocks=blocks, **pipeline)
    else:
        if blocks is not None:
            raise InputError("blocks= selects transformer blocks of an SD3 stack; use places=")
        pipeline.setdefault("image_size", tuple(images.shape[-2:]))
        pipe = AttentionPipeline(parts, **pipeline)
        with torch.no_grad():
            result = pipe(images, prompts)
        res = pipe.cross_resolution if resolution is None else resolution
        maps = result.cross.aggregate("cross", res, places or ("down", "mid", "up"))
    b = images.shape[0]  # maps: (rows, h, w, text tokens)
    rows = maps[-b:] if half == "cond" else maps[:b]  # the batch is [uncond; cond] under CFG
    index = torch.tensor(
        [
            token_indices(parts.tokenizers, p, classes[int(i)])[0] + offset
            for p, i in zip(prompts, labels)
        ]
    )
    return rows[torch.arange(b), :, :, index]


def dit_maps(
    parts: DiffusionParts,
    images: torch.Tensor,
    prompts: Sequence[str],
    *,
    num_inference_steps: int = 10,
    num_steps: int = 2,
    guidance_scale: float = 1.0,
    resolution: int | tuple[int, int] | None = None,
    blocks: Sequence[int] | None = None,
) -> torch.Tensor:
    """An SD3 stack's image-to-text attention, ``(rows, h, w, T)``, the DiT analogue of
    :class:`~attnpatch.diffusion.AttentionPipeline`'s ``cross`` maps.

    ``images`` ``(B, 3, H, W)`` in [0, 1], ``H`` and ``W`` multiples of the VAE factor times
    the patch size (4 for ``"shapes-sd3"``) -> ``vae_encode`` -> ``flow_invert`` (the last
    ``num_steps`` of ``num_inference_steps`` Euler steps, cond only) -> ``flow_denoise`` under
    ``hijack(parts.transformer, AttentionStore(kinds=("cross",)))`` with ``guidance_scale``
    (rows ``[uncond; cond]`` = 2B when it is not 1, else B). Heads, steps and the joint layers
    of ``blocks`` (default all) are averaged; ``(h, w)`` is the token grid (latent / patch),
    ``T`` the text length (SD3: 77 + 256). The values are the joint softmax's image-to-text
    block, not renormalised over the text.
    """
    from ..diffusion import encode_prompt, flow_denoise, flow_invert, vae_encode
    from ..hooks import AttentionStore, hijack

    if len(prompts) != images.shape[0]:
        raise InputError(f"got {len(prompts)} prompts for {images.shape[0]} images")
    multiple = parts.vae_scale_factor * int(parts.transformer.config.patch_size)
    if images.shape[-2] % multiple or images.shape[-1] % multiple:
        raise InputError(
            f"image sides must be multiples of {multiple} (VAE factor x patch size), got "
            f"{tuple(images.shape[-2:])}; render or resize the images to such a size"
        )
    n_blocks = int(parts.transformer.config.num_layers)
    if blocks is not None and not set(blocks) <= set(range(n_blocks)):
        raise InputError(
            f"no joint layer in blocks {list(blocks)}: the transformer has blocks 0..{n_blocks - 1}"
        )
    embeds = encode_prompt(parts.tokenizers, parts.text_encoders, list(prompts))
    kw = dict(num_inference_steps=num_inference_steps, num_steps=num_steps)
    store = AttentionStore(kinds=("cross",))
    with torch.no_grad():
        z0 = vae_encode(parts.vae, images * 2 - 1)
        zt = flow_invert(parts.transformer, parts.scheduler, z0, embeds, **kw)
        with hijack(parts.transformer, store):
            flow_denoise(
                parts.transformer, parts.scheduler, zt, embeds, guidance_scale=guidance_scale, **kw
            )
    grid = (
        z0.shape[-2] // int(parts.transformer.config.patch_size),
        z0.shape[-1] // int(parts.transformer.config.patch_size),
    )
    res = grid if resolution is None else resolution
    layers = store.maps("cross", res, ("joint",))
    if blocks is not None:
        wanted = {f"transformer_blocks.{i}.attn" for i in blocks}
        layers = {k: v for k, v in layers.items() if k in wanted}
    return torch.stack(list(layers.values())).mean(0)


def localisation(
    parts: DiffusionParts, scenes: dict[str, torch.Tensor], **kwargs: Any
) -> torch.Tensor:
    """Per image, the label word's mass ratio on its object (``(B,)``; 1.0 = no preference).

    ``scenes`` is :func:`heldout_scenes`' output; ``kwargs`` go to :func:`word_maps`.
    """
    maps = word_maps(parts, scenes["images"], scenes["labels"], **kwargs)
    return label_mass_ratio(maps, scenes["masks"])


def centre_of_mass(maps: torch.Tensor) -> torch.Tensor:
    """``(B, h, w)`` non-negative maps -> ``(B, 2)`` centres ``(x, y)`` as fractions of the
    width and height (pixel centres at ``(j + 0.5) / w``).

    >>> m = torch.zeros(1, 2, 4); m[0, 1, 3] = 1.0
    >>> centre_of_mass(m)
    tensor([[0.8750, 0.7500]])
    """
    b, h, w = maps.shape
    maps = maps.float() / maps.float().sum((1, 2), keepdim=True).clamp_min(1e-12)
    ys = (torch.arange(h) + 0.5) / h
    xs = (torch.arange(w) + 0.5) / w
    return torch.stack([(maps.sum(1) * xs).sum(1), (maps.sum(2) * ys).sum(1)], dim=1)


def generate(
    parts: DiffusionParts,
    prompts: Sequence[str],
    *,
    seed: int = 0,
    num_inference_steps: int = 25,
    guidance_scale: float = 3.0,
    size: int = 32,
) -> torch.Tensor:
    """Images ``(len(prompts), 3, size, size)`` in [0, 1] from ``parts.pipeline()`` (a plain
    diffusers ``StableDiffusionPipeline``), seeded."""
    pipe = parts.pipeline()
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(seed)
    out = pipe(
        list(prompts),
        height=size,
        width=size,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        generator=g,
        output_type="pt",
    )
    return out.images.float().clamp(0, 1)
