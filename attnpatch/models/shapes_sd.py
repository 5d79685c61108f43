"""The ``"shapes"`` diffusion stack: a tiny Stable Diffusion trained on the shapes world.

Unlike the random tiny stacks of :mod:`.tiny`, its attention means something: the shape word's
cross-attention lies on the shape. It is the embedded default of ``attnpatch train`` and the
test bed of the semantic tests. The weights ship with the package (``weights/shapes/``, a
diffusers model folder, safetensors) and are read with ``from_pretrained`` like any SD folder;
:mod:`attnpatch.models.train_shapes` reproduces them (command, time and checksums in
docs/models.md).

Architecture (real diffusers / transformers classes, SD1.x layout, 32 px images):

* ``AutoencoderKL``: channels (16, 32), 4 latent channels, factor 2 (32 px -> 16x16 latents);
* ``UNet2DConditionModel``: channels (16, 32), one layer per block, cross-attention in every
  block (16x16 and 8x8 maps; down, mid and up), 2 heads, epsilon prediction;
* ``CLIPTextModel`` with **no transformer layers** and its position embeddings fixed at zero
  (token embeddings and the final layer norm: a bag of words): a word's embedding is about
  that word alone, so the shape word's own cross-attention must carry the shape (with mixing
  layers the shape spreads over every later token), and a padding token is the same wherever
  it sits (with trained positions, the unconditional prompt's padding at the word's position
  localised the object too: measured in docs/models.md); the tiny tokenizer
  (:func:`~.tiny.tiny_tokenizer`);
* ``DDIMScheduler`` with SD1.5's settings.

>>> parts = shapes_sd(seed=0)              # untrained, the architecture only
>>> parts.unet.config.cross_attention_dim == parts.text_encoder.config.hidden_size
True
>>> parts.text_encoder.config.num_hidden_layers
0
>>> float(parts.text_encoder.get_input_embeddings().weight.abs().sum()) > 0
True
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .._util import freeze, seeded
from ..diffusion import DiffusionParts
from ..losses import downsample_mask
from .tiny import _text_config, tiny_scheduler, tiny_tokenizer

__all__ = [
    "SHAPES_WEIGHTS",
    "SHAPES_IMAGE_SIZE",
    "shapes_sd",
    "shapes_unet_config",
    "shapes_vae_config",
    "load_shapes_sd",
    "label_mass_ratio",
]

#: The shipped weights: a diffusers model folder inside the package.
SHAPES_WEIGHTS = Path(__file__).with_name("weights") / "shapes"
#: The image side the stack was trained at (latents are half of it).
SHAPES_IMAGE_SIZE = 32
_WIDTH = 32  # text embedding width = cross_attention_dim


def shapes_unet_config() -> dict[str, Any]:
    """The UNet's constructor arguments (see the module doc)."""
    return dict(
        sample_size=SHAPES_IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=_WIDTH,
        attention_head_dim=2,  # SD1.x naming: the number of heads
    )


def shapes_vae_config() -> dict[str, Any]:
    """The VAE's constructor arguments (see the module doc)."""
    return dict(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=SHAPES_IMAGE_SIZE,
    )


def _text_encoder():
    from transformers import CLIPTextModel

    model = CLIPTextModel(_text_config(_WIDTH, layers=0))
    # No position information: a bag of words (see the module doc).
    (pos,) = (w for n, w in model.named_parameters() if n.endswith("position_embedding.weight"))
    with torch.no_grad():
        pos.zero_()
    pos.requires_grad_(False)
    return model


def shapes_sd(seed: int = 0, trainable: bool = False) -> DiffusionParts:
    """The ``"shapes"`` architecture with seeded random weights (what training starts from).

    ``trainable=False`` (default) freezes every network like the registry's stacks; the training
    script asks for ``trainable=True``.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with seeded(seed):
        vae = AutoencoderKL(**shapes_vae_config())
        unet = UNet2DConditionModel(**shapes_unet_config())
        text_encoder = _text_encoder()
    nets = (unet, vae, text_encoder)
    if not trainable:
        nets = tuple(freeze(m) for m in nets)
    return DiffusionParts(
        unet=nets[0],
        vae=nets[1],
        text_encoder=nets[2],
        tokenizer=tiny_tokenizer(),
        scheduler=tiny_scheduler("sd15"),
        variant="sd15",
    )


def load_shapes_sd(folder: str | Path | None = None, **kwargs: Any) -> DiffusionParts:
    """The trained stack from ``folder`` (default: the shipped :data:`SHAPES_WEIGHTS`)."""
    from .diffusion import as_parts, load_diffusers_folder

    path = Path(folder) if folder is not None else SHAPES_WEIGHTS
    return as_parts(load_diffusers_folder(path, **kwargs), str(path))


def label_mass_ratio(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """How much of a word's attention lies on the object, relative to the object's size.

    Args:
        maps: ``(B, h, w)`` one token's cross-attention (any non-negative map).
        masks: ``(B, 1, H, W)`` object coverage in [0, 1] (``render_shapes(...,
            return_masks=True)``), ``(H, W) = f * (h, w)`` for one integer ``f`` (else
            :class:`~attnpatch.AttnPatchError`, from :func:`~attnpatch.losses.downsample_mask`).

    Returns:
        ``(B,)``: (the map's mass inside the object / its total mass) / (the object's share of
        the image), with the mask area-averaged down to ``(h, w)``. 1.0 means no preference for
        the object; ``1 / share`` is the most there is.

    >>> maps = torch.zeros(1, 2, 2); maps[0, 0, 0] = 1.0
    >>> masks = torch.zeros(1, 1, 4, 4); masks[..., :2, :2] = 1.0
    >>> label_mass_ratio(maps, masks)
    tensor([4.])
    """
    small = downsample_mask(masks.float(), tuple(maps.shape[-2:]), name="masks")[:, 0]
    maps = maps.float()
    inside = (maps * small).sum((1, 2)) / maps.sum((1, 2)).clamp_min(1e-12)
    share = small.mean((1, 2)).clamp_min(1e-12)
    return inside / share
