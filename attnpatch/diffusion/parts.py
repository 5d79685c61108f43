"""The parts of a Stable Diffusion stack, as one object (tiny, loaded, or yours)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import AttnPatchError

__all__ = ["DiffusionParts", "part_dtypes"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def part_dtypes(torch_dtype: torch.dtype | str | None) -> dict[str, torch.dtype]:
    """Which dtype each network gets for a requested ``torch_dtype``.

    The UNet and the text encoder(s) take ``torch_dtype``; the VAE takes it too except under
    float16, where it stays float32: the SD VAE overflows in float16 (its decoder's and the
    encoder's mid-block activations exceed 65504; diffusers' ``force_upcast``), while bfloat16
    has float32's range. ``None`` is float32.

    >>> part_dtypes("float16")["vae"], part_dtypes(torch.bfloat16)["unet"]
    (torch.float32, torch.bfloat16)
    """
    if torch_dtype is None:
        torch_dtype = torch.float32
    if isinstance(torch_dtype, str):
        if torch_dtype not in _DTYPES:
            raise AttnPatchError(
                f"torch_dtype must be one of {sorted(_DTYPES)}, got {torch_dtype!r}"
            )
        torch_dtype = _DTYPES[torch_dtype]
    if torch_dtype not in _DTYPES.values():
        raise AttnPatchError(
            f"torch_dtype must be torch.float32, torch.float16 or torch.bfloat16, got "
            f"{torch_dtype!r}"
        )
    vae = torch.float32 if torch_dtype == torch.float16 else torch_dtype
    return {"unet": torch_dtype, "text_encoder": torch_dtype, "vae": vae}


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
