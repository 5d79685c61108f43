"""Tiny, offline, deterministic diffusion-transformer stacks: SD3 (``"tiny-sd3"``) and Flux
(``"tiny-flux"``).

Every component is a real diffusers / transformers class built from a small config with seeded
random weights, so ``parts.pipeline()`` (a ``StableDiffusion3Pipeline`` / ``FluxPipeline``)
runs them, ``save_pretrained`` writes a folder that ``load_diffusion(folder)`` reads, and the
differentiable loops (:func:`attnpatch.diffusion.flow_denoise`) can be checked against the
pipelines. Nothing means anything (random weights): these are for tests and for trying the API.

* ``tiny_sd3()`` — SD3.5-shaped: an ``SD3Transformer2DModel`` with two joint blocks (4 heads
  x 8, patch 2, RMS q/k norm), the first also with SD3.5's image-only ``attn2``
  (``dual_attention_layers=(0,)``); CLIP-L (width 8) and CLIP-G (width 16), both
  ``CLIPTextModelWithProjection`` over :func:`~attnpatch.testing.tiny_tokenizer`'s vocabulary;
  a T5 encoder (width 32) over :func:`~attnpatch.testing.tiny_t5_tokenizer`'s; an
  ``AutoencoderKL`` without quant convs (factor 2, 4 latent channels, SD3's scaling and shift
  factors); ``FlowMatchEulerDiscreteScheduler(shift=3.0)`` (SD3's).
* ``tiny_flux()`` — Flux-dev-shaped: a ``FluxTransformer2DModel`` with one double-stream and
  two single-stream blocks (2 heads x 16, rotary axes (4, 6, 6)), guidance embedding on; CLIP-L
  (``CLIPTextModel``, width 8, pooled) and T5 (width 32); the same kind of VAE with Flux's
  factors (4 latent channels, packed 2x2 into 16 inside the transformer); Flux's dynamically
  shifted scheduler.

>>> parts = tiny_sd3()
>>> parts.variant, type(parts.transformer).__name__, parts.unet
('sd3', 'SD3Transformer2DModel', None)
"""

from __future__ import annotations

import os

from .._util import freeze, seeded
from ..diffusion import DiffusionParts
from .t5_unigram import tiny_t5_tokenizer
from .tiny import _text_config, tiny_tokenizer

__all__ = ["tiny_sd3", "tiny_flux", "tiny_t5_encoder", "flow_scheduler", "save_tiny_dit"]

#: T5's width in the tiny stacks (the transformers' ``joint_attention_dim``).
T5_WIDTH = 32
#: The VAE factors of the real models' ``vae/config.json``.
_VAE_FACTORS = {"sd3": (1.5305, 0.0609), "flux": (0.3611, 0.1159)}


def tiny_t5_encoder(seed: int = 0, d_model: int = T5_WIDTH):
    """A 2-layer ``T5EncoderModel`` (T5 v1.1's gated GELU) over the tiny T5 vocabulary."""
    from transformers import T5Config, T5EncoderModel

    tok = tiny_t5_tokenizer()
    config = T5Config(
        vocab_size=len(tok),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=d_model // 8,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
        is_encoder_decoder=False,
        use_cache=False,
    )
    with seeded(seed):
        model = T5EncoderModel(config)
    return freeze(model)


def _clip(hidden: int, seed: int, projecting: bool):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    with seeded(seed):
        if projecting:
            return freeze(CLIPTextModelWithProjection(_text_config(hidden, projection_dim=hidden)))
        return freeze(CLIPTextModel(_text_config(hidden)))


def _vae(variant: str, seed: int):
    from diffusers import AutoencoderKL

    scaling, shift = _VAE_FACTORS[variant]
    with seeded(seed):
        vae = AutoencoderKL(
            block_out_channels=(4, 8),
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4,
            norm_num_groups=2,
            sample_size=32,
            scaling_factor=scaling,
            shift_factor=shift,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
    return freeze(vae)


def flow_scheduler(variant: str = "sd3"):
    """The ``FlowMatchEulerDiscreteScheduler`` of SD3 (``shift=3.0``) or Flux (resolution-
    dependent shift: ``use_dynamic_shifting`` with Flux-dev's constants)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if variant == "flux":
        return FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
    return FlowMatchEulerDiscreteScheduler(shift=3.0)


def tiny_sd3(seed: int = 0) -> DiffusionParts:
    """Every part of the tiny SD3.5-shaped stack (see the module docstring)."""
    from diffusers import SD3Transformer2DModel

    with seeded(seed):
        transformer = SD3Transformer2DModel(
            sample_size=32,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=T5_WIDTH,
            caption_projection_dim=32,
            pooled_projection_dim=8 + 16,  # CLIP-L's and CLIP-G's text_embeds
            pos_embed_max_size=32,
            dual_attention_layers=(0,),
            qk_norm="rms_norm",
        )
    return DiffusionParts(
        unet=None,
        vae=_vae("sd3", seed),
        text_encoder=_clip(8, seed, projecting=True),
        tokenizer=tiny_tokenizer(),
        scheduler=flow_scheduler("sd3"),
        variant="sd3",
        text_encoder_2=_clip(16, seed + 1, projecting=True),
        tokenizer_2=tiny_tokenizer(),
        transformer=freeze(transformer),
        text_encoder_3=tiny_t5_encoder(seed),
        tokenizer_3=tiny_t5_tokenizer(),
    )


def tiny_flux(seed: int = 0, guidance_embeds: bool = True) -> DiffusionParts:
    """Every part of the tiny Flux stack (see the module docstring); ``guidance_embeds=False``
    gives a schnell-shaped transformer (no guidance embedding)."""
    from diffusers import FluxTransformer2DModel

    with seeded(seed):
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,  # 4 latent channels, packed 2x2
            num_layers=1,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=T5_WIDTH,
            pooled_projection_dim=8,  # CLIP-L's pooled output
            guidance_embeds=guidance_embeds,
            axes_dims_rope=(4, 6, 6),
        )
    return DiffusionParts(
        unet=None,
        vae=_vae("flux", seed),
        text_encoder=_clip(8, seed, projecting=False),
        tokenizer=tiny_tokenizer(),
        scheduler=flow_scheduler("flux"),
        variant="flux",
        text_encoder_2=tiny_t5_encoder(seed),
        tokenizer_2=tiny_t5_tokenizer(),
        transformer=freeze(transformer),
    )


def save_tiny_dit(parts: DiffusionParts, folder: str | os.PathLike) -> str:
    """Write a DiT stack as a diffusers model folder (``parts.pipeline().save_pretrained``:
    ``model_index.json``, ``transformer/``, ``vae/``, text encoders, tokenizers, ``scheduler/``)
    that ``attnpatch.models.load_diffusion(folder)`` reads."""
    folder = os.fspath(folder)
    parts.pipeline().save_pretrained(folder)
    return folder
