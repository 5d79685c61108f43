"""``Family.predict`` equals the transformer calls diffusers' own pipelines make
(``StableDiffusion3Pipeline``, ``FluxPipeline``, ``StableDiffusionPipeline``), captured on tiny
random models; and refuses bad inputs before the model runs."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

from attnpatch.errors import InputError
from attnpatch.families import family_of, predict, unpack_latents


def _capture(model, with_args=False):
    calls = []

    def hook(module, args, kwargs, out):
        calls.append(((args, kwargs) if with_args else kwargs, out[0].detach()))

    return calls, model.register_forward_hook(hook, with_kwargs=True)


def _sd3_pipeline(transformer):
    none = dict.fromkeys(
        ["vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"]
        + ["text_encoder_3", "tokenizer_3"]
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), **none
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("variant", ["sd3", "sd35"])
def test_sd3_predict_equals_the_pipelines_transformer_call(variant, dit_builders):
    model = dit_builders[variant]()
    pipe = _sd3_pipeline(model)
    g = torch.Generator().manual_seed(0)
    embeds = [torch.randn(2, 7, 16, generator=g), torch.randn(2, 12, generator=g)]
    negative = [torch.randn(2, 7, 16, generator=g), torch.randn(2, 12, generator=g)]
    calls, handle = _capture(model)
    with torch.no_grad():
        pipe(
            prompt_embeds=embeds[0],
            pooled_prompt_embeds=embeds[1],
            negative_prompt_embeds=negative[0],
            negative_pooled_prompt_embeds=negative[1],
            guidance_scale=3.0,
            num_inference_steps=3,
            height=64,
            width=48,  # a non-square 8x6 latent
            output_type="latent",
            generator=g,
        )
    handle.remove()
    assert len(calls) == 3
    for kw, out in calls:
        t = kw["timestep"][0]  # scheduler units, as the pipeline's loop has it
        with torch.no_grad():
            got = predict(
                model, kw["hidden_states"], t, kw["encoder_hidden_states"], kw["pooled_projections"]
            )
        assert got.shape == out.shape == (4, 4, 8, 6)  # [uncond; cond] x 2 prompts
        assert torch.equal(got, out)


@pytest.mark.parametrize("variant", ["flux", "flux-dev"])
def test_flux_predict_equals_the_pipelines_transformer_call(variant, dit_builders):
    model = dit_builders[variant]()
    none = dict.fromkeys(["vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"])
    pipe = FluxPipeline(transformer=model, scheduler=FlowMatchEulerDiscreteScheduler(), **none)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    calls, handle = _capture(model)
    with torch.no_grad():
        pipe(
            prompt_embeds=torch.randn(2, 9, 16, generator=g),
            pooled_prompt_embeds=torch.randn(2, 12, generator=g),
            guidance_scale=3.5,  # the guidance embedding's scale (used by dev only)
            num_inference_steps=3,
            height=96,
            width=64,  # latent 12x8, packed grid 6x4
            output_type="latent",
            generator=g,
        )
    handle.remove()
    assert len(calls) == 3
    for kw, out in calls:
        latents = unpack_latents(kw["hidden_states"], (12, 8))
        t = kw["timestep"][0] * 1000  # back to the scheduler's units
        guidance = 3.5 if variant == "flux-dev" else None
        with torch.no_grad():
            got = predict(
                model,
                latents,
                t,
                kw["encoder_hidden_states"],
                kw["pooled_projections"],
                guidance=guidance,
            )
        assert got.shape == (2, 4, 12, 8)
        torch.testing.assert_close(got, unpack_latents(out, (12, 8)), rtol=0, atol=1e-6)


def test_unet_predict_equals_the_pipelines_unet_call(sd15):
    pipe = sd15.pipeline()
    pipe.set_progress_bar_config(disable=True)
    calls, handle = _capture(sd15.unet, with_args=True)
    with torch.no_grad():
        pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="latent")
    handle.remove()
    assert family_of(sd15.unet).scheduler == "ddim" and len(calls) == 2
    for (args, kw), out in calls:
        (sample, t), cond = args, kw["encoder_hidden_states"]  # the pipeline's call convention
        with torch.no_grad():
            got = predict(sd15.unet, sample, t, cond)
        assert torch.equal(got, out)


def test_sd3_predict_carries_gradients_to_latents_and_text(dit_builders):
    model = dit_builders["sd3"]().requires_grad_(False)
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    cond = torch.randn(1, 5, 16, requires_grad=True)
    predict(model, x, 500.0, cond, torch.randn(1, 12)).square().mean().backward()
    assert x.grad.abs().sum() > 0 and cond.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_bad_inputs_are_refused_before_the_model_runs(dit_builders, sd15):
    sd3, flux, dev = dit_builders["sd3"](), dit_builders["flux"](), dit_builders["flux-dev"]()
    x, cond, pooled = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 16), torch.randn(1, 12)
    cases = [
        (lambda: predict(sd3, x, 1.0, cond), "pooled"),
        (lambda: predict(sd3, x[:, :3], 1.0, cond, pooled), "channels"),
        (lambda: predict(sd3, x[..., :7], 1.0, cond, pooled), "patch size"),
        (lambda: predict(sd3, x, torch.ones(3), cond, pooled), "timestep"),
        (lambda: predict(flux, x[..., :7], 1.0, cond, pooled), "even"),
        (lambda: predict(flux, x, 1.0, cond, pooled, guidance=3.5), "guidance=None"),
        (lambda: predict(dev, x, 1.0, cond, pooled), "guidance=<scale>"),
        (lambda: predict(sd15.unet, x, 1, torch.randn(1, 77, 8), pooled), "added_cond"),
    ]
    for call, words in cases:
        with pytest.raises(InputError, match=words):
            call()
