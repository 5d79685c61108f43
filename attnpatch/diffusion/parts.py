"""The parts of a Stable Diffusion stack, as one object (tiny, loaded, or yours)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import AttnPatchError

__all__ = ["DiffusionParts"]


@dataclass
class DiffusionParts:
    """The parts of a Stable Diffusion stack, frozen and in eval mode.

    Attributes:
        unet: a ``UNet2DConditionModel``.
        vae: an ``AutoencoderKL``; its downsampling factor is
            ``2 ** (len(vae.config.block_out_channels) - 1)`` (8 for SD, 2 for the tiny VAE).
        text_encoder: ``CLIPTextModel`` (SD1.x/2.x; real SDXL's first encoder) or
            ``CLIPTextModelWithProjection`` (the tiny SDXL stack's only encoder).
        tokenizer: the matching ``CLIPTokenizer``.
        scheduler: a ``DDIMScheduler`` (built from the folder's scheduler config whatever
            class it names; ``prediction_type`` is kept).
        variant: ``"sd15"``, ``"sd2"`` or ``"sdxl"``.
        text_encoder_2, tokenizer_2: real SDXL's second, projecting encoder and its tokenizer;
            ``None`` otherwise. Pass :attr:`tokenizers` / :attr:`text_encoders` to
            :func:`attnpatch.encode_prompt` to handle both cases.

    """

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    variant: str = "sd15"
    text_encoder_2: Any = None
    tokenizer_2: Any = None

    @property
    def tokenizers(self) -> tuple[Any, ...]:
        """``(tokenizer,)`` or ``(tokenizer, tokenizer_2)``."""
        return tuple(t for t in (self.tokenizer, self.tokenizer_2) if t is not None)

    @property
    def text_encoders(self) -> tuple[Any, ...]:
        """``(text_encoder,)`` or ``(text_encoder, text_encoder_2)``."""
        return tuple(t for t in (self.text_encoder, self.text_encoder_2) if t is not None)

    @property
    def vae_scale_factor(self) -> int:
        """The VAE's downsampling factor (the ``multiple`` of ``to_diffusion_input``)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def modules(self) -> list[nn.Module]:
        """The networks: unet, vae and the text encoder(s)."""
        return [self.unet, self.vae, *self.text_encoders]

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> DiffusionParts:
        """Move the networks in place; returns ``self``."""
        kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        for m in self.modules():  # dtype=None would still make diffusers warn about casting
            m.to(**kwargs)
        return self

    def pipeline(self):
        """A diffusers ``StableDiffusionPipeline`` (SD1.x / SD2.x) from these parts."""
        from diffusers import StableDiffusionPipeline

        if self.variant == "sdxl":
            raise AttnPatchError(
                "pipeline() builds SD1.x/2.x pipelines only; for SDXL use the parts directly"
            )
        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=self.scheduler,
            safety_checker=None,
            feature_extractor=None,
            image_encoder=None,
            requires_safety_checker=False,
        )
