"""Memory modes on the flow loops: "balanced" (each transformer call recomputed in backward
through attnpatch.hooks.checkpoint) and "low" (also block by block inside each recomputed call,
the guidance halves as two calls) give the values and gradients of "fast" (nothing
recomputed), on SD3 and Flux transformers, and really recompute."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from attnpatch.diffusion import PromptEmbeds, encode_prompt, flow_denoise, flow_invert
from attnpatch.diffusion._memory import block_checkpointing

N, K = 6, 2
PROMPTS = ["a photo of a circle", "a red star"]
TOL = dict(atol=1e-5, rtol=1e-4)


def _run(parts, mode, g):
    """Invert (g = 0) then denoise (g), backward from a loss on the result; the values and the
    gradients at the latents and the prompt embeddings."""
    e = encode_prompt(parts.tokenizers, parts.text_encoders, PROMPTS, max_sequence_length=16)
    cond = e.cond.clone().requires_grad_(True)
    e = PromptEmbeds(cond, e.uncond, e.pooled, e.uncond_pooled)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    kw = dict(num_inference_steps=N, num_steps=K, checkpoint=mode != "fast")
    kw.update(guidance=3.5) if parts.variant == "flux" else None
    low = mode == "low"
    with block_checkpointing(parts.transformer) if low else contextlib.nullcontext():
        zt = flow_invert(parts.transformer, parts.scheduler, x, e, guidance_scale=0.0, **kw)
        out = flow_denoise(parts.transformer, parts.scheduler, zt, e, guidance_scale=g,
                           split_guidance=low, **kw)  # fmt: skip
    (out.square().mean() + out[:, 0].mean()).backward()
    return {"out": out.detach(), "x.grad": x.grad, "cond.grad": cond.grad}


@pytest.mark.parametrize("g", [1.0, 3.0])
@pytest.mark.parametrize("mode", ["balanced", "low"])
@pytest.mark.parametrize("stack", ["sd3", "flux"])
def test_modes_give_the_values_and_gradients_of_fast(request, stack, mode, g):
    parts = request.getfixturevalue(stack)
    ref = _run(parts, "fast", g)
    got = _run(parts, mode, g)
    assert ref["x.grad"].abs().sum() > 0 and ref["cond.grad"].abs().sum() > 0
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], **TOL, msg=key)
    assert all(p.grad is None for p in parts.transformer.parameters())


class _Calls:
    """Counts calls of the transformer and of its blocks (forward and recomputed)."""

    def __init__(self, model):
        self.model, self.blocks = 0, 0
        self.handles = [model.register_forward_pre_hook(self._model)]
        for name, module in model.named_children():
            if name.endswith("transformer_blocks"):
                for block in module:
                    self.handles.append(block.register_forward_pre_hook(self._block))

    def _model(self, *args):
        self.model += 1

    def _block(self, *args):
        self.blocks += 1

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("stack", ["sd3", "flux"])
def test_balanced_and_low_really_recompute(request, stack):
    parts = request.getfixturevalue(stack)
    n_blocks = sum(
        len(m) for name, m in parts.transformer.named_children() if name.endswith("blocks")
    )
    counts = {}
    for mode in ("fast", "balanced", "low"):
        calls = _Calls(parts.transformer)
        try:
            _run(parts, mode, 3.0)
        finally:
            calls.remove()
        counts[mode] = (calls.model, calls.blocks)
    # fast: K inversion calls (g = 0: one half) + K denoising calls ([uncond; cond] at once)
    assert counts["fast"] == (2 * K, 2 * K * n_blocks)
    # balanced: every call once more in backward
    assert counts["balanced"] == (4 * K, 4 * K * n_blocks)
    # low: the halves split (3K calls), each recomputed, and each block once more inside that
    assert counts["low"] == (6 * K, 9 * K * n_blocks)


def test_checkpoint_is_skipped_without_grad(sd3):
    e = encode_prompt(sd3.tokenizers, sd3.text_encoders, PROMPTS, max_sequence_length=16)
    x = torch.randn(2, 4, 8, 8)
    calls = _Calls(sd3.transformer)
    try:
        with torch.no_grad():
            plain = flow_denoise(sd3.transformer, sd3.scheduler, x, e, num_inference_steps=N,
                                 num_steps=K)  # fmt: skip
            ckpt = flow_denoise(sd3.transformer, sd3.scheduler, x, e, num_inference_steps=N,
                                num_steps=K, checkpoint=True)  # fmt: skip
    finally:
        calls.remove()
    assert calls.model == 2 * K
    torch.testing.assert_close(ckpt, plain, atol=0, rtol=0)


def _scaled(processor_cls):
    """A processor class whose attention output is 1.5x the original's."""

    class Scaled(processor_cls):
        def __call__(self, *args, **kwargs):
            out = super().__call__(*args, **kwargs)
            return tuple(1.5 * o for o in out) if isinstance(out, tuple) else 1.5 * out

    return Scaled


@pytest.mark.parametrize("stack", ["sd3", "flux"])
def test_the_replay_reinstalls_forward_time_processors_on_transformers(request, stack):
    """hooks.checkpoint snapshots the processors of any attention module: processors swapped
    back before backward are re-installed for the recompute, so the gradient is the one of the
    function that ran forward."""
    parts = copy.deepcopy(request.getfixturevalue(stack))
    model = parts.transformer
    originals = dict(model.attn_processors)
    scaled = {k: _scaled(type(p))() for k, p in originals.items()}
    e = encode_prompt(parts.tokenizers, parts.text_encoders, PROMPTS, max_sequence_length=16)
    kw = dict(num_inference_steps=N, num_steps=K, guidance_scale=2.0)
    kw.update(guidance=3.5) if parts.variant == "flux" else None
    grads = []
    for checkpoint in (False, True):
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        x.requires_grad_(True)
        model.set_attn_processor(dict(scaled))  # set_attn_processor empties the dict it gets
        out = flow_denoise(model, parts.scheduler, x, e, checkpoint=checkpoint, **kw)
        model.set_attn_processor(dict(originals))
        out.square().mean().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], grads[0], **TOL)
    assert all(model.attn_processors[k] is p for k, p in originals.items())


@pytest.mark.parametrize("stack", ["sd3", "flux"])
def test_inference_mode_first_then_checkpointed_training(request, stack):
    """The cached schedule and Flux's image ids are made outside inference mode: a later
    checkpointed call can save them for backward."""
    parts = request.getfixturevalue(stack)
    e = encode_prompt(parts.tokenizers, parts.text_encoders, PROMPTS, max_sequence_length=8)
    kw = dict(num_inference_steps=5, num_steps=2, guidance_scale=2.0)
    kw.update(guidance=3.5) if parts.variant == "flux" else None
    x = torch.randn(2, 4, 6, 10)  # a size no other test uses: fresh cache entries
    with torch.inference_mode():
        flow_denoise(parts.transformer, parts.scheduler, x, e, **kw)
    x.requires_grad_(True)
    out = flow_denoise(parts.transformer, parts.scheduler, x, e, checkpoint=True, **kw)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
