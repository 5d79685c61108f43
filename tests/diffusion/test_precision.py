"""Half precision: load_diffusion(torch_dtype=...) and torch.autocast through the attention
pipeline. Gradients at the (fp32) images are finite and close to fp32's; the maps the stores
hold are fp32; float16 needs the gradient scaling at its boundaries (half_cast).

Tolerances, from the tiny stacks (random weights, N=6, k=2, CFG 3, a loss on one token's
cross map and on the self maps): relative L2 error of the image gradient against fp32 <= 0.3
and cosine >= 0.97 in bfloat16 (measured 0.10-0.17 / 0.986-0.995: bfloat16 keeps 8 bits of
mantissa); <= 0.08 and >= 0.995 in float16 (measured 0.02-0.03 / 0.9996).
"""

from __future__ import annotations

import pytest
import torch

import attnpatch as ap
from attnpatch.hooks import maths as maths_module
from attnpatch.hooks.processor import FP16_GRAD_SCALE, half_cast

N, K = 6, 2
PROMPTS = ["a photo of a circle", "a photo of a star"]
TOLERANCE = {torch.bfloat16: (0.3, 0.97), torch.float16: (0.08, 0.995)}


def _run(variant, torch_dtype=None, autocast=None, memory="fast"):
    parts = ap.load_diffusion(f"tiny-{variant}", torch_dtype=torch_dtype)
    pipe = ap.AttentionPipeline(
        parts,
        num_inference_steps=N,
        num_steps=K,
        guidance_scale=3.0,
        image_size=32,
        memory=memory,
    )
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    ctx = (
        torch.autocast("cpu", dtype=autocast) if autocast else torch.autocast("cpu", enabled=False)
    )
    with ctx:
        r = pipe(x, PROMPTS)
        cross = r.cross_maps(pipe.cross_resolution)
        selfs = r.self_maps()
        loss = cross[..., 2].var() + sum(v.square().mean() for v in selfs.values())
    loss.backward()
    return parts, r, cross, selfs, x.grad


def _compare(grad, ref, dtype):
    rel = float((grad - ref).norm() / ref.norm())
    cos = float(torch.nn.functional.cosine_similarity(grad.flatten(), ref.flatten(), dim=0))
    return rel, cos


@pytest.fixture(scope="module")
def fp32():
    return {v: _run(v)[-1] for v in ("sd15", "sd2")}


@pytest.mark.parametrize("variant", ["sd15", "sd2"])
@pytest.mark.parametrize(
    "kw",
    [
        dict(torch_dtype=torch.bfloat16),
        dict(torch_dtype=torch.float16),
        dict(torch_dtype="bfloat16", memory="low"),
        dict(torch_dtype=torch.float16, memory="low"),
        dict(autocast=torch.bfloat16),
    ],
    ids=["bf16", "fp16", "bf16-low", "fp16-low", "autocast-bf16"],
)
def test_half_gradients_are_finite_and_close_to_fp32(fp32, variant, kw):
    parts, r, cross, selfs, grad = _run(variant, **kw)
    dtype = kw.get("autocast") or getattr(torch, str(kw["torch_dtype"]).replace("torch.", ""))
    if "torch_dtype" in kw:
        assert parts.unet.dtype == dtype
        assert parts.vae.dtype == (torch.float32 if dtype == torch.float16 else dtype)
    # what the losses see is fp32; so is the image side (the patch and its optimizer)
    assert cross.dtype == torch.float32 and all(v.dtype == torch.float32 for v in selfs.values())
    assert r.denoised.dtype == torch.float32 and grad.dtype == torch.float32
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    rel, cos = _compare(grad, fp32[variant], dtype)
    max_rel, min_cos = TOLERANCE[dtype]
    assert rel <= max_rel and cos >= min_cos, (rel, cos)


def test_float16_without_the_boundary_scaling_loses_the_gradient(fp32, monkeypatch):
    monkeypatch.setattr(maths_module, "FP16_GRAD_SCALE", 1.0)  # hooks/maths.py holds the rule
    grad = _run("sd2", torch_dtype=torch.float16)[-1]
    rel, _ = _compare(grad, fp32["sd2"], torch.float16)
    assert rel > 0.5  # underflow: most of the gradient is flushed to zero


def test_half_cast_keeps_values_and_true_gradients():
    x = torch.linspace(-1, 1, 11, dtype=torch.float32, requires_grad=True)
    h = half_cast(x, torch.float16)
    assert h.dtype == torch.float16 and torch.equal(h.float(), x.detach().half().float())
    seen = {}
    h.register_hook(lambda g: seen.update(inside=g.float()))  # returns None: observes only
    y = half_cast(h * 3, torch.float32)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 3.0))  # true outside
    torch.testing.assert_close(seen["inside"], torch.full_like(x, 3 * FP16_GRAD_SCALE))  # scaled
    b = torch.ones(2, requires_grad=True)
    assert half_cast(b, torch.bfloat16).grad_fn is not None  # plain cast: no scaling
    assert half_cast(b, torch.float32) is b
