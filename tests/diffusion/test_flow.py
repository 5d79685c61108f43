"""flow_invert / flow_denoise against diffusers' SD3 and Flux pipelines, diffusers' scheduler
step, an oracle velocity, and autograd."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline

from attnpatch.diffusion import (
    PromptEmbeds,
    encode_prompt,
    flow_denoise,
    flow_invert,
    flow_timesteps,
)
from attnpatch.errors import InputError, ModelError
from attnpatch.families import pack_latents as pack
from attnpatch.testing import tiny_flux, tiny_sd3

PROMPTS = ["a photo of a circle", "a red star on a blue background"]
TOL = dict(atol=1e-5, rtol=1e-5)
HW = 8  # latent side: 16 px images through the factor-2 VAE


def _latents(b=2, seed=0, hw=(HW, HW)):
    return torch.randn(b, 4, *hw, generator=torch.Generator().manual_seed(seed))


def _embeds(parts, prompts=PROMPTS, msl=None):
    """The prompts' embeddings; ``msl``: a shorter T5 part than the pipelines' (faster)."""
    return encode_prompt(parts.tokenizers, parts.text_encoders, prompts, max_sequence_length=msl)


def _kw(parts):
    """Flux-dev needs its embedded guidance; SD3 refuses one."""
    return {"guidance": 3.5} if parts.variant == "flux" else {}


def _run_pipeline(parts, x, n, g, msl=None):
    """diffusers' own pipeline on latents ``x`` (B, 4, h, w): its ``output_type="latent"``
    result in the same layout (Flux's unpacked)."""
    pipe = parts.pipeline()
    hw = dict(height=2 * x.shape[-2], width=2 * x.shape[-1])  # the tiny VAE's factor is 2
    common = dict(num_inference_steps=n, output_type="latent", **hw)
    if msl is not None:
        common["max_sequence_length"] = msl
    prompts = PROMPTS[: x.shape[0]]
    if parts.variant == "sd3":
        return pipe(prompts, latents=x, guidance_scale=g, **common).images
    cfg = {} if g == 1.0 else dict(true_cfg_scale=g, negative_prompt=[""] * len(prompts))
    packed = FluxPipeline._pack_latents(x, x.shape[0], 4, *x.shape[-2:])
    out = pipe(prompts, latents=packed, guidance_scale=3.5, **common, **cfg).images
    return FluxPipeline._unpack_latents(out, hw["height"], hw["width"], 2)


# ----------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("g", [1.0, 3.0])
@pytest.mark.parametrize("stack", ["sd3", "flux"])
def test_denoise_equals_the_diffusers_pipeline(request, stack, g):
    parts = request.getfixturevalue(stack)
    x, n = _latents(), 4
    ref = _run_pipeline(parts, x, n, g)
    got = flow_denoise(
        parts.transformer,
        parts.scheduler,
        x,
        _embeds(parts),
        num_inference_steps=n,
        num_steps=n,
        guidance_scale=g,
        **_kw(parts),
    )
    torch.testing.assert_close(got, ref, **TOL)
    assert not torch.allclose(got, x, atol=1e-2)


def test_schnell_shaped_flux_without_guidance_embedding():
    parts = tiny_flux(guidance_embeds=False)
    x, n = _latents(b=1), 3
    pipe = parts.pipeline()
    packed = FluxPipeline._pack_latents(x, 1, 4, HW, HW)
    out = pipe(PROMPTS[0], latents=packed, num_inference_steps=n, output_type="latent",
               height=16, width=16).images  # fmt: skip
    ref = FluxPipeline._unpack_latents(out, 16, 16, 2)
    e = _embeds(parts, PROMPTS[0])
    got = flow_denoise(parts.transformer, parts.scheduler, x, e, num_inference_steps=n, num_steps=n)
    torch.testing.assert_close(got, ref, **TOL)
    with pytest.raises(InputError, match="does not have"):
        flow_denoise(parts.transformer, parts.scheduler, x, e, num_inference_steps=n,
                     num_steps=n, guidance=3.5)  # fmt: skip


def _call(parts, x, t, e, rows):
    """The transformer called as the pipelines call it (Flux through diffusers' own packing)."""
    b = x.shape[0]
    cond, pooled = e.cond[rows], e.pooled[rows]
    if parts.variant == "sd3":
        return parts.transformer(
            hidden_states=x, timestep=t.expand(b), encoder_hidden_states=cond,
            pooled_projections=pooled,
        ).sample  # fmt: skip
    h, w = x.shape[-2:]
    out = parts.transformer(
        hidden_states=FluxPipeline._pack_latents(x, b, 4, h, w),
        timestep=t.expand(b) / 1000,
        guidance=torch.full((b,), 3.5),
        pooled_projections=pooled,
        encoder_hidden_states=cond,
        txt_ids=torch.zeros(cond.shape[1], 3),
        img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", x.dtype),
    ).sample
    return FluxPipeline._unpack_latents(out, 2 * h, 2 * w, 2)


def _pipeline_scheduler(parts, n, x):
    """A copy of the scheduler as the family's pipeline sets it up for ``n`` steps."""
    _run_pipeline(parts, x[:1], n, 1.0, msl=8)  # the schedule does not depend on the text
    sched = copy.deepcopy(parts.scheduler)
    sched._step_index = sched._begin_index = None  # as set_timesteps leaves them
    return sched


@pytest.mark.parametrize("stack", ["sd3", "flux"])
def test_partial_runs_equal_diffusers_step(request, stack):
    """k < N steps: diffusers' scheduler jumped to index N-k (set_begin_index) and its step()."""
    parts = request.getfixturevalue(stack)
    n, k, x = 6, 3, _latents()
    e = _embeds(parts, msl=16)
    sched = _pipeline_scheduler(parts, n, x)
    sched.set_begin_index(n - k)
    ref = x
    with torch.no_grad():
        for t in sched.timesteps[n - k :]:
            ref = sched.step(_call(parts, ref, t, e, [0, 1]), t, ref).prev_sample
        got = flow_denoise(parts.transformer, parts.scheduler, x, e, num_inference_steps=n,
                           num_steps=k, **_kw(parts))  # fmt: skip
    torch.testing.assert_close(got, ref, **TOL)


@pytest.mark.parametrize("stack", ["sd3", "flux"])
def test_inversion_is_euler_up_the_same_sigmas(request, stack):
    """By hand: x <- x + (sigma_i - sigma_{i+1}) v(x, t_i) for i = N-1, ..., N-k."""
    parts = request.getfixturevalue(stack)
    n, k, x = 6, 4, _latents()
    e = _embeds(parts, msl=16)
    sched = _pipeline_scheduler(parts, n, x)
    ref = x
    with torch.no_grad():
        for i in range(n - 1, n - k - 1, -1):
            v = _call(parts, ref, sched.timesteps[i], e, [0, 1])
            ref = ref + (sched.sigmas[i] - sched.sigmas[i + 1]) * v
        got = flow_invert(parts.transformer, parts.scheduler, x, e, num_inference_steps=n,
                          num_steps=k, **_kw(parts))  # fmt: skip
    torch.testing.assert_close(got, ref, **TOL)
    ts = flow_timesteps(parts.transformer, parts.scheduler, (HW, HW), num_inference_steps=n,
                        num_steps=k, inverse=True)  # fmt: skip
    assert ts == [float(sched.timesteps[i]) for i in range(n - 1, n - k - 1, -1)]


# ----------------------------------------------------------------------------- the oracle


def _oracle(parts, x0, noise):
    """A transformer of the stack's class whose velocity is the straight path's, ``noise - x0``:
    flow matching's exact answer for the pair (x0, noise)."""
    stack = parts.variant
    parts = copy.deepcopy(parts)
    model = parts.transformer
    target = noise - x0

    def forward(hidden_states, **kwargs):
        v = target if stack == "sd3" else pack(target)
        return (v + 0 * hidden_states,)

    model.forward = forward
    return parts


@pytest.mark.parametrize("stack", ["sd3", "flux"])
@pytest.mark.parametrize("k", [3, 8])
def test_oracle_velocity_inverts_and_denoises_exactly(request, stack, k):
    """diffusers-facts.md's check: with v = noise - x0, inversion lands on
    ``scale_noise(x0, t_{N-k}, noise)`` and denoising from there on x0."""
    x0, noise = _latents(seed=1), _latents(seed=2)
    real = request.getfixturevalue(stack)
    n = 8
    sched = _pipeline_scheduler(real, n, x0)
    at_sigma = sched.scale_noise(x0, sched.timesteps[n - k][None], noise)
    sigma = sched.sigmas[n - k]
    torch.testing.assert_close(at_sigma, sigma * noise + (1 - sigma) * x0)
    parts = _oracle(real, x0, noise)
    e = _embeds(parts)
    kw = dict(num_inference_steps=n, num_steps=k, **_kw(parts))
    zt = flow_invert(parts.transformer, parts.scheduler, x0, e, **kw)
    torch.testing.assert_close(zt, at_sigma, atol=2e-6, rtol=0)
    if k == n:  # the whole schedule: sigma_0 = 1 is pure noise
        torch.testing.assert_close(zt, noise, atol=2e-6, rtol=0)
    torch.testing.assert_close(flow_denoise(parts.transformer, parts.scheduler, zt, e, **kw), x0,
                               atol=2e-6, rtol=0)  # fmt: skip


# ----------------------------------------------------------------------------- round trips


def test_round_trip_error_shrinks_with_finer_steps(sd3):
    """The inversion's one approximation (v at the current sample): with the same sigma reached
    in finer steps, a random transformer's round trip gets closer (docs/ddim.md)."""
    x, e = _latents(), _embeds(sd3, msl=16)
    errors = []
    with torch.no_grad():
        for n in (5, 9, 17, 33):  # sigma_{(n-1)/2} is the same level for all four
            k = n - (n - 1) // 2
            kw = dict(num_inference_steps=n, num_steps=k)
            zt = flow_invert(sd3.transformer, sd3.scheduler, x, e, **kw)
            back = flow_denoise(sd3.transformer, sd3.scheduler, zt, e, **kw)
            errors.append(float((back - x).norm() / x.norm()))
    assert errors == sorted(errors, reverse=True), errors
    assert errors[-1] < errors[0] / 3


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("g", [1.0, 4.0])
@pytest.mark.parametrize("stack", ["sd3", "flux"])
def test_gradient_reaches_latents_and_embeddings_not_the_weights(request, stack, g):
    parts = request.getfixturevalue(stack)
    x = _latents().requires_grad_(True)
    e = _embeds(parts, msl=16)
    cond = e.cond.clone().requires_grad_(True)
    e = PromptEmbeds(cond, e.uncond, e.pooled, e.uncond_pooled)
    kw = dict(num_inference_steps=6, num_steps=2, guidance_scale=g, **_kw(parts))
    zt = flow_invert(parts.transformer, parts.scheduler, x, e, **kw)
    out = flow_denoise(parts.transformer, parts.scheduler, zt, e, **kw)
    out.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert cond.grad is not None and cond.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in parts.transformer.parameters())


