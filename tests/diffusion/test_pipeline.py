"""AttentionPipeline: equal to the pipeline written out from the public pieces; its choices and
its checks."""

from __future__ import annotations

import pytest
import torch

import attnpatch as ap
from attnpatch.diffusion import DiffusionParts, PromptEmbeds, sdxl_added_cond_kwargs
from attnpatch.testing import tiny_sd

N, K = 6, 2
PROMPTS = ["a photo of a circle", "a photo of a star"]


@pytest.fixture(scope="module")
def deep():
    return ap.load_diffusion(tiny_sd("sd15", deep=True))  # attention at two resolutions


def _images(b=2, size=32, seed=0):
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _by_hand(parts, images, prompts, g, size):
    """The same pipeline from the public functions, as a user would write it."""
    x = ap.to_diffusion_input(images, size, multiple=parts.vae_scale_factor)
    z0 = ap.vae_encode(parts.vae, x)
    e = ap.encode_prompt(parts.tokenizer, parts.text_encoder, prompts)
    added = None
    if parts.variant == "sdxl":
        added = sdxl_added_cond_kwargs(e.pooled, size, uncond_pooled=e.uncond_pooled)
    kw = dict(num_inference_steps=N, num_steps=K, added_cond_kwargs=added)
    zT = ap.ddim_invert(parts.unet, parts.scheduler, z0, e.cond, **kw)
    store = ap.AttentionStore()
    with ap.hijack(parts.unet, store):
        out = ap.ddim_denoise(
            parts.unet, parts.scheduler, zT, e.cond, uncond=e.uncond, guidance_scale=g, **kw
        )
    return z0, zT, out, store


@pytest.mark.parametrize("variant, g", [("sd15", 1.0), ("sd15", 3.0), ("sdxl", 2.0)])
def test_equals_the_pipeline_written_by_hand(variant, g):
    parts = ap.load_diffusion(f"tiny-{variant}")
    images = _images()
    pipe = ap.AttentionPipeline(
        parts, num_inference_steps=N, num_steps=K, guidance_scale=g, image_size=32
    )
    with torch.no_grad():
        got = pipe(images, PROMPTS)
        z0, zT, out, store = _by_hand(parts, images, PROMPTS, g, 32)
    for a, b in ((got.z0, z0), (got.zT, zT), (got.denoised, out)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    res = pipe.cross_resolution
    full = store.aggregate("cross", res)  # [uncond; cond] rows under guidance
    assert full.shape[0] == (4 if g != 1.0 else 2)
    torch.testing.assert_close(got.cross_maps(res), full[-2:], atol=1e-6, rtol=1e-5)
    for name, maps in got.self_maps().items():
        torch.testing.assert_close(maps, store.maps("self")[name][-2:], atol=1e-6, rtol=1e-5)
    assert got.cross.num_steps == K


def test_embeddings_instead_of_prompts_give_the_same_result(deep):
    pipe = ap.AttentionPipeline(deep, num_inference_steps=N, num_steps=K, image_size=32)
    class_embeds = pipe.encode_prompts(["a photo of a star", "a photo of a circle"])
    assert isinstance(class_embeds, PromptEmbeds) and class_embeds.cond.shape[0] == 2
    with torch.no_grad():
        a = pipe(_images(), PROMPTS)
        b = pipe(_images(), class_embeds.take([1, 0]))
    torch.testing.assert_close(
        a.cross_maps(pipe.cross_resolution), b.cross_maps(pipe.cross_resolution), atol=0, rtol=0
    )


def test_resolutions_sizes_and_mask(deep):
    pipe = ap.AttentionPipeline(deep, image_size=(30, 20))  # rounded up to the VAE factor 2
    assert pipe.image_size == (30, 20) and pipe.factor == 2
    latent = (15, 10)
    assert [s.resolution for s in pipe.sites] == [
        s.resolution for s in ap.trace_attention(deep.unet, latent)
    ]
    assert pipe.cross_resolution == (4, 3)  # the smallest size both down and up blocks attend at
    assert pipe.self_resolutions == [(4, 3), (8, 5)]
    odd = ap.AttentionPipeline(deep, image_size=31, cross_resolution=8, self_resolutions=[8])
    assert odd.image_size == (32, 32) and odd.cross_resolution == (8, 8)
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., :32, :] = 1
    small = pipe.resize_mask(mask)
    assert small.shape == (1, 1, 30, 20)
    assert small[..., :14, :].min() > 1 - 1e-6 and small[..., 16:, :].max() < 1e-6


