"""The checkpoint replay (attnpatch.hooks.hijack): the private torch signal it relies on, and
processor re-installation."""

from __future__ import annotations

import torch

import attnpatch as ap
from attnpatch.hooks import checkpoint, in_backward


def test_in_backward_is_true_only_inside_backward():
    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            seen.append(("forward", in_backward()))
            return x * 2

        @staticmethod
        def backward(ctx, g):
            seen.append(("backward", in_backward()))
            return g * 2

    x = torch.ones(2, requires_grad=True)
    Probe.apply(x).sum().backward()
    assert seen == [("forward", False), ("backward", True)]
    assert not in_backward()


def test_checkpoint_recomputes_with_forward_time_processors(sd15):
    unet = sd15.unet
    x = torch.randn(1, 4, 32, 32, requires_grad=True)
    e = torch.randn(1, 77, 8)
    edit = ap.ReweightCrossAttention([1, 2], 0.0)

    def call(a):
        return unet(a, 10, e).sample

    with ap.hijack(unet, edit):
        ref = call(x)
    (gref,) = torch.autograd.grad(ref.square().sum(), x)
    with ap.hijack(unet, edit):
        out = checkpoint(call, x, module=unet)
    assert not ap.hooks.is_hijacked(unet)
    (g,) = torch.autograd.grad(out.square().sum(), x)  # recompute after the hijack exited
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g, gref)
    assert not ap.hooks.is_hijacked(unet)  # the recompute put the restored processors back


def test_recompute_after_the_block_sees_the_calls_latent_size(sd15):
    """A non-square latent, an editor that needs one (non-square) resolution, the model call
    checkpointed and backward after the hijack exited: the recompute must see the latent size
    of the call it recomputes (the snapshot is taken before the call, when the hijack's
    pre-hook has not run yet), or the editor is skipped and the gradients differ."""
    unet = sd15.unet
    x = torch.randn(1, 4, 32, 24, requires_grad=True)
    e = torch.randn(1, 77, 8)
    edit = ap.ReweightCrossAttention([1, 2], 0.0, resolutions=[(16, 12)])

    def call(a):
        return unet(a, 10, e).sample

    with ap.hijack(unet, edit):
        ref = call(x)
    (gref,) = torch.autograd.grad(ref.square().sum(), x)
    with ap.hijack(unet, edit):
        out = checkpoint(call, x, module=unet)
    (g,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g, gref)
