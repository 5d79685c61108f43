"""ddim_invert / ddim_denoise against diffusers' own loops, by-hand DDIM, and autograd."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import (
    DDIMInverseScheduler,
    DDIMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)
from torch import nn

from attnpatch.diffusion.ddim import ddim_denoise, ddim_invert, ddim_timesteps
from attnpatch.diffusion.prompts import encode_prompt, sdxl_added_cond_kwargs
from attnpatch.diffusion.vae import vae_encode
from attnpatch.errors import AttnPatchError
from attnpatch.images import to_diffusion_input
from attnpatch.testing import tiny_sd

N, K = 10, 3
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def sd():
    return tiny_sd("sd15")


@pytest.fixture(scope="module")
def unet(sd):
    return sd.unet


@pytest.fixture(scope="module")
def sd_xl():
    return tiny_sd("sdxl")


@pytest.fixture(scope="module")
def sdxl_unet(sd_xl):
    return sd_xl.unet


def _inputs(b=2, width=8, seed=0, size=8):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, 4, size, size, generator=g)
    cond = torch.randn(b, 77, width, generator=g)
    uncond = torch.randn(b, 77, width, generator=g)
    return z, cond, uncond


def _config(sd, prediction_type="epsilon", spacing="leading"):
    return dict(sd.scheduler.config, prediction_type=prediction_type, timestep_spacing=spacing)


def _reference_loop(unet, sched, timesteps, x, cond, uncond, g, added=None):
    """diffusers' pipeline loop, written out: one UNet call per step on [uncond; cond]."""
    for t in timesteps:
        if g == 1.0:
            out = unet(x, t, encoder_hidden_states=cond, added_cond_kwargs=added).sample
        else:
            out = unet(
                torch.cat([x, x]),
                t,
                encoder_hidden_states=torch.cat([uncond, cond]),
                added_cond_kwargs=added,
            ).sample
            out_u, out_c = out.chunk(2)
            out = out_u + g * (out_c - out_u)
        x = sched.step(out, t, x).prev_sample
    return x


def _diffusers_invert(unet, config, n, k, x, cond, uncond, g, added=None):
    inv = DDIMInverseScheduler.from_config(config)
    inv.set_timesteps(n)
    return _reference_loop(unet, inv, inv.timesteps[:k], x, cond, uncond, g, added)


def _diffusers_denoise(unet, config, n, k, x, cond, uncond, g, added=None):
    sched = DDIMScheduler.from_config(config)
    sched.set_timesteps(n)
    return _reference_loop(unet, sched, sched.timesteps[n - k :], x, cond, uncond, g, added)


class _CallSpy:
    """Records (batch, timestep, encoder batch) of every UNet call, forward and recompute."""

    def __init__(self, unet):
        self.calls: list[tuple[int, torch.Tensor, int]] = []
        self.handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        x, t = args[0], args[1] if len(args) > 1 else kwargs["timestep"]
        self.calls.append((x.shape[0], t, kwargs["encoder_hidden_states"].shape[0]))

    def remove(self):
        self.handle.remove()


