"""The attention pipeline, as one composable step.

    images (B, 3, H, W) in [0, 1]
      -> to_diffusion_input      (B, 3, h, w) in [-1, 1]
      -> vae_encode              z0 (B, C, h/f, w/f)
      -> invert (with grad)      zT: the clean latent pushed up k steps
      -> with hijack(denoiser, store): denoise      (hijack removed on exit)
      -> store: cross-attention maps (all resolutions) and self-attention maps (chosen ones)

The loops are the denoiser's family's (:attr:`attnpatch.families.Family.scheduler`):
``ddim_invert`` / ``ddim_denoise`` for UNets (SD 1.x / 2.x / XL), ``flow_invert`` /
``flow_denoise`` for diffusion transformers (SD3 / SD3.5, Flux), whose joint attention the
hijack splits into the same ``"cross"`` (image queries, text keys: ``(B, h, w, T_text)`` at the
token grid) and ``"self"`` maps. Every step is a public function of the library; this class
only wires them and remembers the choices (steps, guidance, resolutions). Gradients flow from
the stored maps back to ``images``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .._util import as_pair
from ..errors import AttnPatchError, InputError, ModelError
from ..families import family_of
from ..hooks import (
    AttentionControl,
    AttentionStore,
    ComposeControl,
    Resolution,
    hijack,
    pick_cross_resolution,
    pick_self_resolutions,
    trace_attention,
)
from ..images import resize, to_diffusion_input
from ._memory import CondHalf, block_checkpointing, resolve_memory, return_freed_memory
from .ddim import ddim_denoise, ddim_invert, ddim_timesteps
from .flow import flow_denoise, flow_invert, flow_timesteps
from .parts import DiffusionParts
from .prompts import PromptEmbeds, encode_prompt, sdxl_added_cond_kwargs
from .vae import vae_encode

__all__ = ["AttentionPipeline", "AttentionResult"]


@dataclass
class AttentionResult:
    """What one pass produced (every tensor keeps its graph unless run under no_grad).

    Attributes:
        diffusion_input: ``(B, 3, h, w)`` in [-1, 1].
        z0: VAE latents ``(B, C, h/f, w/f)`` (``C``: the VAE's latent channels, 4 for SD,
            16 for SD3 / Flux).
        zT: inverted latents (same shape).
        denoised: latents after the ``k`` denoising steps (same shape).
        cross: the store of cross-attention maps (every resolution).
        self_store: the store of self-attention maps (``self_resolutions`` only).
        batch: ``B``; with classifier-free guidance the stores hold ``[uncond; cond]`` rows and
            the getters below return the conditional half (with ``memory="low"``, which runs
            the halves as two calls, the stores hold the ``B`` conditional rows only).
    """

    diffusion_input: torch.Tensor
    z0: torch.Tensor
    zT: torch.Tensor
    denoised: torch.Tensor
    cross: AttentionStore
    self_store: AttentionStore
    batch: int

    def cross_maps(self, resolution: Resolution) -> torch.Tensor:
        """Cross-attention ``(B, h, w, T)`` averaged over heads, layers, steps (``T`` text
        tokens: 77 for CLIP stacks; SD3 77 CLIP + its T5 length; Flux the T5 length)."""
        if resolution is None:  # a clear error, not torch's from stacking several sizes
            raise InputError("cross_maps needs a resolution, e.g. pipe.cross_resolution")
        return self.cross.aggregate("cross", resolution)[-self.batch :]

    def self_maps(self) -> dict[str, torch.Tensor]:
        """Per layer, self-attention ``(B, h, w, h*w)`` averaged over heads and steps."""
        return {k: v[-self.batch :] for k, v in self.self_store.maps("self").items()}


class AttentionPipeline:
    """image -> VAE -> differentiable inversion -> denoising under hijack -> maps.

    Args:
        parts: a :class:`~attnpatch.diffusion.DiffusionParts` (``load_diffusion(...)``): a UNet
            stack (DDIM) or an SD3 / Flux stack (flow matching), as its denoiser's family says.
        num_inference_steps: ``N`` of the DDIM (or flow) schedule.
        num_steps: ``k``: the last ``k`` steps are inverted and denoised with gradients.
        guidance_scale: classifier-free guidance while denoising (1.0: conditional only).
            Inversion always uses the conditional embeddings alone.
        image_size: side (or ``(h, w)``) of the diffusion input; rounded up to the VAE factor
            (times the transformer's patch size on a DiT: 16 px for SD3 / Flux).
        cross_resolution: map size for cross-attention losses; ``None``: the smallest size at
            which both down and up blocks attend (16x16 for SD1.5 at 512 px, like
            prompt-to-prompt; 7x7 for SD2 at 224 px, like DiffAttack); a DiT's token grid
            (every layer works at it: 32x32 for SD3 / Flux at 512 px).
        self_resolutions: sizes whose self-attention is stored; ``None``: the two smallest.
        memory: ``"fast"`` (nothing recomputed), ``"balanced"`` (each UNet call recomputed in
            backward: memory flat in ``num_steps``) or ``"low"`` (also block by block inside
            each call, the VAE encoder checkpointed, the guidance halves as separate calls);
            values and gradients are the same in all three. ``None``: ``"fast"`` on the
            CPU, ``"low"`` on an accelerator (read from the UNet's device). Costs in
            docs/performance.md. On the CPU, ``"low"`` also has glibc return freed blocks to
            the OS, for the whole process (``_memory.return_freed_memory``; opt out with
            ``ATTNPATCH_MALLOC=0``).
        checkpoint: the older switch: ``True`` is ``memory="balanced"``, ``False`` ``"fast"``
            (deprecated: a ``FutureWarning``; removed in attnpatch 0.3.0).
        guidance: the embedded guidance scale of a guidance-distilled transformer (Flux-dev);
            ``None``: the family's default (3.5 for Flux-dev, as ``FluxPipeline``; nothing for
            models without a guidance embedding, which refuse a value).

    Precision: the pipeline takes fp32 images (the patch and its optimizer stay fp32); each
    network gets its inputs in its own dtype (``load_diffusion(..., torch_dtype=...)``) and the
    DDIM loop, the latents and the attention maps the stores record stay fp32.
    """

    def __init__(
        self,
        parts: DiffusionParts,
        *,
        num_inference_steps: int = 10,
        num_steps: int = 2,
        guidance_scale: float = 1.0,
        image_size: int | tuple[int, int] = 64,
        cross_resolution: int | Resolution | None = None,
        self_resolutions: Sequence[int | Resolution] | None = None,
        memory: str | None = None,
        checkpoint: bool | None = None,
        guidance: float | None = None,
    ):
        if not isinstance(parts, DiffusionParts):
            raise AttnPatchError(
                f"AttentionPipeline needs a DiffusionParts, got {type(parts).__name__}; pass "
                "attnpatch.load_diffusion(...) or DiffusionParts(unet, vae, text_encoder, "
                "tokenizer, scheduler)"
            )
        net = parts.denoiser
        #: the denoiser's :class:`~attnpatch.families.Family` (its loops, patch, guidance)
        self.family = family_of(net)
        if self.family.scheduler not in ("ddim", "flow"):
            raise ModelError(
                f"AttentionPipeline runs the 'ddim' loops (UNets) and the 'flow' loops (SD3 / "
                f"Flux transformers); the {self.family.name} family says its scheduler is "
                f"{self.family.scheduler!r}; set its scheduler to one of them"
            )
        self.flow = self.family.scheduler == "flow"
        self.parts = parts
        self.num_inference_steps = num_inference_steps
        self.num_steps = num_steps
        self.guidance_scale = float(guidance_scale)
        self.guidance = self.family.default_guidance(net) if guidance is None else guidance
        self.memory = resolve_memory(memory, checkpoint, _device_of(net))
        #: the multiple of the diffusion input's sides: the VAE factor times the patch size
        self.factor = parts.vae_scale_factor * self.family.latent_multiple(net)
        h, w = as_pair(image_size, "image_size")
        self.image_size = (-(-h // self.factor) * self.factor, -(-w // self.factor) * self.factor)
        vae_f = parts.vae_scale_factor
        latent = (self.image_size[0] // vae_f, self.image_size[1] // vae_f)
        # checks the schedule now, before any work (same rules as the loops)
        if self.flow:
            flow_timesteps(
                net,
                parts.scheduler,
                latent,
                num_inference_steps=num_inference_steps,
                num_steps=num_steps,
            )
        else:
            ddim_timesteps(
                parts.scheduler, num_inference_steps=num_inference_steps, num_steps=num_steps
            )
        self.sites = trace_attention(net, latent)
        self.cross_resolution = pick_cross_resolution(self.sites, cross_resolution)
        self.self_resolutions = pick_self_resolutions(self.sites, self_resolutions)

    # -- pieces -------------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeds:
        """Text embeddings of ``prompts`` with this stack's tokenizer(s) and encoder(s)."""
        return encode_prompt(self.parts.tokenizers, self.parts.text_encoders, list(prompts))

    def _added_cond(self, embeds: PromptEmbeds) -> dict[str, torch.Tensor] | None:
        if self.flow or self.parts.unet.config.addition_embed_type != "text_time":
            return None
        # [uncond; cond] rows: ddim_invert/ddim_denoise take the half(s) they run.
        return sdxl_added_cond_kwargs(
            embeds.pooled, self.image_size, uncond_pooled=embeds.uncond_pooled
        )

    def new_stores(self, per_step: bool = False) -> tuple[AttentionStore, AttentionStore]:
        """Fresh (cross, self) stores with this pipeline's filters."""
        return (
            AttentionStore(kinds=("cross",), per_step=per_step),
            AttentionStore(kinds=("self",), resolutions=self.self_resolutions, per_step=per_step),
        )

    def resize_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """A patch mask ``(B, 1, H, W)`` in [0, 1] at the diffusion input's size, resized as the
        images are, so it lines up with the attention maps (an integer factor above them).
        Clamped to [0, 1]: resampling may round a full cell to 1 + 1e-7 on some builds."""
        return resize(mask, self.image_size).clamp(0.0, 1.0)

    # -- the pass -----------------------------------------------------------------------------
    def __call__(
        self,
        images: torch.Tensor,
        prompts: Sequence[str] | PromptEmbeds,
        *,
        per_step: bool = False,
    ) -> AttentionResult:
        """Run the pipeline on ``images`` ``(B, 3, H, W)`` in [0, 1].

        ``prompts``: one prompt per image, or their embeddings (``B`` rows of a
        :class:`~attnpatch.diffusion.PromptEmbeds`, e.g. ``pipe.encode_prompts(class_prompts)
        .take(labels)``: encode a fixed prompt set once, not every call). ``per_step=True``
        keeps each denoising step's maps too (``result.cross.step_maps``).
        """
        n = prompts.cond.shape[0] if isinstance(prompts, PromptEmbeds) else len(prompts)
        if n != images.shape[0]:
            raise AttnPatchError(
                f"got {n} prompts for {images.shape[0]} images; pass one prompt per image"
            )
        p = self.parts
        low = self.memory == "low"
        if low and images.device.type == "cpu":
            return_freed_memory()  # else freed activations stay in glibc's heaps (_memory.py)
        x = to_diffusion_input(images, self.image_size, multiple=self.factor)
        vae_dtype = _dtype_of(p.vae)
        # checks x: (B, 3, h, w) in [-1, 1]; the loop runs in the images' dtype (fp32)
        x_vae = x.to(vae_dtype or x.dtype)
        z0 = vae_encode(p.vae, x_vae, checkpoint=True) if low else vae_encode(p.vae, x_vae)
        z0 = z0.to(x.dtype)
        embeds = prompts if isinstance(prompts, PromptEmbeds) else self.encode_prompts(prompts)
        # the loop's dtype (a half text encoder gives half embeddings; the UNet call casts)
        embeds = PromptEmbeds(*(None if e is None else e.to(x.dtype) for e in embeds))
        common = dict(
            num_inference_steps=self.num_inference_steps,
            num_steps=self.num_steps,
            checkpoint=self.memory != "fast",
        )
        guided = self.guidance_scale not in (0.0, 1.0)
        cross, selfs = self.new_stores(per_step)
        control: AttentionControl = ComposeControl(cross, selfs)
        if low and guided:
            control = CondHalf(control)  # the halves run as two calls: record the cond one
        net = p.denoiser
        with block_checkpointing(net) if low else contextlib.nullcontext():
            if self.flow:
                zT, denoised = self._flow(z0, embeds, control, low, common)
            else:
                zT, denoised = self._ddim(z0, embeds, control, low, common)
        return AttentionResult(x, z0, zT, denoised, cross, selfs, images.shape[0])

    def _ddim(
        self,
        z0: torch.Tensor,
        embeds: PromptEmbeds,
        control: AttentionControl,
        low: bool,
        common: dict[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A UNet's DDIM inversion (cond only), then its denoising under the hijack."""
        p = self.parts
        added = self._added_cond(embeds)
        zT = ddim_invert(p.unet, p.scheduler, z0, embeds.cond, added_cond_kwargs=added, **common)
        with hijack(p.unet, control):
            denoised = ddim_denoise(
                p.unet,
                p.scheduler,
                zT,
                embeds.cond,
                uncond=embeds.uncond if self.guidance_scale != 1.0 else None,
                guidance_scale=self.guidance_scale,
                added_cond_kwargs=added,
                split_guidance=low,
                **common,
            )
        return zT, denoised

    def _flow(
        self,
        z0: torch.Tensor,
        embeds: PromptEmbeds,
        control: AttentionControl,
        low: bool,
        common: dict[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A transformer's Euler inversion up the flow schedule (cond only), then its
        denoising under the hijack (``embeds``: SD3's ``[CLIP; T5]`` or Flux's T5 sequence
        with the pooled projections)."""
        p = self.parts
        net = p.transformer
        zT = flow_invert(net, p.scheduler, z0, embeds, guidance=self.guidance, **common)
        with hijack(net, control):
            denoised = flow_denoise(
                net,
                p.scheduler,
                zT,
                embeds,
                guidance_scale=self.guidance_scale,
                guidance=self.guidance,
                split_guidance=low,
                **common,
            )
        return zT, denoised

    @property
    def checkpoint(self) -> bool:
        """Whether UNet (transformer) calls are recomputed in backward (``memory != "fast"``)."""
        return self.memory != "fast"


def _dtype_of(module: Any) -> torch.dtype | None:
    for param in module.parameters():
        if param.is_floating_point():
            return param.dtype
    return None


def _device_of(module: Any) -> torch.device | None:
    for param in module.parameters():
        return param.device
    return None
