"""Diffusion-transformer stacks (SD3 / SD3.5, Flux) in the one fixed form: folders and checks.

:func:`load_dit_folder` reads an SD3 or Flux diffusers folder offline (what
``pipe.save_pretrained`` writes or ``hf download --local-dir`` fetches);
:func:`check_dit_parts` checks that the text encoders' widths fit the transformer;
:func:`to_flow_scheduler` makes the scheduler a ``FlowMatchEulerDiscreteScheduler``.
:mod:`.diffusion` dispatches here when a stack has a ``transformer``.

Which part is which follows diffusers' pipelines (``DiffusionParts`` uses their names):

======================  =============================  =============================
field                   SD3 (``StableDiffusion3``)     Flux (``FluxPipeline``)
======================  =============================  =============================
``transformer``         ``SD3Transformer2DModel``      ``FluxTransformer2DModel``
``text_encoder``        CLIP-L, with projection        CLIP-L (``CLIPTextModel``)
``text_encoder_2``      CLIP-G, with projection        T5 (``T5EncoderModel``)
``text_encoder_3``      T5 (``T5EncoderModel``)        —
``tokenizer(_2, _3)``   CLIP, CLIP, ``T5TokenizerFast``  CLIP, ``T5TokenizerFast``
``scheduler``           ``FlowMatchEulerDiscreteScheduler`` (both)
======================  =============================  =============================
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..diffusion import DiffusionParts
from ..errors import ModelError

__all__ = ["DIT_CLASSES", "dit_variant", "load_dit_folder", "check_dit_parts", "to_flow_scheduler"]

#: diffusers transformer class -> ``DiffusionParts.variant``.
DIT_CLASSES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}
#: The sub-folders of each family's diffusers folder.
_FOLDERS = {
    "sd3": ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3",
            "tokenizer", "tokenizer_2", "tokenizer_3", "scheduler"),
    "flux": ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
             "scheduler"),
}  # fmt: skip


def dit_variant(transformer: Any) -> str:
    """``"sd3"`` or ``"flux"`` from the transformer's class (through its MRO)."""
    for cls in type(transformer).__mro__:
        if cls.__name__ in DIT_CLASSES:
            return DIT_CLASSES[cls.__name__]
    raise ModelError(
        f"the transformer is a {type(transformer).__name__}; attnpatch runs "
        f"{sorted(DIT_CLASSES)} (SD3 / SD3.5, Flux)"
    )


def to_flow_scheduler(parts: DiffusionParts) -> None:
    """Make ``parts.scheduler`` a ``FlowMatchEulerDiscreteScheduler`` (from its config)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if not isinstance(parts.scheduler, FlowMatchEulerDiscreteScheduler):
        parts.scheduler = FlowMatchEulerDiscreteScheduler.from_config(parts.scheduler.config)


def _width(encoder: Any, key: str) -> int:
    value = getattr(encoder.config, key, None)
    if value is None:
        raise ModelError(
            f"the text encoder {type(encoder).__name__} has no {key}; pass the text encoders in "
            "the pipeline's order (SD3: CLIP-L, CLIP-G, T5; Flux: CLIP-L, T5)"
        )
    return int(value)


def check_dit_parts(parts: DiffusionParts, spec: Any) -> None:
    """The text encoders fit the transformer: T5's width is its ``joint_attention_dim`` and the
    pooled width its ``pooled_projection_dim`` (SD3: both CLIPs' projections; Flux: CLIP-L's
    hidden size); the encoders are in the pipeline's order."""
    cfg = parts.transformer.config
    encoders = parts.text_encoders
    expected = 3 if parts.variant == "sd3" else 2
    if len(encoders) != expected:
        raise ModelError(
            f"diffusion stack {spec!r}: {parts.variant} needs {expected} text encoders, got "
            f"{len(encoders)}; load text_encoder ... text_encoder_{expected} of the model"
        )
    t5 = encoders[-1]
    if _width(t5, "d_model") != cfg.joint_attention_dim:
        raise ModelError(
            f"diffusion stack {spec!r}: the transformer's joint_attention_dim is "
            f"{cfg.joint_attention_dim} but the T5 encoder is {_width(t5, 'd_model')} wide; load "
            "the T5 encoder of the same model"
        )
    if parts.variant == "sd3":
        pooled = sum(_width(e, "projection_dim") for e in encoders[:2])
    else:
        pooled = _width(encoders[0], "hidden_size")
    if pooled != cfg.pooled_projection_dim:
        raise ModelError(
            f"diffusion stack {spec!r}: the transformer's pooled_projection_dim is "
            f"{cfg.pooled_projection_dim} but the CLIP encoder(s) give {pooled}; load the CLIP "
            "encoders of the same model"
        )


