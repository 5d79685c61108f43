"""Real-size diffusion-transformer stacks for ``bench_sd_scale.py`` (random weights, no text
encoders), and the tiny stand-ins that exercise the same code in tests.

* ``sd3``: SD3-medium's transformer (``attnpatch.families.REFERENCE_TRANSFORMER_CONFIGS
  ["sd3-medium"]``, 2.03 B parameters) and SD3's ``AutoencoderKL`` (16 latent channels, no
  quant convs, factor 8, 84 M); prompt embeddings of SD3's shapes: ``(1, 77 + 256, 4096)``
  ``[CLIP; T5]`` tokens and a ``(1, 2048)`` pooled projection.
* ``flux-reduced``: Flux-dev's transformer at full width (24 heads x 128, 3072) but with
  ``--flux-blocks D S`` double- and single-stream blocks instead of 19 and 38, and Flux's VAE;
  embeddings ``(1, 512, 4096)`` T5 tokens and a ``(1, 768)`` CLIP pooled projection; embedded
  guidance 3.5 (Flux-dev's default).
* ``tiny-sd3`` / ``tiny-flux``: ``attnpatch.testing.tiny_sd3`` / ``tiny_flux`` (their
  transformers and VAEs; embeddings of their widths; ``tiny-flux`` at ``--flux-blocks``'
  depth): seconds, for CI.

The text encoders are left out on purpose (as the UNet rows leave CLIP out): an attack encodes
its prompts once, outside the iteration, so only the embeddings' shapes matter here, and random
embeddings of the right shapes cost the transformer exactly what real ones do.

Weights are built on the ``meta`` device and materialised directly in their dtype (no fp32
copy of a bf16 model, no slow default initialisers): matrices ``N(0, 0.02)``, biases 0, other
vectors 1. Random weights: the numbers measure memory and time, not what the model does.
"""

from __future__ import annotations

from typing import Any

#: The SD 1.x / 2.x / SDXL ``AutoencoderKL`` (``vae/config.json``; SDXL differs only in
#: ``scaling_factor``); ``bench_sd_scale.py``'s UNet rows use it as is.
SD_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
)

#: SD3's / Flux's ``vae/config.json``: SD's ``AutoencoderKL`` with 16 latent channels and no
#: quant convs (they differ from each other in their factors only)
DIT_VAE_CONFIG: dict[str, Any] = dict(
    SD_VAE_CONFIG,
    latent_channels=16,
    sample_size=1024,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
#: (scaling_factor, shift_factor) of the VAEs
DIT_VAE_FACTORS = {"sd3": (1.5305, 0.0609), "flux": (0.3611, 0.1159)}
#: model -> (reference name, variant, text tokens)
DIT_MODELS = {
    "sd3": ("sd3-medium", "sd3", 77 + 256),
    "flux-reduced": ("flux-dev", "flux", 512),
    "tiny-sd3": (None, "sd3", 77 + 16),
    "tiny-flux": (None, "flux", 32),
}
#: Flux-dev's depth (double, single)
FLUX_DEV_BLOCKS = (19, 38)


def _materialise(module: Any, dtype: Any, device: str) -> Any:
    """A meta-device module's storage, allocated in ``dtype`` on ``device`` and filled."""
    import torch

    module = module.to(dtype).to_empty(device=device)  # dtype first: no float32 copy
    if torch.device(device).type == "meta":  # shapes only (the tests)
        return module.eval().requires_grad_(False)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=gen)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
        for b in module.buffers():  # SD3's sin-cos position table: zeros (random model)
            if b.is_floating_point():
                b.zero_()
    return module.eval().requires_grad_(False)


def build_dit(model: str, dtype: Any, device: str, blocks: tuple[int, int] = (2, 4)):
    """``DiffusionParts`` of a DiT ``model`` (see the module docstring), frozen, in ``dtype``
    (the VAE in float32 under float16, as ``attnpatch.diffusion.part_dtypes`` says)."""
    import diffusers
    import torch

    from attnpatch.diffusion import DiffusionParts, part_dtypes
    from attnpatch.families import REFERENCE_TRANSFORMER_CONFIGS
    from attnpatch.models.tiny_dit import flow_scheduler
    from attnpatch.testing import tiny_flux, tiny_sd3

    ref, variant, _ = DIT_MODELS[model]
    dtypes = part_dtypes(dtype)
    if ref is None:
        tiny = (tiny_sd3 if variant == "sd3" else tiny_flux)()
        transformer = tiny.transformer
        if variant == "flux":  # the tiny widths at the depth asked for
            config = {**transformer.config, "num_layers": blocks[0]}
            torch.manual_seed(0)
            transformer = type(transformer).from_config({**config, "num_single_layers": blocks[1]})
            transformer = transformer.eval().requires_grad_(False)
        transformer = transformer.to(device, dtypes["unet"])
        vae = tiny.vae.to(device, dtypes["vae"])
    else:
        cls_name, config = REFERENCE_TRANSFORMER_CONFIGS[ref]
        config = dict(config)
        if variant == "flux":
            config.update(num_layers=blocks[0], num_single_layers=blocks[1])
        scaling, shift = DIT_VAE_FACTORS[variant]
        with torch.device("meta"):
            transformer = getattr(diffusers, cls_name)(**config)
            vae = diffusers.AutoencoderKL(
                **DIT_VAE_CONFIG, scaling_factor=scaling, shift_factor=shift
            )
        transformer = _materialise(transformer, dtypes["unet"], device)
        vae = _materialise(vae, dtypes["vae"], device)
    return DiffusionParts(
        unet=None,
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        scheduler=flow_scheduler(variant),
        variant=variant,
        transformer=transformer,
    )


