"""attnpatch.losses.image: L2 distance, total variation, non-printability, mask downsampling."""

from __future__ import annotations

import doctest
import math

import kornia
import pytest
import torch
import torch.nn.functional as F

from attnpatch.errors import ImageLayoutError, ImageRangeError, InputError
from attnpatch.losses import image as image_mod
from attnpatch.losses.image import (
    PRINTABLE_LEVELS,
    L2Norm,
    NonPrintabilityScore,
    TotalVariation,
    downsample_mask,
    l2_norm,
    non_printability_score,
    printable_palette,
    total_variation,
)


def test_docstring_examples_run():
    result = doctest.testmod(image_mod, extraglobs={"torch": torch})
    assert result.attempted > 0 and result.failed == 0


# -- downsample_mask -------------------------------------------------------------------------
def test_downsample_mask_is_block_mean():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(2, 1, 12, 8, generator=g)
    out = downsample_mask(mask, (3, 2))
    assert out.shape == (2, 1, 3, 2)
    # Independent reference: the mean of each 4x4 block, by slicing.
    for y in range(3):
        for x in range(2):
            block = mask[:, 0, 4 * y : 4 * y + 4, 4 * x : 4 * x + 4].mean(dim=(1, 2))
            torch.testing.assert_close(out[:, 0, y, x], block)
    torch.testing.assert_close(out, F.adaptive_avg_pool2d(mask, (3, 2)))


def test_downsample_mask_accepts_bhw_and_identity():
    mask = (torch.arange(16.0).reshape(1, 4, 4) > 7).float()
    assert torch.equal(downsample_mask(mask, (4, 4)), mask[:, None])
    assert downsample_mask(mask, (2, 2)).flatten().tolist() == [0.0, 0.0, 1.0, 1.0]


@pytest.mark.parametrize(
    "shape, size, match",
    [
        ((1, 1, 10, 10), (4, 4), "does not match maps of resolution 4x4"),
        ((1, 1, 16, 12), (4, 4), "one integer factor"),
        ((1, 1, 2, 2), (4, 4), "does not match"),
        ((1, 3, 8, 8), (4, 4), "one channel"),
        ((8, 8), (4, 4), r"\(B, 1, H, W\) or \(B, H, W\)"),
    ],
)
def test_downsample_mask_bad_shapes(shape, size, match):
    with pytest.raises(InputError, match=match):
        downsample_mask(torch.ones(shape), size)


def test_downsample_mask_bad_values():
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        downsample_mask(torch.full((1, 1, 4, 4), 255.0), (2, 2))
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        downsample_mask(torch.full((1, 1, 4, 4), float("nan")), (2, 2))


# -- l2_norm ---------------------------------------------------------------------------------
def test_l2_norm_by_hand():
    adv = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # (1, 1, 2, 2)
    clean = torch.zeros_like(adv)
    assert l2_norm(adv, clean).item() == 1 + 4 + 9 + 16
    mask = torch.tensor([[[1.0, 0.0], [0.5, 0.0]]])  # (1, 2, 2): weights
    assert l2_norm(adv, clean, mask=mask).item() == 1 + 0.5 * 9


def test_l2_norm_reductions_and_broadcast():
    g = torch.Generator().manual_seed(1)
    adv, clean = torch.rand(3, 3, 4, 4, generator=g), torch.rand(1, 3, 4, 4, generator=g)
    per = torch.stack([((adv[b] - clean[0]) ** 2).sum() for b in range(3)])
    torch.testing.assert_close(l2_norm(adv, clean, reduction="none"), per)
    torch.testing.assert_close(l2_norm(adv, clean, reduction="sum"), per.sum())
    torch.testing.assert_close(l2_norm(adv, clean), per.mean())
    torch.testing.assert_close(L2Norm("none")(adv, clean), per)


def test_l2_norm_on_latents_with_image_mask():
    g = torch.Generator().manual_seed(2)
    lat_adv, lat_clean = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    mask = torch.zeros(2, 1, 32, 32)
    mask[:, :, :12, :10] = 1.0  # partial cover of latent cells (factor 8): soft weights
    weights = F.adaptive_avg_pool2d(mask, (4, 4))
    expected = (weights * (lat_adv - lat_clean) ** 2).flatten(1).sum(1).mean()
    torch.testing.assert_close(l2_norm(lat_adv, lat_clean, mask=mask), expected)


def test_l2_norm_gradient_reaches_adv():
    adv = torch.rand(2, 3, 4, 4, requires_grad=True)
    clean = torch.rand(2, 3, 4, 4)
    l2_norm(adv, clean).backward()
    torch.testing.assert_close(adv.grad, 2 * (adv.detach() - clean) / 2)


def test_l2_norm_gradcheck():
    g = torch.Generator().manual_seed(3)
    adv = torch.rand(2, 2, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    clean = torch.rand(2, 2, 4, 4, generator=g, dtype=torch.float64)
    mask = torch.rand(2, 1, 8, 8, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, m: l2_norm(a, clean, mask=m), (adv, mask))


def test_l2_norm_errors():
    with pytest.raises(InputError, match="shape of adv"):
        l2_norm(torch.rand(2, 3, 4, 4), torch.rand(2, 4, 4, 4))
    with pytest.raises(InputError, match="mask has batch 3"):
        l2_norm(torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4), mask=torch.ones(3, 4, 4))
    with pytest.raises(InputError, match="does not match"):
        l2_norm(torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4), mask=torch.ones(2, 6, 6))
    with pytest.raises(InputError, match="reduction"):
        l2_norm(torch.rand(1, 3, 4, 4), torch.rand(1, 3, 4, 4), reduction="avg")
    with pytest.raises(InputError, match="4-D|must be"):
        l2_norm(torch.rand(3, 4, 4), torch.rand(3, 4, 4))


