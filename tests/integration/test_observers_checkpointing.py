"""Any observer is checkpoint-safe (issue 22): a controller whose recording saves tensors for
backward (``amax``, ``square().mean()``, a per-step list) works under every memory mode, with
``backward()`` after the block, and records and differentiates exactly as without
recomputation. Before the fix such observers failed with torch's ``CheckpointError: A different
number of tensors was saved during the original forward and recomputation``."""

from __future__ import annotations

import contextlib

import pytest
import torch

import attnpatch as ap
from attnpatch.diffusion import ddim_denoise
from attnpatch.diffusion._memory import CondHalf, block_checkpointing
from attnpatch.testing import tiny_sd

N, K = 6, 2


class MaxTokenAttention(ap.AttentionControl):
    """docs/attention-control.md's example, verbatim (but for the resolution it watches)."""

    def __init__(self, token):
        self.token, self.peaks = token, []

    def needs(self, site):
        return site.is_cross and site.resolution == (16, 16)

    def __call__(self, probs, site):  # (B, heads, 256, 77)
        if not self.recomputing:
            self.peaks.append(probs[..., self.token].mean(1).amax(-1))  # (B,)
        return probs

    def reset(self):
        super().reset()
        self.peaks = []

    def recorded(self):
        return torch.stack(self.peaks)


class Amax(ap.AttentionControl):
    def __init__(self):
        self.values = []

    def needs(self, site):
        return True

    def __call__(self, probs, site):
        if not self.recomputing:
            self.values.append(probs.amax(dim=-1).mean())
        return probs

    def recorded(self):
        return torch.stack(self.values)


class SquareMean(Amax):
    def __call__(self, probs, site):
        if not self.recomputing:
            self.values.append(probs.square().mean())
        return probs


class PerStepList(ap.AttentionControl):
    """A list per step of every cross map (softmax-sharpened: exp and a division save tensors)."""

    def __init__(self):
        self.steps: dict[int, list[torch.Tensor]] = {}

    def needs(self, site):
        return site.is_cross and site.resolution == (8, 8)

    def __call__(self, probs, site):
        if not self.recomputing:
            sharp = (probs * 10).exp()
            sharp = sharp / sharp.sum(-1, keepdim=True)
            self.steps.setdefault(self.cur_step, []).append(sharp.mean(1))
        return probs

    def recorded(self):
        return torch.stack([torch.stack(v).sum(0) for _, v in sorted(self.steps.items())])


class StoreWithEdit(ap.ComposeControl):
    """The documented editor-then-store composition."""

    def __init__(self):
        self.store = ap.AttentionStore(per_step=True)
        super().__init__(ap.ReweightCrossAttention([2, 3], 1.7, renormalize=True), self.store)

    def recorded(self):
        steps = self.store.step_maps("cross", 16)
        return torch.stack([steps[s] for s in sorted(steps)])


CONTROLLERS = {
    "max-token (docs)": lambda: MaxTokenAttention(3),
    "amax": Amax,
    "square-mean": SquareMean,
    "per-step-list": PerStepList,
    "edit+store (docs)": StoreWithEdit,
}


@pytest.fixture(scope="module")
def deep():
    return tiny_sd("sd15", deep=True)  # cross-attention at 16x16 and 8x8


def _run(parts, make, mode, guidance):
    """The attention pipeline's denoising under ``mode``, then backward after the block."""
    g = torch.Generator().manual_seed(0)
    zT = torch.randn(2, 4, 32, 32, generator=g).requires_grad_(True)
    cond = torch.randn(2, 77, 8, generator=g)
    uncond = torch.randn(1, 77, 8, generator=g)
    controller = make()
    low = mode == "low"
    control = CondHalf(controller) if low and guidance != 1.0 else controller
    blocks = block_checkpointing(parts.unet) if low else contextlib.nullcontext()
    with blocks, ap.hijack(parts.unet, control):
        out = ddim_denoise(
            parts.unet,
            parts.scheduler,
            zT,
            cond,
            uncond=uncond if guidance != 1.0 else None,
            guidance_scale=guidance,
            num_inference_steps=N,
            num_steps=K,
            checkpoint=mode != "fast",
            split_guidance=low,
        )
    recorded = controller.recorded()  # with CondHalf: the cond calls' rows only
    (recorded.square().sum() + out.square().mean()).backward()
    return recorded.detach(), zT.grad


@pytest.mark.parametrize("mode", ["balanced", "low"])
@pytest.mark.parametrize("name", CONTROLLERS)
def test_observers_are_checkpoint_safe(deep, name, mode):
    ref_maps, ref_grad = _run(deep, CONTROLLERS[name], "fast", 1.0)
    maps, grad = _run(deep, CONTROLLERS[name], mode, 1.0)
    assert ref_grad.abs().sum() > 0
    torch.testing.assert_close(maps, ref_maps, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("mode", ["fast", "balanced", "low"])
def test_observers_under_guidance_in_every_mode(deep, mode):
    """With classifier-free guidance ("low" runs the halves as two calls: cond rows only)."""
    maps, grad = _run(deep, Amax, mode, 3.0)
    assert torch.isfinite(maps).all() and maps.numel() > 0
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
