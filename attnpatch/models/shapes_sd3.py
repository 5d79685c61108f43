"""The ``"shapes-sd3"`` diffusion stack: a tiny SD3 (MMDiT) trained on the shapes world.

The SD3 sibling of :mod:`.shapes_sd`: its joint attention means something (the label word's
image-to-text attention lies on the object), so the DiT paths (``flow_invert`` /
``flow_denoise`` under ``hijack``, ``families.sd3``) can be tested on maps with a known right
answer. Weights ship in ``weights/shapes-sd3/`` (a diffusers SD3 folder, safetensors, read by
``from_pretrained``); :mod:`attnpatch.models.train_shapes_sd3` reproduces them (command, time
and checksums in docs/models.md).

Architecture (real diffusers / transformers classes, SD3's layout, 32 px images):

* ``AutoencoderKL``: the ``"shapes"`` stack's trained VAE, unchanged (factor 2, 4 latent
  channels: 32 px -> 16x16 latents), with ``shift_factor = 0`` added (SD3's pipeline reads
  it);
* ``SD3Transformer2DModel``: 4 joint blocks, 2 heads x 16 (width 32), patch 2 (an 8x8 token
  grid at 32 px), RMS q/k norm (SD3.5's), ``joint_attention_dim`` 32, pooled width 32;
* CLIP-L and CLIP-G: ``CLIPTextModelWithProjection`` (width 16 each) over the tiny CLIP
  tokenizer's vocabulary, position embeddings fixed at zero. SD3 reads the *penultimate*
  hidden state, which for these one-layer encoders is the token embeddings themselves: a bag
  of words, as in ``"shapes"`` (a word's features are about that word alone; a padding token
  is the same wherever it sits). Their ``text_projection`` is zero, so the pooled projection
  is zero for every prompt: the prompt reaches the transformer through its token sequence only,
  the label word's attention must carry the shape. Only the token embeddings are trained
  (initialised N(0, 1): they enter SD3 raw, without a layer norm);
* T5: a ``T5EncoderModel`` with no layers and zero token embeddings: its 256 positions are
  exact zeros, what ``StableDiffusion3Pipeline`` feeds when T5 is left out
  (``text_encoder_3=None``), kept as a real encoder so the library's three-encoder SD3 path
  (``encode_prompt``, ``token_indices``) runs unchanged. The text sequence is SD3's
  ``[CLIP (77), T5 (256)]``: 333 tokens, the label word at its CLIP position;
* ``FlowMatchEulerDiscreteScheduler(shift=3.0)`` (SD3's).

>>> parts = shapes_sd3(seed=0)             # untrained, the architecture only
>>> parts.variant, type(parts.transformer).__name__
('sd3', 'SD3Transformer2DModel')
>>> parts.transformer.config.joint_attention_dim, parts.transformer.config.num_layers
(32, 4)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .._util import freeze, seeded
from ..diffusion import DiffusionParts
from ..errors import ModelError
from .t5_unigram import tiny_t5_tokenizer
from .tiny import _text_config, tiny_tokenizer
from .tiny_dit import flow_scheduler

__all__ = [
    "SHAPES_SD3_WEIGHTS",
    "shapes_sd3",
    "shapes_sd3_transformer_config",
    "trainable_parameters",
    "load_shapes_sd3",
]

#: The shipped weights: a diffusers SD3 model folder inside the package.
SHAPES_SD3_WEIGHTS = Path(__file__).with_name("weights") / "shapes-sd3"
_CLIP_WIDTH = 16  # each CLIP; both concatenated = T5's width = joint_attention_dim
_T5_WIDTH = 2 * _CLIP_WIDTH


def shapes_sd3_transformer_config() -> dict[str, Any]:
    """The transformer's constructor arguments (see the module doc)."""
    return dict(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=4,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_T5_WIDTH,
        caption_projection_dim=32,
        pooled_projection_dim=2 * _CLIP_WIDTH,
        pos_embed_max_size=16,
        qk_norm="rms_norm",
    )