def test_gradcheck_float64(sd3):
    parts = copy.deepcopy(sd3)
    parts.transformer.double()
    e = _embeds(sd3, PROMPTS[0], msl=8)
    e = PromptEmbeds(*(t.double() for t in e))
    x = _latents(b=1, hw=(4, 4)).double().requires_grad_(True)
    kw = dict(num_inference_steps=4, num_steps=2)

    def f(z):
        zt = flow_invert(parts.transformer, parts.scheduler, z, e, **kw)
        return flow_denoise(parts.transformer, parts.scheduler, zt, e, checkpoint=True, **kw)

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-5, fast_mode=True)


def test_half_precision_transformer_in_a_float32_loop(sd3):
    parts = copy.deepcopy(sd3)
    parts.transformer.to(torch.bfloat16)
    x = _latents().requires_grad_(True)
    out = flow_denoise(parts.transformer, parts.scheduler, x, _embeds(sd3, msl=16),
                       num_inference_steps=4, num_steps=2, guidance_scale=2.0)  # fmt: skip
    assert out.dtype == torch.float32
    out.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- the scheduler


def _state(s):
    return (s.timesteps.clone(), s.sigmas.clone(), s.step_index, s.begin_index, dict(s.config))


def test_the_users_scheduler_is_never_mutated():
    parts = tiny_sd3()
    parts.scheduler.set_timesteps(5)
    parts.scheduler._step_index = 2
    before = _state(parts.scheduler)
    e, x = _embeds(parts), _latents()
    kw = dict(num_inference_steps=7, num_steps=3)
    zt = flow_invert(parts.transformer, parts.scheduler, x, e, **kw)
    flow_denoise(parts.transformer, parts.scheduler, zt, e, **kw)
    after = _state(parts.scheduler)
    for a, b in zip(before, after):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_flow_timesteps_follow_flux_resolution_shift(flux):
    """Flux's shift grows with the image: larger latents, later (noisier) timesteps."""
    small = flow_timesteps(flux.transformer, flux.scheduler, (8, 8), num_inference_steps=6,
                           num_steps=6)  # fmt: skip
    large = flow_timesteps(flux.transformer, flux.scheduler, (64, 64), num_inference_steps=6,
                           num_steps=6)  # fmt: skip
    assert small[0] == large[0] == 1000.0
    assert all(b > a for a, b in zip(small[1:], large[1:]))


