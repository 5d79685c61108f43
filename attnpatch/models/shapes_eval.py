"""Measure what the ``"shapes"`` stack's attention means, through the library's own path.

:func:`heldout_scenes` renders held-out shapes images with their masks (a stream no training
image came from); :func:`word_maps` runs :class:`~attnpatch.diffusion.AttentionPipeline`
(VAE -> DDIM inversion -> denoising under hijack -> ``store.aggregate("cross", r)``) and returns
one token's maps; :func:`localisation` turns them into the label word's mass ratio
(:func:`~attnpatch.models.shapes_sd.label_mass_ratio`); :func:`centre_of_mass` locates a map;
:func:`generate` samples images with the plain diffusers pipeline of the parts.
``benchmarks/eval_shapes.py`` prints all of it; ``tests/models/test_shapes_semantics.py``
asserts it.
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

__all__ = ["heldout_scenes", "word_maps", "localisation", "centre_of_mass", "generate"]


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
    places: Sequence[str] = ("down", "mid", "up"),
    half: str = "cond",
    **pipeline: Any,
) -> torch.Tensor:
    """The label word's cross-attention ``(B, h, w)`` (heads, layers and steps averaged).

    Args:
        images: ``(B, 3, H, W)`` in [0, 1]; labels: ``(B,)`` indices into ``classes``.
        template: the prompt, ``{label}`` the class name (the trainer's default).
        offset: read the token ``offset`` places after the word's (0: the word itself) — the
            neighbours an off-by-one index would read.
        resolution: map side (default: the pipeline's ``cross_resolution``).
        places: which blocks to average (``"down"``, ``"mid"``, ``"up"``).
        half: ``"cond"`` or, with ``guidance_scale != 1``, ``"uncond"``: which half of the
            classifier-free batch ``[uncond; cond]`` to read.
        **pipeline: :class:`~attnpatch.diffusion.AttentionPipeline` arguments
            (``num_inference_steps``, ``num_steps``, ``guidance_scale``; ``image_size``
            defaults to the images' size).
    """
    if half not in ("cond", "uncond"):
        raise InputError(f"half must be 'cond' or 'uncond', got {half!r}")
    if half == "uncond" and pipeline.get("guidance_scale", 1.0) == 1.0:
        raise InputError(
            'half="uncond" needs guidance_scale != 1 (a classifier-free batch); pass one'
        )
    pipeline.setdefault("image_size", tuple(images.shape[-2:]))
    pipe = AttentionPipeline(parts, **pipeline)
    prompts = [template.format(label=classes[int(i)]) for i in labels]
    with torch.no_grad():
        result = pipe(images, prompts)
    res = pipe.cross_resolution if resolution is None else resolution
    maps = result.cross.aggregate("cross", res, places)  # (rows, h, w, 77)
    b = images.shape[0]
    rows = maps[-b:] if half == "cond" else maps[:b]  # the batch is [uncond; cond] under CFG
    index = torch.tensor(
        [
            token_indices(parts.tokenizer, p, classes[int(i)])[0] + offset
            for p, i in zip(prompts, labels)
        ]
    )
    return rows[torch.arange(b), :, :, index]


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