def _clip():
    from transformers import CLIPTextModelWithProjection

    config = _text_config(_CLIP_WIDTH, projection_dim=_CLIP_WIDTH, layers=1)
    model = CLIPTextModelWithProjection(config)
    with torch.no_grad():
        model.text_model.embeddings.position_embedding.weight.zero_()
        model.text_projection.weight.zero_()
        # N(0, 1) instead of CLIP's N(0, 0.02^2): SD3 reads the embeddings raw (no layer norm
        # after them), and at CLIP's scale every token was drowned by the context embedder's
        # bias: after 2000 steps the text was still unused (docs/models.md)
        model.get_input_embeddings().weight.normal_()
    return model


def _t5():
    from transformers import T5Config, T5EncoderModel

    tok = tiny_t5_tokenizer()
    config = T5Config(
        vocab_size=len(tok),
        d_model=_T5_WIDTH,
        d_kv=8,
        d_ff=2 * _T5_WIDTH,
        num_layers=0,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
        is_encoder_decoder=False,
        use_cache=False,
    )
    model = T5EncoderModel(config)
    with torch.no_grad():
        model.get_input_embeddings().weight.zero_()
    return model


def _shapes_vae():
    """The ``"shapes"`` stack's trained VAE with SD3's ``shift_factor`` (0) added."""
    from diffusers import AutoencoderKL

    from .shapes_sd import SHAPES_WEIGHTS

    folder = SHAPES_WEIGHTS / "vae"
    if not folder.is_dir():
        raise ModelError(
            f"the shipped 'shapes' VAE is missing from {folder}; reinstall attnpatch (the "
            "shapes-sd3 stack starts from it)"
        )
    vae = AutoencoderKL.from_pretrained(folder, local_files_only=True)
    vae.register_to_config(shift_factor=0.0)
    return vae


def shapes_sd3(seed: int = 0, trainable: bool = False) -> DiffusionParts:
    """The ``"shapes-sd3"`` architecture: the shapes VAE (trained) and seeded random text
    encoders and transformer (what training starts from).

    ``trainable=False`` (default) freezes every network like the registry's stacks; with
    ``trainable=True`` the transformer and the CLIPs' token embeddings (only those:
    :func:`trainable_parameters`) require gradients, the VAE and T5 stay frozen.
    """
    from diffusers import SD3Transformer2DModel

    with seeded(seed):
        transformer = SD3Transformer2DModel(**shapes_sd3_transformer_config())
        clip_l = _clip()
    with seeded(seed + 1):
        clip_g = _clip()
    t5 = _t5()
    vae = freeze(_shapes_vae())
    nets = [transformer, clip_l, clip_g, freeze(t5)]
    if trainable:
        for clip in (clip_l, clip_g):
            clip.requires_grad_(False)
            clip.get_input_embeddings().weight.requires_grad_(True)
    else:
        nets = [freeze(m) for m in nets]
    return DiffusionParts(
        unet=None,
        vae=vae,
        text_encoder=nets[1],
        tokenizer=tiny_tokenizer(),
        scheduler=flow_scheduler("sd3"),
        variant="sd3",
        text_encoder_2=nets[2],
        tokenizer_2=tiny_tokenizer(),
        transformer=nets[0],
        text_encoder_3=nets[3],
        tokenizer_3=tiny_t5_tokenizer(),
    )


def trainable_parameters(parts: DiffusionParts) -> list[torch.nn.Parameter]:
    """What training updates: the transformer's parameters and both CLIPs' token embeddings."""
    params = list(parts.transformer.parameters())
    for clip in (parts.text_encoder, parts.text_encoder_2):
        params.append(clip.get_input_embeddings().weight)
    return params


def load_shapes_sd3(folder: str | Path | None = None, **kwargs: Any) -> DiffusionParts:
    """The trained stack from ``folder`` (default: the shipped :data:`SHAPES_SD3_WEIGHTS`)."""
    from .diffusion import as_parts, load_diffusers_folder

    path = Path(folder) if folder is not None else SHAPES_SD3_WEIGHTS
    return as_parts(load_diffusers_folder(path, **kwargs), str(path))