# ----------------------------------------------------------------------------- errors


def _bad_cases(parts):
    e = _embeds(parts)
    return {
        "ddim": (dict(scheduler=DDIMScheduler()), "FlowMatchEulerDiscreteScheduler.from_config"),
        "stochastic": (
            dict(scheduler=FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)),
            "stochastic_sampling=True",
        ),
        "k > N": (dict(num_steps=7), "1 <= num_steps <= 6"),
        "channels": (dict(latents=torch.randn(2, 3, 8, 8)), "3 channels"),
        "odd size": (dict(latents=torch.randn(2, 4, 7, 8)), "2x2 patches"),
        "images": (dict(latents=torch.rand(2, 3, 16, 16)), "not images"),
        "too large": (dict(latents=torch.randn(1, 4, 66, 66)), "pos_embed_max_size"),
        "nan": (dict(latents=torch.full((2, 4, 8, 8), float("nan"))), "NaN"),
        "no uncond": (
            dict(embeds=PromptEmbeds(e.cond, None, e.pooled, None), guidance_scale=2.0),
            "needs embeds.uncond",
        ),
        "not embeds": (dict(embeds=e.cond), "PromptEmbeds"),
        "width": (
            dict(embeds=PromptEmbeds(e.cond[..., :8], e.uncond, e.pooled, e.uncond_pooled)),
            "8 wide but the transformer takes 32",
        ),
        "batch": (
            dict(
                embeds=PromptEmbeds(
                    e.cond[:1].expand(3, -1, -1), e.uncond, e.pooled, e.uncond_pooled
                )
            ),  # fmt: skip
            "batch 3 but latents have batch 2",
        ),
        "guidance on sd3": (dict(guidance=3.5), "does not have"),
        "g nan": (dict(guidance_scale=float("nan")), "finite"),
    }


