"""The diffusion layer: the parts of an SD stack, differentiable DDIM, prompts, the VAE, and the
attention pipeline that wires them under a hijack.

* :class:`DiffusionParts` — unet, vae, text encoder(s), tokenizer(s), scheduler as one object.
* :func:`ddim_invert` / :func:`ddim_denoise` — the differentiable DDIM loops (UNets).
* :func:`flow_invert` / :func:`flow_denoise` — the differentiable flow-matching loops (SD3 and
  Flux transformers).
* :func:`encode_prompt`, :func:`token_indices`, :func:`sdxl_added_cond_kwargs` — text side
  (CLIP stacks, SD3's CLIP + T5, Flux's).
* :func:`vae_encode` / :func:`vae_decode` — images in [-1, 1] <-> scaled latents.
* :class:`AttentionPipeline` — image -> VAE -> invert -> denoise under hijack -> maps;
  ``memory=`` one of :data:`MEMORY_MODES`; :func:`part_dtypes` — the half-precision policy.
"""

from ._memory import MEMORY_MODES
from .ddim import ddim_denoise, ddim_invert, ddim_timesteps
from .flow import flow_denoise, flow_invert, flow_timesteps
from .parts import DIT_VARIANTS, DiffusionParts, part_dtypes
from .pipeline import AttentionPipeline, AttentionResult
from .prompts import (
    PROMPT_TEMPLATE,
    PromptEmbeds,
    class_prompt,
    encode_prompt,
    sdxl_added_cond_kwargs,
    token_indices,
)
from .vae import vae_decode, vae_encode, vae_scale_factor

__all__ = [
    "DiffusionParts",
    "part_dtypes",
    "ddim_invert",
    "ddim_denoise",
    "ddim_timesteps",
    "flow_invert",
    "flow_denoise",
    "flow_timesteps",
    "DIT_VARIANTS",
    "PromptEmbeds",
    "encode_prompt",
    "PROMPT_TEMPLATE",
    "class_prompt",
    "token_indices",
    "sdxl_added_cond_kwargs",
    "vae_encode",
    "vae_decode",
    "vae_scale_factor",
    "AttentionPipeline",
    "AttentionResult",
    "MEMORY_MODES",
]