# ----------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("g", [1.0, 7.5])
def test_matches_diffusers_loops(sd, unet, prediction_type, spacing, g):
    config = _config(sd, prediction_type, spacing)
    scheduler = DDIMScheduler.from_config(config)
    z, cond, uncond = _inputs()
    kw = dict(num_inference_steps=N, num_steps=K, uncond=uncond, guidance_scale=g)
    with torch.no_grad():
        got_inv = ddim_invert(unet, scheduler, z, cond, **kw)
        got_den = ddim_denoise(unet, scheduler, z, cond, **kw)
        ref_inv = _diffusers_invert(unet, config, N, K, z, cond, uncond, g)
        ref_den = _diffusers_denoise(unet, config, N, K, z, cond, uncond, g)
    torch.testing.assert_close(got_inv, ref_inv, **TOL)
    torch.testing.assert_close(got_den, ref_den, **TOL)
    assert not torch.allclose(got_inv, z) and not torch.allclose(got_den, z)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_matches_ddim_by_hand(sd, unet, prediction_type):
    """Independent of diffusers' step(): DDIM's update written from the paper's formulas."""
    config = _config(sd, prediction_type)
    scheduler = DDIMScheduler.from_config(config)
    acp = scheduler.alphas_cumprod.double()
    a_end = acp[0]  # set_alpha_to_one=False: both ends of the chain sit at alphas_cumprod[0]
    step = 1000 // N
    z, cond, _ = _inputs(b=1)

    def level(t):
        return acp[t] if t >= 0 else a_end

    def move(x, out, a_from, a_to):
        x, out = x.double(), out.double()
        if prediction_type == "epsilon":
            eps = out
            x0 = (x - (1 - a_from).sqrt() * eps) / a_from.sqrt()
        else:  # v = sqrt(a) eps - sqrt(1 - a) x0, evaluated at the sample's own level
            x0 = a_from.sqrt() * x - (1 - a_from).sqrt() * out
            eps = a_from.sqrt() * out + (1 - a_from).sqrt() * x
        return (a_to.sqrt() * x0 + (1 - a_to).sqrt() * eps).float()

    def unet_out(x, t):
        return unet(x, torch.tensor(t), encoder_hidden_states=cond).sample

    with torch.no_grad():
        # inversion: UNet at the *target* timestep t, level t - step -> t (v_prediction in
        # diffusers' inverse step reads a and sample at the source level)
        x = z
        for t in [1 + step * i for i in range(K)]:
            x = move(x, unet_out(x, t), level(t - step), level(t))
        got = ddim_invert(unet, scheduler, z, cond, num_inference_steps=N, num_steps=K)
        torch.testing.assert_close(got, x, **TOL)
        # denoising: UNet at the current timestep t, level t -> t - step
        x = z
        for t in [1 + step * i for i in reversed(range(K))]:
            x = move(x, unet_out(x, t), level(t), level(t - step))
        got = ddim_denoise(unet, scheduler, z, cond, num_inference_steps=N, num_steps=K)
        torch.testing.assert_close(got, x, **TOL)


def test_timesteps_convention(sd):
    s = sd.scheduler
    assert ddim_timesteps(s, num_inference_steps=10, num_steps=10)[0] == 901
    inv = ddim_timesteps(s, num_inference_steps=10, num_steps=4, inverse=True)
    den = ddim_timesteps(s, num_inference_steps=10, num_steps=4)
    assert inv == [1, 101, 201, 301] and den == inv[::-1]
    trailing = DDIMScheduler.from_config(s.config, timestep_spacing="trailing")
    assert ddim_timesteps(trailing, num_inference_steps=10, num_steps=2) == [199, 99]


def test_guidance_halves_and_timestep_tensor(unet, sd):
    """g=1 runs cond only, g=0 uncond only, else one [uncond; cond] call per step."""
    z, cond, uncond = _inputs()
    spy = _CallSpy(unet)
    try:
        with torch.no_grad():
            kw = dict(num_inference_steps=N, num_steps=2)
            one = ddim_denoise(unet, sd.scheduler, z, cond, **kw)
            one_ref = ddim_denoise(
                unet, sd.scheduler, z, cond, uncond=uncond, guidance_scale=1.0, **kw
            )
            zero = ddim_denoise(unet, sd.scheduler, z, cond, uncond=uncond, guidance_scale=0, **kw)
            cfg = ddim_denoise(unet, sd.scheduler, z, cond, uncond=uncond, guidance_scale=3, **kw)
    finally:
        spy.remove()
    assert [c[0] for c in spy.calls] == [2, 2, 2, 2, 2, 2, 4, 4]
    assert [c[2] for c in spy.calls] == [2, 2, 2, 2, 2, 2, 4, 4]
    for _, t, _ in spy.calls:
        assert isinstance(t, torch.Tensor) and t.device == z.device
    torch.testing.assert_close(one, one_ref, atol=0, rtol=0)
    with torch.no_grad():  # g=0 equals the full-batch formula with g=0, i.e. the uncond run
        ref = _diffusers_denoise(unet, sd.scheduler.config, N, 2, z, uncond, uncond, 1.0)
    torch.testing.assert_close(zero, ref, **TOL)
    assert not torch.allclose(cfg, one)


