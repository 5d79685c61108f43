"""Diffusion stacks in one fixed form: local diffusers folders, conversion and checks.

:func:`load_diffusers_folder` reads a model folder offline (SD1.x / SD2.x / SDXL here; SD3 and
Flux folders, which hold ``transformer/``, in :mod:`.dit`); :func:`as_parts` turns whatever a
factory returned into a :class:`~attnpatch.diffusion.DiffusionParts` with a ``DDIMScheduler``
(UNet stacks) or a ``FlowMatchEulerDiscreteScheduler`` (DiT stacks), every network frozen and
in eval mode, and the text encoder width(s) checked against the network.
"""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from .._util import freeze
from ..diffusion import DiffusionParts, part_dtypes
from ..errors import InputError, ModelError
from .dit import check_dit_parts, dit_variant, load_dit_folder, to_flow_scheduler

__all__ = ["load_diffusers_folder", "as_parts", "detect_variant"]

_PART_FIELDS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_DIT_FIELDS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")


def as_parts(obj: Any, spec: Any) -> DiffusionParts:
    """``obj`` (a ``DiffusionParts`` or any object with its fields) -> a checked ``DiffusionParts``.

    The scheduler becomes a ``DDIMScheduler`` (UNet stacks) or a
    ``FlowMatchEulerDiscreteScheduler`` (DiT stacks: ``transformer`` set), every network is
    frozen and in eval mode, a missing ``variant`` is read from the UNet config
    (:func:`detect_variant`) or the transformer's class. ``spec`` names the source in errors:
    missing fields, text encoder width(s) that do not fit the network, an unknown variant. A
    diffusers pipeline object (``StableDiffusion3Pipeline``, ``FluxPipeline``, SD pipelines)
    has these fields too.
    """
    if isinstance(obj, DiffusionParts):
        parts = obj
    else:
        dit = getattr(obj, "transformer", None) is not None
        needed = _DIT_FIELDS if dit else _PART_FIELDS
        missing = [f for f in needed if getattr(obj, f, None) is None]
        if missing:
            raise ModelError(
                f"diffusion spec {spec!r} gave a {type(obj).__name__} without {missing}; return "
                "a DiffusionParts(unet, vae, text_encoder, tokenizer, scheduler, variant) (a DiT "
                "stack: unet=None and transformer=...)"
            )
        kw = {f.name: getattr(obj, f.name, None) for f in fields(DiffusionParts)}
        if dit:
            kw["unet"] = None
        kw["variant"] = kw["variant"] or (dit_variant(obj.transformer) if dit else None)
        kw["variant"] = kw["variant"] or detect_variant(obj.unet)
        parts = DiffusionParts(**kw)
    if parts.is_dit:
        if parts.transformer is None:
            raise ModelError(
                f"diffusion stack {spec!r}: variant {parts.variant!r} needs parts.transformer "
                "(an SD3Transformer2DModel or FluxTransformer2DModel), got None"
            )
        if dit_variant(parts.transformer) != parts.variant:
            raise ModelError(
                f"diffusion stack {spec!r}: variant {parts.variant!r} does not match its "
                f"{type(parts.transformer).__name__}; pass variant={dit_variant(parts.transformer)!r}"
            )
        to_flow_scheduler(parts)
    else:
        _to_ddim(parts)
    for m in parts.modules():
        freeze(m)
    if parts.is_dit:
        check_dit_parts(parts, spec)
    else:
        _check_parts(parts, spec)
    return parts


def _to_ddim(parts: DiffusionParts) -> None:
    from diffusers import DDIMScheduler

    if not isinstance(parts.scheduler, DDIMScheduler):
        parts.scheduler = DDIMScheduler.from_config(parts.scheduler.config)


def detect_variant(unet: Any) -> str:
    """``"sdxl"`` for text-time conditioning, ``"sd2"`` for linear projections, else ``"sd15"``."""
    cfg = unet.config
    if getattr(cfg, "addition_embed_type", None) == "text_time":
        return "sdxl"
    if getattr(cfg, "use_linear_projection", False):
        return "sd2"
    return "sd15"