def load_dit_folder(root: Path, per_part: dict[str, torch.dtype | None]) -> DiffusionParts:
    """Read an SD3 or Flux diffusers folder (``transformer/`` present) offline.

    The family is read from ``transformer/config.json``'s ``_class_name``; each part loads with
    its class (see the module docstring) in ``per_part``'s dtype (``"unet"``: the transformer).
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

    config = root / "transformer" / "config.json"
    try:
        class_name = json.loads(config.read_text()).get("_class_name")
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {config}: {e}; re-save or re-download the folder") from e
    variant = DIT_CLASSES.get(class_name)
    if variant is None:
        raise ModelError(
            f"{str(root)!r} holds a {class_name} transformer; attnpatch loads "
            f"{sorted(DIT_CLASSES)} folders (SD3 / SD3.5, Flux)"
        )
    missing = [d for d in _FOLDERS[variant] if not (root / d).is_dir()]
    if missing:
        raise ModelError(
            f"{str(root)!r} is not a complete {variant} diffusers folder: {missing} missing. Pass "
            f"the folder that holds {list(_FOLDERS[variant])} (e.g. from save_pretrained or "
            "hf download --local-dir)"
        )
    kw: dict[str, Any] = {"local_files_only": True}
    text = per_part["text_encoder"]
    try:
        transformer = _transformer_class(variant).from_pretrained(
            root / "transformer", torch_dtype=per_part["unet"], **kw
        )
        vae = AutoencoderKL.from_pretrained(root / "vae", torch_dtype=per_part["vae"], **kw)
        encoders, tokenizers = _text_parts(variant, root, text, kw)
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(
            FlowMatchEulerDiscreteScheduler.load_config(root / "scheduler")
        )
    except (OSError, ValueError) as e:
        raise ModelError(
            f"cannot load the diffusers folder {str(root)!r}: {type(e).__name__}: {e}. Check "
            "that its weights and configs are complete (re-download or re-save it)"
        ) from e
    extra = (
        {"text_encoder_3": encoders[2], "tokenizer_3": tokenizers[2]} if variant == "sd3" else {}
    )
    return DiffusionParts(
        unet=None,
        vae=vae,
        text_encoder=encoders[0],
        tokenizer=tokenizers[0],
        scheduler=scheduler,
        variant=variant,
        text_encoder_2=encoders[1],
        tokenizer_2=tokenizers[1],
        transformer=transformer,
        **extra,
    )


def _transformer_class(variant: str) -> Any:
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    return SD3Transformer2DModel if variant == "sd3" else FluxTransformer2DModel


def _text_parts(
    variant: str, root: Path, dtype: torch.dtype | None, kw: dict[str, Any]
) -> tuple[list[Any], list[Any]]:
    from transformers import (
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5EncoderModel,
        T5TokenizerFast,
    )

    if variant == "sd3":
        classes = [CLIPTextModelWithProjection, CLIPTextModelWithProjection, T5EncoderModel]
        tokenizer_classes = [CLIPTokenizer, CLIPTokenizer, T5TokenizerFast]
    else:
        classes = [CLIPTextModel, T5EncoderModel]
        tokenizer_classes = [CLIPTokenizer, T5TokenizerFast]
    names = ["", "_2", "_3"][: len(classes)]
    encoders = [
        cls.from_pretrained(root / f"text_encoder{n}", dtype=dtype, **kw)
        for cls, n in zip(classes, names)
    ]
    tokenizers = [
        cls.from_pretrained(root / f"tokenizer{n}", **kw)
        for cls, n in zip(tokenizer_classes, names)
    ]
    return encoders, tokenizers
