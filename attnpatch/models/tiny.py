"""Tiny, offline, deterministic Stable Diffusion stacks and their components.

Nothing here downloads anything: every component is built from a config with seeded random
weights; building them leaves the caller's global RNG state as it was. Use them to try
the library without weights, and in tests. The tiny classifier lives in
:mod:`attnpatch.models.shapes_classifier`.

>>> sd = tiny_sd("sd15")
>>> sd.unet.config.cross_attention_dim == sd.text_encoder.config.hidden_size
True

Variants (``tiny_sd(variant)``):

* ``"sd15"`` – the block structure diffusers' own SD tests use: UNet channels (4, 8), one
  cross-attention level, 8 "heads" (SD1.x naming), epsilon prediction, DDIM with SD1.5 settings.
* ``"sd2"`` – SD2.x-shaped: ``upcast_attention=True``, ``use_linear_projection=True``,
  ``attention_head_dim`` given as a per-level list of head counts, ``v_prediction``.
* ``"sdxl"`` – SDXL-shaped: ``addition_embed_type="text_time"`` (the UNet needs
  ``added_cond_kwargs={"text_embeds", "time_ids"}``), transformer depth 2, a projecting text
  encoder whose pooled output feeds ``text_embeds``.

``mid_unet()`` builds a larger UNet with SD1.5's block structure (four levels, two layers per
block, 8 heads, reduced widths) for CPU benchmarks; ``reference_unet()`` a real model's UNet
architecture (on the meta device by default).

All components can be written with ``save_pretrained`` (see :func:`save_tiny_sd`) and read back
with ``attnpatch.models.load_diffusion(folder)`` (``from_pretrained``, offline), which is how
the library loads real models.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .._util import freeze, seeded
from ..diffusion import DiffusionParts
from ..errors import InputError, ModelError

__all__ = [
    "tiny_sd",
    "tiny_unet",
    "tiny_vae",
    "tiny_text_encoder",
    "tiny_tokenizer",
    "tiny_scheduler",
    "mid_unet",
    "save_tiny_sd",
    "VOCAB_WORDS",
    "VARIANTS",
    "REFERENCE_UNET_CONFIGS",
    "reference_unet",
]

VARIANTS = ("sd15", "sd2", "sdxl")

#: Words that the tiny tokenizer knows as single tokens. Other words are split into byte
#: tokens, as real CLIP splits rare words, so multi-token words occur naturally. The order
#: fixes the token ids (and the seeded text encoders' weights). A split string, not a list
#: literal, so the formatter keeps it compact.
VOCAB_WORDS: list[str] = """
    a an the of in on at with and
    photo picture image painting drawing close up view
    red green blue yellow orange purple white black gray pink brown
    circle square triangle star cross ring diamond stripe dot shape
    cat dog bird car plane ship truck horse frog deer tench goldfish shark
    background texture noise patch sticker
""".split()  # noqa: SIM905


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map (the byte-level alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word's symbols with the given merge ranks."""
    while len(symbols) > 1:
        pairs = [
            (ranks.get(p, len(ranks) + 1), i, p) for i, p in enumerate(zip(symbols, symbols[1:]))
        ]
        rank, i, pair = min(pairs)
        if pair not in ranks:
            break
        symbols = symbols[:i] + [pair[0] + pair[1]] + symbols[i + 2 :]
    return symbols


def tiny_tokenizer(model_max_length: int = 77):
    """A CLIPTokenizer with a byte-level vocabulary built in code (no files).

    The vocabulary holds the 256 byte symbols, their end-of-word forms, merges that make each
    word of :data:`VOCAB_WORDS` one token, and ``<|startoftext|>`` / ``<|endoftext|>`` (the
    pad token, as in SD1.x) as the last two ids. Prompts are padded to ``model_max_length``.
    """
    from transformers import CLIPTokenizer

    alphabet = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for sym in alphabet + [s + "</w>" for s in alphabet]:
        vocab.setdefault(sym, len(vocab))
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in VOCAB_WORDS:
        # Run BPE with the merges so far; chain the leftover pieces with new, lowest-priority
        # merges. Earlier words keep their single token: a new merge never outranks old ones.
        symbols = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            symbols = [pair[0] + pair[1]] + symbols[2:]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def _text_config(hidden_size: int, projection_dim: int | None = None, layers: int = 2):
    """A CLIP text config for :func:`tiny_tokenizer`'s vocabulary (2 heads, MLP 2x wide)."""
    from transformers import CLIPTextConfig

    tok = tiny_tokenizer()
    kwargs: dict[str, Any] = dict(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_attention_heads=2,
        num_hidden_layers=layers,
        vocab_size=len(tok),
        max_position_embeddings=tok.model_max_length,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    if projection_dim is not None:
        kwargs["projection_dim"] = projection_dim
    return CLIPTextConfig(**kwargs)


def tiny_text_encoder(variant: str = "sd15", seed: int = 0):
    """A 2-layer CLIP text encoder matching ``tiny_unet(variant)``'s cross-attention width.

    For ``"sdxl"`` it is a ``CLIPTextModelWithProjection`` whose ``text_embeds`` feed the UNet's
    ``added_cond_kwargs["text_embeds"]``.
    """
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    _check_variant(variant)
    with seeded(seed):
        if variant == "sdxl":
            model = CLIPTextModelWithProjection(_text_config(16, projection_dim=16))
        else:
            model = CLIPTextModel(_text_config(8 if variant == "sd15" else 16))
    return freeze(model)


def _unet_config(variant: str, sample_size: int = 32, deep: bool = False) -> dict[str, Any]:
    common = dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )
    if deep:
        if variant != "sd15":
            raise InputError("deep=True exists for the sd15 variant only")
        return dict(
            common,
            block_out_channels=(4, 8, 8),
            cross_attention_dim=8,
            attention_head_dim=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        )
    if variant == "sd15":
        return dict(common, block_out_channels=(4, 8), cross_attention_dim=8)
    if variant == "sd2":
        return dict(
            common,
            block_out_channels=(8, 16),
            cross_attention_dim=16,
            attention_head_dim=(2, 4),  # SD2 configs: these are head counts
            use_linear_projection=True,
            upcast_attention=True,
        )
    return dict(  # sdxl
        common,
        block_out_channels=(8, 16),
        cross_attention_dim=16,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=16 + 6 * 4,
    )