def dit_embeds(parts: Any, model: str, device: Any, generator: Any):
    """Random ``PromptEmbeds`` of the shapes the model's text encoders give (cond, uncond,
    pooled, uncond pooled; batch 1)."""
    import torch

    from attnpatch.diffusion import PromptEmbeds

    config = parts.transformer.config
    tokens = DIT_MODELS[model][2]
    width, pooled = config.joint_attention_dim, config.pooled_projection_dim

    def rnd(*shape):
        return torch.randn(*shape, generator=generator).to(device)

    return PromptEmbeds(
        rnd(1, tokens, width), rnd(1, tokens, width), rnd(1, pooled), rnd(1, pooled)
    )


def dit_blocks(parts: Any) -> tuple[int, int]:
    """(joint / double-stream blocks, single-stream blocks) of the stack's transformer."""
    net = parts.transformer
    return len(net.transformer_blocks), len(getattr(net, "single_transformer_blocks", ()))


def flux_per_block(results: list[dict]) -> list[str]:
    """From ``flux-reduced`` rows at two or more depths (same px, steps, memory, dtype): the
    growth and seconds per block (a least-squares line in the block count: a double-stream
    block's input, image + text tokens, is the size of a single-stream block's, so both count
    alike) and, *computed*, what Flux-dev's 19 + 38 blocks need: the weights (the parameter count
    of the meta-device model times the dtype's bytes) plus the extrapolated growth."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        if r["model"] in ("flux-reduced", "tiny-flux") and "blocks" in r:
            key = (r["model"], r["px"], tuple(r["steps"]), r["guidance"], r["memory"], r["dtype"])
            groups.setdefault(key, []).append(r)
    lines = []
    for key, rows in groups.items():
        if len({sum(r["blocks"]) for r in rows}) < 2:
            continue
        n = [sum(r["blocks"]) for r in rows]

        def fit(ys: list[float]) -> tuple[float, float]:
            mx, my = sum(n) / len(n), sum(ys) / len(ys)
            slope = sum((x - mx) * (y - my) for x, y in zip(n, ys)) / sum((x - mx) ** 2 for x in n)
            return my - slope * mx, slope

        g0, g1 = fit([r["growth_gib"] for r in rows])
        s0, s1 = fit([r["seconds"] for r in rows])
        full = sum(FLUX_DEV_BLOCKS)
        line = (
            f"{key[0]} {key[1]} px N/k {key[2][0]}/{key[2][1]} CFG {key[3]:g} {key[4]} "
            f"{key[5]}: growth {g0:.2f} + {g1:.3f} GiB per block, {s0:.1f} + {s1:.1f} s per "
            "block"
        )
        if key[0] == "flux-reduced":  # the tiny widths say nothing about Flux-dev
            weights = _flux_dev_weights_gib(rows[0]["dtype"])
            growth = g0 + g1 * full
            line += (
                f"; COMPUTED for Flux-dev ({FLUX_DEV_BLOCKS[0]} + {FLUX_DEV_BLOCKS[1]} blocks):"
                f" growth {growth:.2f} GiB + transformer weights {weights:.2f} GiB = "
                f"{growth + weights:.2f} GiB (VAE and text encoders not counted), "
                f"{s0 + s1 * full:.0f} s on this machine"
            )
        lines.append(line)
    return lines


def _flux_dev_weights_gib(dtype: str) -> float:
    """Flux-dev's transformer weights in ``dtype``, from its parameter count on the meta device."""
    import torch

    from attnpatch.families import reference_summary

    size = torch.empty(0, dtype=getattr(torch, dtype.split("+")[0])).element_size()
    if "+autocast" in dtype:
        size = 4
    return reference_summary("flux-dev")["parameters"] * size / 2**30