def _check_parts(parts: DiffusionParts, spec: Any) -> None:
    widths = [te.config.hidden_size for te in parts.text_encoders]
    cross = parts.unet.config.cross_attention_dim
    if sum(widths) != cross:
        raise ModelError(
            f"diffusion stack {spec!r}: the UNet's cross_attention_dim is {cross} but the text "
            f"encoder(s) give {widths} (sum {sum(widths)}); load the text encoder(s) of the same "
            "model (SDXL needs text_encoder and text_encoder_2)"
        )
    if parts.variant not in ("sd15", "sd2", "sdxl"):
        raise ModelError(
            f"diffusion stack {spec!r}: variant must be 'sd15', 'sd2' or 'sdxl' for a UNet "
            f"('sd3' or 'flux' with a transformer), got {parts.variant!r}"
        )


def load_diffusers_folder(
    folder: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    torch_dtype: torch.dtype | str | None = None,
    variant: str | None = None,
) -> DiffusionParts:
    """Read a diffusers model folder offline (``local_files_only=True``): SD1.x, SD2.x, SDXL,
    and SD3 / SD3.5 / Flux (a folder with ``transformer/``: :func:`.dit.load_dit_folder`).

    The folder holds ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``
    (and for SDXL ``text_encoder_2/``, ``tokenizer_2/``): what ``save_pretrained`` writes, or
    ``hf download <repo> --local-dir <folder>`` fetches, or a snapshot of the Hugging Face
    cache (:mod:`.hub`). Weights load as
    ``safetensors`` when present. The variant is read from the UNet config (see
    :func:`detect_variant`); the scheduler is built as a ``DDIMScheduler`` from
    ``scheduler/scheduler_config.json`` whatever class it names (``prediction_type`` kept).
    A second encoder is loaded only when ``text_encoder_2/`` exists, as
    ``CLIPTextModelWithProjection``.

    ``torch_dtype`` (``float32``, ``float16``, ``bfloat16``) is diffusers' / transformers' own
    loading dtype, per part as :func:`attnpatch.diffusion.part_dtypes` says: the UNet and the
    text encoder(s) in it, the VAE in float32 under float16 (the SD VAE overflows in float16).
    ``dtype`` loads every part in one dtype (the older switch). ``variant`` is diffusers' and
    transformers' weights variant (``"fp16"``: ``unet/diffusion_pytorch_model.fp16.safetensors``).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    root = Path(folder).expanduser()
    if root.is_file():
        raise ModelError(
            f"{str(root)!r} is a single file; attnpatch reads diffusers model folders. Convert "
            "it once: StableDiffusionPipeline.from_single_file(path).save_pretrained(folder)"
        )
    kw: dict[str, Any] = {"local_files_only": True}
    wkw = {**kw, "variant": variant} if variant else kw  # the networks' weights files
    if torch_dtype is not None:
        if dtype is not None:
            raise InputError("pass torch_dtype= or dtype=, not both")
        per_part = part_dtypes(torch_dtype)
    else:
        per_part = {"unet": dtype, "vae": dtype, "text_encoder": dtype}
    if (root / "transformer").is_dir():
        return load_dit_folder(root, per_part)
    needed = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]
    missing = [d for d in needed if not (root / d).is_dir()]
    if missing:
        raise ModelError(
            f"{str(root)!r} is not a complete diffusers model folder: {missing} missing. Pass the "
            f"folder that holds {needed} (e.g. from save_pretrained or hf download "
            "--local-dir)"
        )
    dtype = per_part["text_encoder"]
    try:
        unet = UNet2DConditionModel.from_pretrained(
            root / "unet", torch_dtype=per_part["unet"], **wkw
        )
        vae = AutoencoderKL.from_pretrained(root / "vae", torch_dtype=per_part["vae"], **wkw)
        variant = detect_variant(unet)
        has_second = (root / "text_encoder_2").is_dir()
        if has_second:
            text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", dtype=dtype, **wkw)
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
                root / "text_encoder_2", dtype=dtype, **wkw
            )
            tokenizer_2 = CLIPTokenizer.from_pretrained(root / "tokenizer_2", **kw)
        else:
            cls = CLIPTextModelWithProjection if variant == "sdxl" else CLIPTextModel
            text_encoder = cls.from_pretrained(root / "text_encoder", dtype=dtype, **wkw)
            text_encoder_2 = tokenizer_2 = None
        tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer", **kw)
        scheduler = DDIMScheduler.from_config(DDIMScheduler.load_config(root / "scheduler"))
    except (OSError, ValueError) as e:
        raise ModelError(
            f"cannot load the diffusers folder {str(root)!r}: {type(e).__name__}: {e}. Check "
            "that its weights and configs are complete (re-download or re-save it)"
        ) from e
    return DiffusionParts(
        unet, vae, text_encoder, tokenizer, scheduler, variant, text_encoder_2, tokenizer_2
    )