def tiny_unet(variant: str = "sd15", seed: int = 0, sample_size: int = 32, deep: bool = False):
    """A tiny ``UNet2DConditionModel`` in eval mode with frozen weights (see module doc).

    ``deep=True`` (sd15 only) adds a third level, so attention runs at two resolutions
    (latent/2 and latent/4) in down, mid and up blocks: 14 attention layers instead of 8.
    """
    from diffusers import UNet2DConditionModel

    _check_variant(variant)
    with seeded(seed):
        unet = UNet2DConditionModel(**_unet_config(variant, sample_size, deep))
    return freeze(unet)


def mid_unet(seed: int = 0, width: int = 32, cross_attention_dim: int = 64):
    """A UNet with SD1.5's block structure at reduced width, for CPU benchmarks.

    Four levels (three cross-attention down blocks, one plain; mirrored up blocks), two layers
    per block, 8 heads, channels ``(width, 2*width, 4*width, 4*width)``: 16 attention layers like
    SD1.5's, at a fraction of its cost.
    """
    from diffusers import UNet2DConditionModel

    with seeded(seed):
        unet = UNet2DConditionModel(
            sample_size=64,
            block_out_channels=(width, 2 * width, 4 * width, 4 * width),
            layers_per_block=2,
            norm_num_groups=8,
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=8,
        )
    return freeze(unet)


#: Public UNet configs of real models (architecture only: no weights), for tracing attention
#: sites and for benchmarks with SD-sized UNets. Values from the models' ``unet/config.json``.
REFERENCE_UNET_CONFIGS: dict[str, dict[str, Any]] = {
    "sd15": dict(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        attention_head_dim=8,
        cross_attention_dim=768,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ),
    "sd21": dict(
        sample_size=96,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        attention_head_dim=(5, 10, 20, 20),  # head counts, despite the name
        cross_attention_dim=1024,
        use_linear_projection=True,
        upcast_attention=True,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ),
    "sdxl": dict(
        sample_size=128,
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        transformer_layers_per_block=(1, 2, 10),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    ),
}


def reference_unet(
    name: str, device: str | torch.device = "meta", dtype: torch.dtype | None = None
):
    """A real model's UNet architecture (``"sd15"``, ``"sd21"``, ``"sdxl"``) with random or no weights.

    On the ``"meta"`` device (default) nothing is allocated: forward passes compute shapes only,
    which is how ``trace_attention`` documents SD-sized UNets on a laptop. On a real device the
    weights are random (fine for speed and memory benchmarks, useless for images).
    """
    from diffusers import UNet2DConditionModel

    if name not in REFERENCE_UNET_CONFIGS:
        raise ModelError(
            f"unknown reference UNet {name!r}; choose one of {sorted(REFERENCE_UNET_CONFIGS)}"
        )
    with torch.device(device):
        unet = UNet2DConditionModel(**REFERENCE_UNET_CONFIGS[name])
    if dtype is not None:
        unet = unet.to(dtype)
    return freeze(unet)


def tiny_vae(seed: int = 0):
    """A tiny ``AutoencoderKL``: channels (4, 8), 4 latent channels, downsampling factor 2."""
    from diffusers import AutoencoderKL

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
        )
    return freeze(vae)


def tiny_scheduler(variant: str = "sd15"):
    """A ``DDIMScheduler`` with SD1.5's settings (``v_prediction`` for ``"sd2"``)."""
    from diffusers import DDIMScheduler

    _check_variant(variant)
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction" if variant == "sd2" else "epsilon",
    )


def tiny_sd(variant: str = "sd15", seed: int = 0, deep: bool = False) -> DiffusionParts:
    """Every part of a tiny SD stack of ``variant`` (``"sd15"``, ``"sd2"`` or ``"sdxl"``)."""
    _check_variant(variant)
    return DiffusionParts(
        unet=tiny_unet(variant, seed, deep=deep),
        vae=tiny_vae(seed),
        text_encoder=tiny_text_encoder(variant, seed),
        tokenizer=tiny_tokenizer(),
        scheduler=tiny_scheduler(variant),
        variant=variant,
    )


def save_tiny_sd(sd: DiffusionParts, folder: str | os.PathLike) -> str:
    """Write ``sd`` as a diffusers model folder (``unet/``, ``vae/``, ``text_encoder/``,
    ``tokenizer/``, ``scheduler/``) that ``attnpatch.models.load_diffusion(folder)`` reads."""
    folder = os.fspath(folder)
    sd.unet.save_pretrained(os.path.join(folder, "unet"))
    sd.vae.save_pretrained(os.path.join(folder, "vae"))
    sd.text_encoder.save_pretrained(os.path.join(folder, "text_encoder"))
    sd.tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    sd.scheduler.save_pretrained(os.path.join(folder, "scheduler"))
    return folder


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ModelError(f"unknown tiny variant {variant!r}; choose one of {VARIANTS}")