@pytest.mark.parametrize("case", list(_bad_cases(tiny_sd3())))
def test_bad_arguments_raise_before_any_call(sd3, case):
    override, match = _bad_cases(sd3)[case]
    calls = []
    handle = sd3.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    args = dict(transformer=sd3.transformer, scheduler=sd3.scheduler, latents=_latents(),
                embeds=_embeds(sd3), num_inference_steps=6, num_steps=2)  # fmt: skip
    args.update(override)
    try:
        for fn in (flow_denoise, flow_invert):
            with pytest.raises(InputError, match=match):
                fn(**args)
    finally:
        handle.remove()
    assert not calls


def test_flux_dev_needs_its_guidance_and_a_unet_is_refused(flux, sd15):
    e, x = _embeds(flux), _latents()
    with pytest.raises(InputError, match="pass guidance=3.5"):
        flow_denoise(flux.transformer, flux.scheduler, x, e, num_inference_steps=4, num_steps=2)
    with pytest.raises(ModelError, match="ddim_invert"):
        flow_denoise(sd15.unet, flux.scheduler, x, e, num_inference_steps=4, num_steps=2)
    with pytest.raises(InputError, match="takes 4 .packed 2x2 inside"):  # in_channels 16
        flow_denoise(flux.transformer, flux.scheduler, pack(x).reshape(2, 16, 4, 4), e,
                     num_inference_steps=4, num_steps=2, guidance=3.5)  # fmt: skip


def test_unet_paths_refuse_transformers_with_the_fix(sd3):
    from attnpatch.diffusion import AttentionPipeline, ddim_denoise, ddim_invert
    from attnpatch.testing import tiny_scheduler

    # the attention pipeline is no UNet path: it runs the family's flow loops on SD3 / Flux
    # (tests/training/test_dit_e2e.py)
    assert AttentionPipeline(sd3, num_inference_steps=4, num_steps=2).flow
    e = _embeds(sd3, msl=8)
    for fn, fix in ((ddim_denoise, "use flow_denoise"), (ddim_invert, "use flow_invert")):
        with pytest.raises(ModelError, match=fix):
            fn(sd3.transformer, tiny_scheduler(), _latents(), e.cond, num_inference_steps=4,
               num_steps=2)  # fmt: skip
