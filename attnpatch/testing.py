"""Tiny, offline, deterministic models for trying the library and for tests.

A re-export of :mod:`attnpatch.models.tiny` and :mod:`attnpatch.models.shapes_classifier` (the
builders live in the model layer, beside the registry that names them): tiny SD stacks
(``tiny_sd("sd15" | "sd2" | "sdxl")``, a :class:`~attnpatch.diffusion.DiffusionParts`), their
components, the tiny classifier, ``mid_unet()`` for CPU benchmarks and ``reference_unet()`` for
real models' architectures on the meta device; ``clip_tokenizer()`` is SD's real 49408-token CLIP
tokenizer, built offline from open-clip-torch's vocabulary file. Diffusion transformers:
``tiny_sd3()`` / ``tiny_flux()`` (:mod:`attnpatch.models.tiny_dit`) and their parts,
``tiny_t5_tokenizer()`` (a T5-convention SentencePiece tokenizer estimated from the shapes
captions: :mod:`attnpatch.models.t5_unigram`).
``save_to_hub_cache()`` writes a
stack into a Hugging Face cache as ``hf download`` would (hub ids offline).

>>> sd = tiny_sd("sd15")
>>> sd.unet.config.cross_attention_dim == sd.text_encoder.config.hidden_size
True
"""

from .models.clip_bpe import clip_tokenizer
from .models.hub import save_to_hub_cache
from .models.shapes_classifier import TinyClassifier, tiny_classifier
from .models.t5_unigram import tiny_t5_tokenizer
from .models.tiny import (
    REFERENCE_UNET_CONFIGS,
    VARIANTS,
    VOCAB_WORDS,
    mid_unet,
    reference_unet,
    save_tiny_sd,
    tiny_scheduler,
    tiny_sd,
    tiny_text_encoder,
    tiny_tokenizer,
    tiny_unet,
    tiny_vae,
)
from .models.tiny_dit import flow_scheduler, save_tiny_dit, tiny_flux, tiny_sd3, tiny_t5_encoder

__all__ = [
    "tiny_sd",
    "tiny_unet",
    "tiny_vae",
    "tiny_text_encoder",
    "tiny_tokenizer",
    "clip_tokenizer",
    "tiny_t5_tokenizer",
    "tiny_t5_encoder",
    "tiny_sd3",
    "tiny_flux",
    "flow_scheduler",
    "save_tiny_dit",
    "tiny_scheduler",
    "tiny_classifier",
    "TinyClassifier",
    "mid_unet",
    "save_tiny_sd",
    "save_to_hub_cache",
    "VOCAB_WORDS",
    "VARIANTS",
    "REFERENCE_UNET_CONFIGS",
    "reference_unet",
]