def test_gradients_reach_the_images_only(deep):
    pipe = ap.AttentionPipeline(deep, num_inference_steps=N, num_steps=K, image_size=32)
    images = _images().requires_grad_(True)
    result = pipe(images, PROMPTS)
    loss = result.cross_maps(pipe.cross_resolution)[..., 5].var() + sum(
        m.square().mean() for m in result.self_maps().values()
    )
    loss.backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is None for m in deep.modules() for p in m.parameters())
    assert not ap.hooks.is_hijacked(deep.unet)


def test_checks_before_any_work(deep):
    with pytest.raises(ap.AttnPatchError, match="needs a DiffusionParts"):
        ap.AttentionPipeline(object())
    with pytest.raises(ap.AttnPatchError, match="num_steps=5 is out of range"):
        ap.AttentionPipeline(deep, num_inference_steps=4, num_steps=5)
    with pytest.raises(ap.AttnPatchError, match="no cross-attention at resolution"):
        ap.AttentionPipeline(deep, image_size=32, cross_resolution=5)
    with pytest.raises(ap.AttnPatchError, match="image_size must be a positive int"):
        ap.AttentionPipeline(deep, image_size=(0, 32))
    pipe = ap.AttentionPipeline(deep, image_size=32)
    with pytest.raises(ap.AttnPatchError, match="got 1 prompts for 2 images"):
        pipe(_images(), PROMPTS[:1])
    embeds = pipe.encode_prompts(PROMPTS[:1])
    with pytest.raises(ap.AttnPatchError, match="got 1 prompts for 2 images"):
        pipe(_images(), embeds)
    with pytest.raises(ap.AttnPatchError, match=r"\[-1, 1\] diffusion input"):
        pipe(_images() * 2 - 1, PROMPTS)
    assert isinstance(deep, DiffusionParts)


def test_cross_maps_without_a_resolution_is_a_typed_error(deep):
    """Issue 22: ``result.cross_maps(None)`` raised torch's stack error."""
    pipe = ap.AttentionPipeline(deep, num_inference_steps=N, num_steps=1, image_size=32)
    with torch.no_grad():
        result = pipe(_images(1), PROMPTS[:1])
    with pytest.raises(ap.errors.InputError, match="needs a resolution"):
        result.cross_maps(None)
    assert result.cross_maps(pipe.cross_resolution).shape[-1] == 77


def test_a_resized_hard_mask_stays_in_unit_range_for_the_region_losses():
    """Antialiased resizing of a 0/1 mask from 224 to 64 px rounds full cells to 1 + 2.4e-7
    (torch 2.13 and 2.14); the losses refuse a mask above 1, so the pipeline clamps it."""
    from types import SimpleNamespace

    from attnpatch.diffusion.pipeline import AttentionPipeline, resize
    from attnpatch.losses.image import downsample_mask

    mask = torch.zeros(2, 1, 224, 224)
    mask[:, :, 50:100, 60:110] = 1
    assert resize(mask, (64, 64)).max() > 1  # the rounding this guards against
    out = AttentionPipeline.resize_mask(SimpleNamespace(image_size=(64, 64)), mask)
    assert out.shape == (2, 1, 64, 64)
    assert out.min() >= 0 and out.max() == 1
    assert downsample_mask(out, (16, 16)).max() <= 1
