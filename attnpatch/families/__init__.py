"""Model families: what each diffusion model class says about its attention, its inputs, its
scheduler and its call, so the layers above ask the family instead of assuming a UNet.

* :class:`Family` (the interface), :class:`AttnLayer`, :class:`CallInfo`,
  :class:`TokenLayout`, :class:`Projection` — ``base.py``;
* one module per family: ``unet.py`` (``UNet2DConditionModel``), ``sd3.py``
  (``SD3Transformer2DModel``, SD3.5's dual attention included), ``flux.py``
  (``FluxTransformer2DModel``, single-stream blocks included);
* the registry — ``register_family``, ``family_of``, ``get_family``, ``attention_layers``
  (each model's layers found once, cached) — ``registry.py``.

A new family (Flux 2, PixArt, Hunyuan-DiT, ...) is one module with a :class:`Family` subclass
and one ``register_family(MyFamily())`` (docs/architecture.md, "Where new things go").

>>> from attnpatch.families import family_of
>>> from attnpatch.testing import tiny_unet
>>> family = family_of(tiny_unet())
>>> family.name, family.scheduler, family.places
('unet', 'ddim', ('down', 'mid', 'up'))
"""

from .base import (
    AttnLayer,
    CallInfo,
    Family,
    Grid,
    Projection,
    TokenLayout,
    image_grid,
    refuse_unreproducible,
)
from .flux import FluxFamily, image_ids, pack_latents, unpack_latents
from .reference import (
    REFERENCE_TEXT_LENGTHS,
    REFERENCE_TRANSFORMER_CONFIGS,
    reference_summary,
    reference_table,
    reference_transformer,
)
from .registry import (
    all_places,
    attention_layers,
    checkpointable_blocks,
    family_for_processor,
    family_names,
    family_of,
    forget,
    get_family,
    predict,
    register_family,
    unregister_family,
)
from .sd3 import SD3Family
from .unet import UNetFamily, infer_resolution

register_family(UNetFamily())
register_family(SD3Family())
register_family(FluxFamily())

__all__ = [
    "Family",
    "AttnLayer",
    "CallInfo",
    "TokenLayout",
    "Projection",
    "Grid",
    "image_grid",
    "refuse_unreproducible",
    "reference_transformer",
    "reference_summary",
    "reference_table",
    "REFERENCE_TRANSFORMER_CONFIGS",
    "REFERENCE_TEXT_LENGTHS",
    "UNetFamily",
    "SD3Family",
    "FluxFamily",
    "register_family",
    "unregister_family",
    "family_of",
    "get_family",
    "family_names",
    "all_places",
    "family_for_processor",
    "attention_layers",
    "checkpointable_blocks",
    "forget",
    "infer_resolution",
    "pack_latents",
    "unpack_latents",
    "image_ids",
    "predict",
]
