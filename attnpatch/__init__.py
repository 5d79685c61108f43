"""attnpatch: adversarial patches guided by a Stable Diffusion UNet's attention.

The public API is small; each layer's sub-package holds the rest (its ``__init__`` is that
layer's surface), and a sub-package imports only from the layers below it::

    cli
    training     TrainConfig, PatchTrainer, evaluate_patch      (attnpatch.training)
    models       load_classifier, load_diffusion                (attnpatch.models)
    diffusion    ddim_invert, ddim_denoise, encode_prompt, token_indices, vae_encode,
                 vae_decode, AttentionPipeline                  (attnpatch.diffusion)
    data · patch · losses                                       (attnpatch.data, .patch, .losses)
    hooks        AttnSite, AttentionControl, AttentionStore, ComposeControl,
                 ReweightCrossAttention, hijack, trace_attention (attnpatch.hooks)
    errors · images                                             AttnPatchError, check_image,
                                                                to_diffusion_input

``attnpatch.testing`` builds tiny offline models.
"""

from . import losses
from ._version import __version__ as __version__
from .diffusion import (
    AttentionPipeline,
    ddim_denoise,
    ddim_invert,
    encode_prompt,
    token_indices,
    vae_decode,
    vae_encode,
)
from .errors import AttnPatchError
from .hooks import (
    AttentionControl,
    AttentionStore,
    AttnSite,
    ComposeControl,
    ReweightCrossAttention,
    hijack,
    trace_attention,
)
from .images import check_image, to_diffusion_input
from .models import load_classifier, load_diffusion
from .patch import EOT, AdversarialPatch, apply_patch
from .training import PatchTrainer, TrainConfig, evaluate_patch

__all__ = [
    "AttnPatchError",
    "check_image",
    "to_diffusion_input",
    "AttnSite",
    "AttentionControl",
    "AttentionStore",
    "ComposeControl",
    "ReweightCrossAttention",
    "hijack",
    "trace_attention",
    "ddim_invert",
    "ddim_denoise",
    "encode_prompt",
    "token_indices",
    "vae_encode",
    "vae_decode",
    "AttentionPipeline",
    "losses",
    "AdversarialPatch",
    "EOT",
    "apply_patch",
    "load_classifier",
    "load_diffusion",
    "PatchTrainer",
    "TrainConfig",
    "evaluate_patch",
]