def test_one_embedding_row_is_shared(unet, sd):
    z, cond, uncond = _inputs(b=3)
    c1, u1 = cond[:1], uncond[:1]
    kw = dict(num_inference_steps=N, num_steps=2, guidance_scale=5.0)
    with torch.no_grad():
        got = ddim_invert(unet, sd.scheduler, z, c1, uncond=u1, **kw)
        ref = ddim_invert(
            unet, sd.scheduler, z, c1.expand(3, -1, -1), uncond=u1.repeat(3, 1, 1), **kw
        )
    torch.testing.assert_close(got, ref, **TOL)


def test_scheduler_not_mutated_and_inverse_accepted(sd, unet):
    scheduler = copy.deepcopy(sd.scheduler)
    scheduler.set_timesteps(7)
    before = (scheduler.num_inference_steps, scheduler.timesteps.clone())
    z, cond, _ = _inputs(b=1)
    with torch.no_grad():
        a = ddim_invert(unet, scheduler, z, cond, num_inference_steps=N, num_steps=2)
        inverse = DDIMInverseScheduler.from_config(scheduler.config)
        b = ddim_invert(unet, inverse, z, cond, num_inference_steps=N, num_steps=2)
    assert scheduler.num_inference_steps == before[0]
    assert torch.equal(scheduler.timesteps, before[1])
    assert inverse.num_inference_steps is None
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_sdxl_added_cond_kwargs_rows(sd_xl, sdxl_unet):
    emb = encode_prompt(sd_xl.tokenizer, sd_xl.text_encoder, ["a red cat", "a dog"])
    z, _, _ = _inputs(b=2)
    kw = dict(num_inference_steps=N, num_steps=2, uncond=emb.uncond, guidance_scale=4.0)
    both = sdxl_added_cond_kwargs(emb.pooled, 16, uncond_pooled=emb.uncond_pooled)
    assert both["text_embeds"].shape == (4, 16)
    with torch.no_grad():
        got = ddim_denoise(sdxl_unet, sd_xl.scheduler, z, emb.cond, added_cond_kwargs=both, **kw)
        ref = _diffusers_denoise(
            sdxl_unet,
            sd_xl.scheduler.config,
            N,
            2,
            z,
            emb.cond,
            emb.uncond,
            4.0,
            added=both,
        )
        torch.testing.assert_close(got, ref, **TOL)
        # B rows serve both halves: the same as 2B rows with equal halves
        single = sdxl_added_cond_kwargs(emb.pooled, 16)
        got_b = ddim_denoise(
            sdxl_unet, sd_xl.scheduler, z, emb.cond, added_cond_kwargs=single, **kw
        )
        doubled = {k: torch.cat([v, v]) for k, v in single.items()}
        ref_b = _diffusers_denoise(
            sdxl_unet, sd_xl.scheduler.config, N, 2, z, emb.cond, emb.uncond, 4.0, added=doubled
        )
        torch.testing.assert_close(got_b, ref_b, **TOL)
        # g=1: the cond half of a 2B dict is used
        half = ddim_denoise(
            sdxl_unet,
            sd_xl.scheduler,
            z,
            emb.cond,
            num_inference_steps=N,
            num_steps=2,
            added_cond_kwargs=both,
        )
        half_ref = _diffusers_denoise(
            sdxl_unet, sd_xl.scheduler.config, N, 2, z, emb.cond, None, 1.0, added=single
        )
        torch.testing.assert_close(half, half_ref, **TOL)


# ----------------------------------------------------------------------------- round trip


