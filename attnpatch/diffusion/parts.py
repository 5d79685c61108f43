"""The parts of a diffusion stack (Stable Diffusion's UNet, or SD3's / Flux's transformer), as
one object (tiny, loaded, or yours)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import AttnPatchError, ModelError

__all__ = ["DiffusionParts", "part_dtypes", "DIT_VARIANTS", "VARIANTS"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def part_dtypes(torch_dtype: torch.dtype | str | None) -> dict[str, torch.dtype]:
    """Which dtype each network gets for a requested ``torch_dtype``.

    The UNet (or transformer, under the same key ``"unet"``) and the text encoder(s) take
    ``torch_dtype``; the VAE takes it too except under
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


#: ``DiffusionParts.variant`` of the stacks whose network is a transformer (a DiT).
DIT_VARIANTS = ("sd3", "flux")
#: Every ``DiffusionParts.variant``.
VARIANTS = ("sd15", "sd2", "sdxl", *DIT_VARIANTS)


@dataclass
class DiffusionParts:
    """The parts of a diffusion stack, frozen and in eval mode.

    Two families, named by :attr:`variant`: Stable Diffusion 1.x / 2.x / XL (a UNet, DDIM) and
    the diffusion transformers SD3 / SD3.5 (``"sd3"``) and Flux (``"flux"``), with a
    flow-matching scheduler. The fields are diffusers' pipeline attribute names, so
    :meth:`pipeline` passes them as they are.

    Attributes:
        unet: a ``UNet2DConditionModel``; ``None`` on a DiT stack (``"sd3"``, ``"flux"``),
            whose network is :attr:`transformer`. Code that serves both reads
            :attr:`denoiser`.
        vae: an ``AutoencoderKL``; its downsampling factor is
            ``2 ** (len(vae.config.block_out_channels) - 1)`` (8 for SD, 2 for the tiny VAE).
        text_encoder: ``CLIPTextModel`` (SD1.x/2.x; real SDXL's first encoder; Flux's CLIP-L),
            or ``CLIPTextModelWithProjection`` (the tiny SDXL stack's only encoder; SD3's CLIP-L).
        tokenizer: the matching ``CLIPTokenizer``.
        scheduler: UNet stacks: a ``DDIMScheduler`` (built from the folder's scheduler config
            whatever class it names; ``prediction_type`` is kept). DiT stacks: a
            ``FlowMatchEulerDiscreteScheduler`` (only its config is read by
            :func:`~attnpatch.diffusion.flow_denoise`; the pipeline of :meth:`pipeline` steps it).
        variant: ``"sd15"``, ``"sd2"``, ``"sdxl"``, ``"sd3"`` or ``"flux"``.
        text_encoder_2, tokenizer_2: real SDXL's second, projecting encoder and its tokenizer;
            SD3's CLIP-G (``CLIPTextModelWithProjection``); Flux's T5 (``T5EncoderModel``) and
            its ``T5TokenizerFast``; ``None`` otherwise.
        transformer: SD3's ``SD3Transformer2DModel`` or Flux's ``FluxTransformer2DModel``;
            ``None`` on UNet stacks.
        text_encoder_3, tokenizer_3: SD3's T5 (``T5EncoderModel``, ``T5TokenizerFast``);
            ``None`` otherwise.

    Pass :attr:`tokenizers` / :attr:`text_encoders` (every one, in the pipeline's order) to
    :func:`attnpatch.encode_prompt` and :attr:`tokenizers` to :func:`attnpatch.token_indices`
    to handle every stack alike.
    """

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    variant: str = "sd15"
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    transformer: Any = None
    text_encoder_3: Any = None
    tokenizer_3: Any = None

    @property
    def tokenizers(self) -> tuple[Any, ...]:
        """The tokenizers in the pipeline's order: ``(tokenizer,)``, ``(tokenizer,
        tokenizer_2)`` (SDXL, Flux) or ``(tokenizer, tokenizer_2, tokenizer_3)`` (SD3)."""
        both = (self.tokenizer, self.tokenizer_2, self.tokenizer_3)
        return tuple(t for t in both if t is not None)

    @property
    def text_encoders(self) -> tuple[Any, ...]:
        """The text encoders in the pipeline's order, as :attr:`tokenizers`."""
        both = (self.text_encoder, self.text_encoder_2, self.text_encoder_3)
        return tuple(t for t in both if t is not None)

    @property
    def is_dit(self) -> bool:
        """Whether the network is a transformer (``variant`` ``"sd3"`` or ``"flux"``)."""
        return self.variant in DIT_VARIANTS

    @property
    def denoiser(self) -> Any:
        """The network the denoising loop calls: :attr:`transformer` on DiT stacks, else
        :attr:`unet`."""
        return self.transformer if self.is_dit else self.unet

    @property
    def vae_scale_factor(self) -> int:
        """The VAE's downsampling factor (the ``multiple`` of ``to_diffusion_input``)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def modules(self) -> list[nn.Module]:
        """The networks: the UNet or transformer, the VAE and the text encoder(s)."""
        return [self.denoiser, self.vae, *self.text_encoders]

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> DiffusionParts:
        """Move the networks in place; returns ``self``."""
        kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        for m in self.modules():  # dtype=None would still make diffusers warn about casting
            m.to(**kwargs)
        return self

    def pipeline(self):
        """The diffusers pipeline of these parts, on the same objects: a
        ``StableDiffusionPipeline`` (SD1.x / SD2.x), ``StableDiffusion3Pipeline`` (``"sd3"``) or
        ``FluxPipeline`` (``"flux"``). Its ``__call__`` steps :attr:`scheduler`."""
        if self.variant == "sd3":
            from diffusers import StableDiffusion3Pipeline

            return StableDiffusion3Pipeline(
                transformer=self.transformer,
                scheduler=self.scheduler,
                vae=self.vae,
                text_encoder=self.text_encoder,
                tokenizer=self.tokenizer,
                text_encoder_2=self.text_encoder_2,
                tokenizer_2=self.tokenizer_2,
                text_encoder_3=self.text_encoder_3,
                tokenizer_3=self.tokenizer_3,
            )
        if self.variant == "flux":
            from diffusers import FluxPipeline

            return FluxPipeline(
                scheduler=self.scheduler,
                vae=self.vae,
                text_encoder=self.text_encoder,
                tokenizer=self.tokenizer,
                text_encoder_2=self.text_encoder_2,
                tokenizer_2=self.tokenizer_2,
                transformer=self.transformer,
            )
        from diffusers import StableDiffusionPipeline

        if self.variant == "sdxl":
            raise ModelError(
                "pipeline() builds SD1.x/2.x, SD3 and Flux pipelines; for SDXL use the parts "
                "directly"
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
