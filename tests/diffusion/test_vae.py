"""vae_encode / vae_decode against by-hand posterior computations; gradients; errors."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKL

from attnpatch.diffusion.vae import vae_decode, vae_encode, vae_scale_factor
from attnpatch.errors import AttnPatchError
from attnpatch.testing import tiny_vae


@pytest.fixture(scope="module")
def vae():
    return tiny_vae()


def _vae_with(**config):
    torch.manual_seed(0)
    return (
        AutoencoderKL(
            block_out_channels=(4, 8),
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4,
            norm_num_groups=2,
            **config,
        )
        .eval()
        .requires_grad_(False)
    )


def _images(b=2, size=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g, dtype=dtype) * 2 - 1


def _posterior_by_hand(vae, x):
    """mean, std of the diagonal Gaussian, from the encoder's raw moments."""
    moments = vae.quant_conv(vae.encoder(x))
    mean, logvar = moments.chunk(2, dim=1)
    return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))


def test_scale_factor(vae):
    assert vae_scale_factor(vae) == 2
    sd_like = SimpleNamespace(config=SimpleNamespace(block_out_channels=(128, 256, 512, 512)))
    assert vae_scale_factor(sd_like) == 8
    with pytest.raises(AttnPatchError, match="block_out_channels"):
        vae_scale_factor(torch.nn.Linear(1, 1))


def test_encode_is_scaled_posterior_mean(vae):
    x = _images()
    z = vae_encode(vae, x)
    mean, _ = _posterior_by_hand(vae, x)
    assert z.shape == (2, 4, 4, 4)
    torch.testing.assert_close(z, mean * vae.config.scaling_factor, atol=1e-6, rtol=1e-6)
    assert vae.config.scaling_factor != 1.0  # the test would not see a missing scale otherwise


def test_encode_sample_is_reparameterised(vae):
    x = _images()
    z = vae_encode(vae, x, sample=True, generator=torch.Generator().manual_seed(7))
    mean, std = _posterior_by_hand(vae, x)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(
        z, (mean + std * noise) * vae.config.scaling_factor, atol=1e-6, rtol=1e-6
    )


def test_shift_factor_and_round_trip_of_the_affine():
    vae = _vae_with(scaling_factor=0.5, shift_factor=0.25)
    x = _images()
    mean, _ = _posterior_by_hand(vae, x)
    z = vae_encode(vae, x)
    torch.testing.assert_close(z, (mean - 0.25) * 0.5, atol=1e-6, rtol=1e-6)
    ref = vae.decoder(vae.post_quant_conv(z / 0.5 + 0.25))
    torch.testing.assert_close(vae_decode(vae, z), ref, atol=1e-6, rtol=1e-6)


def test_latents_mean_std_like_sdxl_pipelines():
    mean_c, std_c = (0.1, -0.2, 0.3, 0.0), (1.0, 2.0, 0.5, 4.0)
    vae = _vae_with(scaling_factor=0.5, latents_mean=mean_c, latents_std=std_c)
    x = _images()
    post, _ = _posterior_by_hand(vae, x)
    m, s = torch.tensor(mean_c).view(1, 4, 1, 1), torch.tensor(std_c).view(1, 4, 1, 1)
    z = vae_encode(vae, x)
    torch.testing.assert_close(z, (post - m) * 0.5 / s, atol=1e-6, rtol=1e-6)
    ref = vae.decoder(vae.post_quant_conv(z * s / 0.5 + m))
    torch.testing.assert_close(vae_decode(vae, z), ref, atol=1e-6, rtol=1e-6)


def test_decode_matches_decoder_and_does_not_clamp_by_default(vae):
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1)) * 20
    ref = vae.decoder(vae.post_quant_conv(z / vae.config.scaling_factor))
    out = vae_decode(vae, z)
    assert out.shape == (2, 3, 8, 8)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    clamped = vae_decode(vae, z, clamp=True)
    torch.testing.assert_close(clamped, ref.clamp(-1, 1), atol=1e-6, rtol=1e-6)


def test_gradients_reach_images_and_latents_not_weights(vae):
    x = _images().requires_grad_(True)
    vae_encode(vae, x, sample=True).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    z = torch.randn(1, 4, 4, 4, requires_grad=True)
    vae_decode(vae, z).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert all(p.grad is None for p in vae.parameters())


def test_clamp_kills_gradient_outside_range(vae):
    z = (torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2)) * 50).requires_grad_()
    out = vae_decode(vae, z)
    outside = (out.abs() > 1).float()
    assert outside.sum() > 0  # the premise: some pixels leave [-1, 1]
    grad_out = torch.autograd.grad(vae_decode(vae, z, clamp=True), z, outside)[0]
    assert grad_out.abs().max() == 0
    grad_free = torch.autograd.grad(out, z, outside)[0]
    assert grad_free.abs().max() > 0


def test_gradcheck_float64(vae):
    vae64 = copy.deepcopy(vae).double()
    x = _images(b=1, size=4, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: vae_encode(vae64, t), (x,), fast_mode=True)
    z = torch.randn(1, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: vae_decode(vae64, t), (z,), fast_mode=True)


@pytest.mark.parametrize(
    "images, needle",
    [
        (torch.rand(1, 3, 8, 8) * 255, "x / 127.5 - 1"),
        (torch.rand(1, 3, 9, 8) * 2 - 1, "to_diffusion_input(images_01, multiple=2)"),
        (torch.rand(1, 8, 8, 3) * 2 - 1, "permute(0, 3, 1, 2)"),
        (torch.rand(3, 8, 8), "unsqueeze(0)"),
    ],
)
def test_encode_errors(vae, images, needle):
    with pytest.raises(AttnPatchError) as err:
        vae_encode(vae, images)
    assert needle in str(err.value)


def test_other_errors(vae):
    with pytest.raises(AttnPatchError, match="sample=True"):
        vae_encode(vae, _images(), generator=torch.Generator())
    with pytest.raises(AttnPatchError, match=r"\(B, 4, h, w\)"):
        vae_decode(vae, torch.randn(1, 3, 4, 4))
    with pytest.raises(AttnPatchError, match="unsqueeze"):
        vae_decode(vae, torch.randn(4, 4, 4))
