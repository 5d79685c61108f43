"""Checkpoint replay on diffusion transformers: every memory mode's recomputation (the model call
under ``hooks.checkpoint``, diffusers' block checkpointing, both nested) gives the maps, step
counts and gradients of the plain computation, with ``backward()`` inside or after the block,
for stores, step-dependent editors and any observer (issue 22)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils.checkpoint import checkpoint as torch_checkpoint

import attnpatch as ap
from attnpatch.diffusion._memory import block_checkpointing
from attnpatch.families import predict

GRID, TEXT = (4, 3), 7
MODES = ["balanced", "blocks", "low"]


def _inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    channels = model.config.in_channels if "SD3" in type(model).__name__ else 4
    x = torch.randn(2, channels, 8, 6, generator=g).requires_grad_(True)
    cond = torch.randn(2, TEXT, 16, generator=g).requires_grad_(True)
    pooled = torch.randn(2, 12, generator=g)
    guidance = 3.5 if model.config.get("guidance_embeds") else None
    return x, cond, pooled, guidance


class Amax(ap.AttentionControl):
    def __init__(self):
        self.values = []

    def needs(self, site):
        return site.kind in ("cross", "self")

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


class MaxToken(Amax):
    """docs/attention-control.md's MaxTokenAttention, on a DiT's token grid."""

    def needs(self, site):
        return site.is_cross and site.resolution == GRID

    def __call__(self, probs, site):
        if not self.recomputing:
            self.values.append(probs[..., 3].mean(1).amax(-1))
        return probs


class PerStepList(ap.AttentionControl):
    def __init__(self):
        self.steps = {}

    def needs(self, site):
        return site.kind == "text_cross"  # the text rows, asked for

    def __call__(self, probs, site):
        if not self.recomputing:
            sharp = (probs * 10).exp()
            self.steps.setdefault(self.cur_step, []).append(sharp / sharp.sum(-1, keepdim=True))
        return probs

    def recorded(self):
        return torch.stack([torch.stack(v).sum(0) for _, v in sorted(self.steps.items())])


class StoreWith(ap.ComposeControl):
    def __init__(self, editor=None):
        self.store = ap.AttentionStore(per_step=True)
        super().__init__(*([editor] if editor else []), self.store)

    def recorded(self):
        steps = self.store.step_maps("cross", GRID)
        return torch.stack([steps[s] for s in sorted(steps)])


CONTROLLERS = {
    "store": StoreWith,
    "step-edit+store": lambda: StoreWith(ap.ReweightCrossAttention([1, 2], 2.5, steps={0})),
    "renormalizing-edit+store": lambda: StoreWith(
        ap.ReweightCrossAttention([1, 2], 0.3, renormalize=True)
    ),
    "amax": Amax,
    "square-mean": SquareMean,
    "max-token (docs)": MaxToken,
    "text-rows per-step list": PerStepList,
}


def _two_steps(model, make, mode, backward_inside):
    model.zero_grad(set_to_none=True)
    x, cond, pooled, guidance = _inputs(model)
    control = make()

    def call(latents, t):
        return predict(model, latents, t, cond, pooled, guidance=guidance)

    def step(latents, t):
        if mode in ("balanced", "low"):
            return ap.hooks.checkpoint(call, latents, t, module=model)
        return call(latents, t)

    blocks = contextlib.nullcontext()
    if mode == "low":
        blocks = block_checkpointing(model)
    elif mode == "blocks":
        model.enable_gradient_checkpointing()
    try:
        with blocks, ap.hijack(model, control):
            h = x - 0.1 * step(x, 800.0)
            out = h - 0.1 * step(h, 400.0)
            recorded = control.recorded()
            loss = recorded.square().sum() + out.square().mean()
            if backward_inside:
                loss.backward()
        if not backward_inside:
            loss.backward()  # the attack's order: hijack removed, then the loss processed
    finally:
        if mode == "blocks":
            model.disable_gradient_checkpointing()
    return recorded.detach(), x.grad, cond.grad, control.cur_step


@pytest.mark.parametrize("backward_inside", [False, True], ids=["after", "inside"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", ["sd35", "flux"])
def test_store_and_editors_replay_exactly(dit_builders, variant, mode, backward_inside):
    model = dit_builders[variant]().train()  # train mode: checkpointing active, no dropout
    for name in ("store", "step-edit+store", "renormalizing-edit+store"):
        ref = _two_steps(model, CONTROLLERS[name], "fast", backward_inside)
        got = _two_steps(model, CONTROLLERS[name], mode, backward_inside)
        assert got[3] == ref[3] == 2  # steps not advanced by recomputes
        assert got[0].shape[0] == 2  # maps stored once per step
        torch.testing.assert_close(got[0], ref[0], rtol=0, atol=1e-6, msg=name)
        for g, r in zip(got[1:3], ref[1:3]):
            assert r.abs().sum() > 0
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "name", ["amax", "square-mean", "max-token (docs)", "text-rows per-step list"]
)
def test_any_observer_is_checkpoint_safe(dit_builders, name, mode):
    model = dit_builders["flux"]().train()
    ref = _two_steps(model, CONTROLLERS[name], "fast", False)
    got = _two_steps(model, CONTROLLERS[name], mode, False)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-4, atol=1e-6)


def test_block_checkpointing_recomputes_every_layer_once(dit_builders):
    model = dit_builders["flux"]().train()

    class Count(ap.AttentionControl):
        forward = recomputed = 0

        def needs(self, site):
            return site.kind == "cross"

        def __call__(self, probs, site):
            if self.recomputing:
                self.recomputed += 1
            else:
                self.forward += 1
            return probs

    x, cond, pooled, _ = _inputs(model)
    control = Count()
    model.enable_gradient_checkpointing()
    try:
        with ap.hijack(model, control):
            out = predict(model, x, 500.0, cond, pooled)
        out.sum().backward()
    finally:
        model.disable_gradient_checkpointing()
    assert control.forward == len(model.attn_processors) == 4
    assert control.recomputed == control.forward and control.cur_step == 1


def test_unmanaged_checkpoint_recompute_is_an_error(dit_builders):
    model = dit_builders["sd3"]()
    x, cond, pooled, _ = _inputs(model)
    with ap.hijack(model, ap.AttentionStore()):
        out = torch_checkpoint(
            lambda a, c: predict(model, a, 500.0, c, pooled), x, cond, use_reentrant=False
        )
        with pytest.raises(ap.errors.HookError, match="recomputed during backward"):
            out.sum().backward()