# -- total_variation -------------------------------------------------------------------------
def test_total_variation_by_hand():
    x = torch.tensor([[[0.0, 1.0], [0.0, 3.0]]])  # (1, 2, 2)
    # |dy| = [0, 2] (2 diffs), |dx| = [1, 3] (2 diffs)
    assert total_variation(x, normalize=False).item() == 0 + 2 + 1 + 3
    assert total_variation(x).item() == (0 + 2) / 2 + (1 + 3) / 2


@pytest.mark.parametrize("normalize", [True, False])
def test_total_variation_matches_kornia(normalize):
    g = torch.Generator().manual_seed(4)
    x = torch.rand(3, 3, 5, 7, generator=g)
    if normalize:
        # kornia's 'mean' is per channel; ours averages over all channels' differences.
        ref = kornia.losses.total_variation(x, reduction="mean").mean(dim=1)
    else:
        ref = kornia.losses.total_variation(x, reduction="sum").sum(dim=1)
    torch.testing.assert_close(total_variation(x, normalize=normalize, reduction="none"), ref)
    torch.testing.assert_close(total_variation(x, normalize=normalize), ref.mean())
    torch.testing.assert_close(TotalVariation(normalize, "sum")(x), ref.sum())


def test_total_variation_single_patch_and_singleton_axis():
    x = torch.rand(3, 1, 6)
    assert total_variation(x).ndim == 0
    ref = (x[..., 1:] - x[..., :-1]).abs().mean()
    torch.testing.assert_close(total_variation(x), ref)


def test_total_variation_gradient_reaches_patch():
    patch = torch.nn.Parameter(torch.rand(3, 6, 6))
    total_variation(patch).backward()
    assert patch.grad is not None and patch.grad.abs().sum() > 0
    # A constant image has zero TV and, with PyTorch's subgradient, zero gradient.
    flat = torch.full((3, 6, 6), 0.5, requires_grad=True)
    total_variation(flat).backward()
    assert torch.count_nonzero(flat.grad) == 0


def test_total_variation_gradcheck():
    g = torch.Generator().manual_seed(5)
    x = torch.rand(2, 2, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(total_variation, (x,))
    assert torch.autograd.gradcheck(lambda t: total_variation(t, normalize=False), (x,))


# -- palette / non-printability --------------------------------------------------------------
def test_default_palette():
    pal = printable_palette()
    assert pal.shape == (len(PRINTABLE_LEVELS) ** 3, 3)
    assert len({tuple(c) for c in pal.tolist()}) == pal.shape[0]
    assert set(pal.flatten().tolist()) == set(torch.tensor(PRINTABLE_LEVELS).tolist())


def test_palette_from_tensor():
    torch.testing.assert_close(
        printable_palette(torch.tensor([[255, 0, 51]], dtype=torch.uint8)),
        torch.tensor([[1.0, 0.0, 0.2]]),
    )
    custom = torch.tensor([[0.2, 0.3, 0.4]], dtype=torch.float64)
    out = printable_palette(custom, dtype=torch.float64)
    assert out.dtype == torch.float64 and torch.equal(out, custom)
    buf = NonPrintabilityScore(custom).palette
    torch.testing.assert_close(buf, custom.float())


@pytest.mark.parametrize(
    "colors, match",
    [
        (torch.rand(4, 4), r"\(N, 3\)"),
        (torch.empty(0, 3), "N >= 1"),
        (torch.tensor([[255.0, 0.0, 0.0]]), "divide by 255"),
        ([[0.1, 0.2, 0.3]], "torch.Tensor"),
    ],
)
def test_palette_errors(colors, match):
    with pytest.raises(InputError, match=match):
        printable_palette(colors)


def test_nps_by_hand():
    palette = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    x = torch.tensor([0.1, 0.9, 0.5, 0.0]).reshape(1, 1, 2, 2).expand(1, 3, 2, 2)
    # grey level v: distance to black sqrt(3) v, to white sqrt(3) (1 - v); take the nearer.
    expected = sum(math.sqrt(3) * min(v, 1 - v) for v in (0.1, 0.9, 0.5, 0.0)) / 4
    assert non_printability_score(x, palette).item() == pytest.approx(expected, abs=1e-6)


def test_nps_reductions_and_module():
    g = torch.Generator().manual_seed(6)
    x = torch.rand(3, 3, 4, 4, generator=g)
    per = torch.stack([non_printability_score(x[b]) for b in range(3)])
    torch.testing.assert_close(non_printability_score(x, reduction="none"), per)
    torch.testing.assert_close(NonPrintabilityScore()(x), per.mean())
    torch.testing.assert_close(non_printability_score(x, reduction="sum"), per.sum())


def test_nps_step_moves_pixels_towards_palette():
    patch = torch.rand(3, 6, 6, generator=torch.Generator().manual_seed(7)).requires_grad_()
    before = non_printability_score(patch)
    before.backward()
    stepped = (patch - 0.05 * patch.grad.sign()).clamp(0, 1)
    assert non_printability_score(stepped) < before


def test_nps_gradcheck():
    g = torch.Generator().manual_seed(8)
    x = (0.05 + 0.9 * torch.rand(1, 3, 3, 3, generator=g, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(non_printability_score, (x,))


def test_nps_errors():
    with pytest.raises(ImageRangeError, match=r"\[0, 1\]"):
        non_printability_score(torch.full((1, 3, 2, 2), 200.0))
    with pytest.raises(ImageLayoutError, match="channels"):
        non_printability_score(torch.rand(1, 4, 2, 2))
