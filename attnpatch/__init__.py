"""attnpatch: adversarial patches guided by a Stable Diffusion UNet's attention.

The public API, by layer (each layer uses only those above it):

* utilities: ``AttnPatchError``, ``check_image``, ``to_diffusion_input``, ``attnpatch.testing``
* hook layer: ``AttnSite``, ``AttentionControl``, ``AttentionStore``, ``ComposeControl``,
  ``ReweightCrossAttention``, ``ControlledAttnProcessor``, ``hijack``, ``trace_attention``
* diffusion: ``ddim_invert``, ``ddim_denoise``, ``encode_prompt``, ``token_indices``,
  ``vae_encode``, ``vae_decode``, ``sdxl_added_cond_kwargs``
* losses: ``attnpatch.losses`` (``classifier_loss``, ``cross_attention_variance``, ...,
  ``LossTerms``)
* patches: ``AdversarialPatch``, ``EOT``, ``apply_patch``
* data and models: ``attnpatch.data``, ``attnpatch.registry``
* the pipeline: ``AttentionPipeline``, ``PatchTrainer``, ``TrainConfig``, ``evaluate_patch``
"""

from . import losses
from .attention_pipeline import AttentionPipeline, AttentionResult
from .config import TrainConfig, load_config
from .controllers import AttentionControl, AttentionStore, ComposeControl, ReweightCrossAttention
from .ddim import ddim_denoise, ddim_invert, ddim_timesteps
from .eot import EOT
from .errors import AttnPatchError
from .evaluate import EvalResult, evaluate_patch
from .hijack import hijack, is_hijacked
from .images import check_image, to_diffusion_input
from .parts import DiffusionParts
from .patch import AdversarialPatch, PatchParams, apply_patch
from .processor import ControlledAttnProcessor
from .prompts import (
    PromptEmbeds,
    cached_embeddings,
    encode_prompt,
    sdxl_added_cond_kwargs,
    token_indices,
)
from .registry import load_classifier, load_diffusion, register_classifier, register_diffusion
from .sites import AttnSite
from .trace import trace_attention
from .train import PatchTrainer
from .vae import vae_decode, vae_encode, vae_scale_factor

__version__ = "0.1.0"

__all__ = [
    "AttnPatchError",
    "check_image",
    "to_diffusion_input",
    "AttnSite",
    "AttentionControl",
    "AttentionStore",
    "ComposeControl",
    "ReweightCrossAttention",
    "ControlledAttnProcessor",
    "hijack",
    "is_hijacked",
    "trace_attention",
    "ddim_invert",
    "ddim_denoise",
    "ddim_timesteps",
    "encode_prompt",
    "cached_embeddings",
    "PromptEmbeds",
    "token_indices",
    "sdxl_added_cond_kwargs",
    "vae_encode",
    "vae_decode",
    "vae_scale_factor",
    "losses",
    "AdversarialPatch",
    "PatchParams",
    "apply_patch",
    "EOT",
    "load_classifier",
    "load_diffusion",
    "DiffusionParts",
    "register_classifier",
    "register_diffusion",
    "AttentionPipeline",
    "AttentionResult",
    "PatchTrainer",
    "TrainConfig",
    "load_config",
    "evaluate_patch",
    "EvalResult",
    "__version__",
]