class _Replay(nn.Module):
    """Records a UNet's outputs, then replays them last-first (the scheduler identity)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        self.config = unet.config
        self.outputs: list[torch.Tensor] = []
        self.replay = False

    def forward(self, x, t, **kwargs):
        if self.replay:
            return (self.outputs.pop(),)
        out = self.unet(x, t, **kwargs)
        self.outputs.append(out[0])
        return out


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_round_trip_is_exact_with_replayed_eps(sd, unet, spacing):
    scheduler = DDIMScheduler.from_config(sd.scheduler.config, timestep_spacing=spacing)
    replay = _Replay(unet)
    z, cond, _ = _inputs()
    with torch.no_grad():
        zt = ddim_invert(replay, scheduler, z, cond, num_inference_steps=N, num_steps=N)
        replay.replay = True
        back = ddim_denoise(replay, scheduler, zt, cond, num_inference_steps=N, num_steps=N)
    assert not replay.outputs
    assert (zt - z).abs().max() > 0.5  # the inversion went somewhere
    torch.testing.assert_close(back, z, atol=1e-5, rtol=0)


def test_round_trip_error_shrinks_with_finer_steps(sd, unet):
    """Invert up to the same level t=401 with finer and finer steps, then denoise back.

    A random UNet does not reconstruct tightly; only the trend is asserted.
    """
    z, cond, _ = _inputs()
    errors = []
    with torch.no_grad():
        for n, k in [(10, 5), (20, 9), (40, 17)]:
            assert ddim_timesteps(sd.scheduler, num_inference_steps=n, num_steps=k)[0] == 401
            kw = dict(num_inference_steps=n, num_steps=k)
            zt = ddim_invert(unet, sd.scheduler, z, cond, **kw)
            back = ddim_denoise(unet, sd.scheduler, zt, cond, **kw)
            errors.append(((back - z).norm() / z.norm()).item())
    assert errors[0] > errors[1] > errors[2], errors


# ----------------------------------------------------------------------------- gradients


def _params_have_no_grad(*modules):
    return all(p.grad is None for m in modules for p in m.parameters())


def test_gradient_reaches_image_through_the_whole_path(sd):
    g = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, 15, 15, generator=g).requires_grad_(True)  # classifier side
    emb = encode_prompt(sd.tokenizer, sd.text_encoder, "a photo of a cat")
    x = to_diffusion_input(image, multiple=2)
    z = vae_encode(sd.vae, x)
    kw = dict(num_inference_steps=N, num_steps=2, uncond=emb.uncond)
    zt = ddim_invert(sd.unet, sd.scheduler, z, emb.cond, guidance_scale=0.0, **kw)
    out = ddim_denoise(sd.unet, sd.scheduler, zt, emb.cond, guidance_scale=7.5, **kw)
    out.square().mean().backward()
    assert image.grad is not None and torch.isfinite(image.grad).all()
    assert image.grad.abs().sum() > 0
    assert _params_have_no_grad(sd.unet, sd.vae, sd.text_encoder)


def test_gradient_reaches_embeddings(unet, sd):
    z, cond, uncond = _inputs()
    cond.requires_grad_(True)
    uncond.requires_grad_(True)
    kw = dict(num_inference_steps=N, num_steps=2, uncond=uncond, guidance_scale=3.0)
    ddim_denoise(unet, sd.scheduler, z, cond, **kw).sum().backward()
    for t in (cond, uncond):
        assert t.grad is not None and t.grad.abs().sum() > 0
    assert _params_have_no_grad(unet)


@pytest.mark.parametrize("g", [1.0, 4.0])
def test_checkpoint_same_values_and_gradients(unet, sd, g):
    results = []
    for use_checkpoint in (False, True):
        z, cond, uncond = _inputs(seed=3)
        z.requires_grad_(True)
        cond.requires_grad_(True)
        kw = dict(
            num_inference_steps=N,
            num_steps=3,
            uncond=uncond,
            guidance_scale=g,
            checkpoint=use_checkpoint,
        )
        spy = _CallSpy(unet)
        try:
            zt = ddim_invert(unet, sd.scheduler, z, cond, **kw)
            out = ddim_denoise(unet, sd.scheduler, zt, cond, **kw)
            forward_calls = len(spy.calls)
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
            backward_calls = len(spy.calls) - forward_calls
        finally:
            spy.remove()
        results.append((out.detach(), z.grad, cond.grad, forward_calls, backward_calls))
    (o0, gz0, gc0, f0, b0), (o1, gz1, gc1, f1, b1) = results
    assert (f0, b0) == (6, 0)  # a plain loop never re-runs the UNet
    assert (f1, b1) == (6, 6)  # checkpointing recomputes every UNet call once in backward
    torch.testing.assert_close(o1, o0, atol=0, rtol=0)
    torch.testing.assert_close(gz1, gz0, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gc1, gc0, atol=1e-6, rtol=1e-5)
    assert gz0.abs().sum() > 0 and _params_have_no_grad(unet)


def test_checkpoint_is_skipped_without_grad(unet, sd):
    z, cond, _ = _inputs(b=1)
    spy = _CallSpy(unet)
    try:
        with torch.no_grad():
            out = ddim_denoise(
                unet, sd.scheduler, z, cond, num_inference_steps=N, num_steps=2, checkpoint=True
            )
    finally:
        spy.remove()
    assert len(spy.calls) == 2 and not out.requires_grad


@pytest.mark.parametrize("use_checkpoint", [False, True])
def test_gradcheck_float64(unet, sd, use_checkpoint):
    unet64 = copy.deepcopy(unet).double()
    g = torch.Generator().manual_seed(5)
    z = torch.randn(1, 4, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    cond = torch.randn(1, 77, 8, generator=g, dtype=torch.float64)
    uncond = torch.randn(1, 77, 8, generator=g, dtype=torch.float64)
    kw = dict(
        num_inference_steps=N,
        num_steps=1,
        uncond=uncond,
        guidance_scale=2.0,
        checkpoint=use_checkpoint,
    )

    def f(z):
        return ddim_denoise(
            unet64, sd.scheduler, ddim_invert(unet64, sd.scheduler, z, cond, **kw), cond, **kw
        )

    assert torch.autograd.gradcheck(f, (z,), fast_mode=True)


def test_inference_mode_first_then_checkpointed_training(unet, sd):
    """Cached timestep tensors made under inference_mode must not poison later backward."""
    z, cond, _ = _inputs(b=1)
    kw = dict(num_inference_steps=7, num_steps=2)
    with torch.inference_mode():
        ddim_denoise(unet, sd.scheduler, z, cond, **kw)
    z.requires_grad_(True)
    ddim_denoise(unet, sd.scheduler, z, cond, checkpoint=True, **kw).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_latents_not_modified_in_place(unet, sd):
    z, cond, uncond = _inputs()
    z.requires_grad_(True)
    version, copy_z = z._version, z.detach().clone()
    out = ddim_invert(
        unet,
        sd.scheduler,
        z,
        cond,
        uncond=uncond,
        guidance_scale=2.0,
        num_inference_steps=N,
        num_steps=2,
    )
    out.sum().backward()
    assert z._version == version and torch.equal(z.detach(), copy_z)


# ----------------------------------------------------------------------------- errors


def _bad_cases(sd):
    z, cond, uncond = _inputs()
    ok = dict(num_inference_steps=N, num_steps=2)
    s = sd.scheduler
    linspace = DDIMScheduler.from_config(s.config, timestep_spacing="linspace")
    return [
        ("k0", (s, z, cond), dict(ok, num_steps=0), "num_steps=0"),
        ("k>N", (s, z, cond), dict(ok, num_steps=11), "num_steps <= 10"),
        ("N0", (s, z, cond), dict(ok, num_inference_steps=0), "num_inference_steps=0"),
        ("k float", (s, z, cond), dict(ok, num_steps=2.0), "must be an int"),
        ("latents 3-D", (s, z[0], cond), ok, "(B, 4, h, w)"),
        ("latents int", (s, z.long(), cond), ok, "float"),
        ("image as latents", (s, torch.rand(2, 3, 8, 8), cond), ok, "3 channels"),
        ("cond batch", (s, z, torch.randn(3, 77, 8)), ok, "batch 3 but latents have batch 2"),
        ("cond 2-D", (s, z, cond[0]), ok, "(B, L, D)"),
        ("width", (s, z, torch.randn(2, 77, 16)), ok, "width 16"),
        ("no uncond", (s, z, cond), dict(ok, guidance_scale=7.5), "needs uncond"),
        (
            "uncond width",
            (s, z, cond),
            dict(ok, guidance_scale=2, uncond=uncond[..., :4]),
            "width 4",
        ),
        (
            "uncond length",
            (s, z, cond),
            dict(ok, guidance_scale=2, uncond=uncond[:, :10]),
            "10 tokens",
        ),
        ("nan guidance", (s, z, cond), dict(ok, guidance_scale=float("nan")), "finite"),
        ("device", (s, z, cond.to("meta")), ok, "meta"),
        ("latents nan", (s, z * float("nan"), cond), ok, "NaN or Inf"),
        ("cond dtype", (s, z, cond.double()), ok, "cond.to(latents.dtype)"),
        ("linspace", (linspace, z, cond), ok, "timestep_spacing='linspace'"),
        ("pndm", (PNDMScheduler.from_config(s.config), z, cond), ok, "DDIMScheduler.from_config"),
        (
            "euler",
            (EulerDiscreteScheduler.from_config(s.config), z, cond),
            ok,
            "DDIMScheduler.from_config(pipe.scheduler.config)",
        ),
    ]


@pytest.mark.parametrize("case", range(20))
def test_bad_arguments_raise_before_any_unet_call(unet, sd, case):
    cases = _bad_cases(sd)
    assert len(cases) == 20
    _, (scheduler, z, cond), kw, needle = cases[case]
    spy = _CallSpy(unet)
    try:
        with pytest.raises(AttnPatchError) as err:
            ddim_invert(unet, scheduler, z, cond, **kw)
    finally:
        spy.remove()
    assert needle in str(err.value)
    assert spy.calls == []


def test_width_error_names_both_numbers(unet, sd):
    z, _, _ = _inputs()
    with pytest.raises(AttnPatchError, match=r"width 16 .* expects 8"):
        ddim_denoise(
            unet, sd.scheduler, z, torch.randn(2, 77, 16), num_inference_steps=N, num_steps=1
        )


def test_linspace_denoise_is_allowed(unet, sd):
    config = dict(sd.scheduler.config, timestep_spacing="linspace")
    scheduler = DDIMScheduler.from_config(config)
    z, cond, _ = _inputs(b=1)
    with torch.no_grad():
        got = ddim_denoise(unet, scheduler, z, cond, num_inference_steps=N, num_steps=2)
        ref = _diffusers_denoise(unet, config, N, 2, z, cond, None, 1.0)
    torch.testing.assert_close(got, ref, **TOL)


def test_sdxl_errors(sd_xl, sdxl_unet):
    z, cond, uncond = _inputs(width=16)
    kw = dict(num_inference_steps=N, num_steps=1)
    with pytest.raises(AttnPatchError, match="sdxl_added_cond_kwargs"):
        ddim_invert(sdxl_unet, sd_xl.scheduler, z, cond, **kw)
    with pytest.raises(AttnPatchError, match=r"missing \['time_ids'\]"):
        ddim_invert(
            sdxl_unet, sd_xl.scheduler, z, cond, added_cond_kwargs={"text_embeds": cond[:, 0]}, **kw
        )
    bad = {"text_embeds": torch.randn(3, 16), "time_ids": torch.randn(3, 6)}
    with pytest.raises(AttnPatchError, match="batch 3 but latents have batch 2"):
        ddim_invert(sdxl_unet, sd_xl.scheduler, z, cond, added_cond_kwargs=bad, **kw)
