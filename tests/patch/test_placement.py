"""Placement and application of a patch (attnpatch/patch/placement.py)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from attnpatch.errors import ImageLayoutError, ImageRangeError, InputError
from attnpatch.patch import AdversarialPatch
from attnpatch.patch.eot import EOT, EOTDraw, eot_matrix, photometric
from attnpatch.patch.patch import patch_mask
from attnpatch.patch.placement import PatchParams, apply_patch, patch_matrix, sample_boxes

F64 = torch.float64
GEOMETRIC = EOT(contrast=(1.0, 1.0), brightness=0.0, noise=0.0)  # geometric terms only


def reference_warp(src: torch.Tensor, M: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Bilinear resampling written out by hand (no grid_sample, no normalised coordinates).

    Output pixel (u, v) reads the patch at M^-1 (u, v, 1); texels outside the patch are 0.
    """
    src = src.to(F64)
    B, C, h, w = src.shape
    v, u = torch.meshgrid(torch.arange(H, dtype=F64), torch.arange(W, dtype=F64), indexing="ij")
    pts = torch.stack([u, v, torch.ones_like(u)], -1).reshape(-1, 3)
    out = torch.zeros(B, C, H * W, dtype=F64)
    for b in range(B):
        q = pts @ torch.linalg.inv(M[b].to(F64)).T
        x, y = q[:, 0] / q[:, 2], q[:, 1] / q[:, 2]
        x0, y0 = torch.floor(x), torch.floor(y)
        for dx in (0, 1):
            for dy in (0, 1):
                xi, yi = x0 + dx, y0 + dy
                weight = (1 - (x - xi).abs()) * (1 - (y - yi).abs())
                inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
                texel = src[b][:, yi.clamp(0, h - 1).long(), xi.clamp(0, w - 1).long()]
                out[b] += torch.where(inside, weight, 0.0) * texel
    return out.reshape(B, C, H, W)


def params_with(boxes, image_size, patch_size, **draw) -> PatchParams:
    return PatchParams(
        boxes=torch.tensor(boxes, dtype=torch.int64),
        image_size=image_size,
        patch_size=patch_size,
        eot=EOTDraw(**draw),
    )


# ----------------------------------------------------------------------------- placement


def test_sample_boxes_scale_definition():
    # longer side = scale * shorter image side; aspect ratio kept
    assert sample_boxes(1, (32, 48), (8, 8), scale=0.5, position="center").tolist() == [
        [8, 16, 16, 16]
    ]
    assert sample_boxes(1, (40, 40), (4, 8), scale=0.5, position=(0, 0)).tolist() == [
        [0, 0, 10, 20]
    ]
    assert sample_boxes(1, (40, 40), (6, 6), position="center").tolist() == [[17, 17, 6, 6]]
    numpy_ints = (np.int64(1), np.int64(2))  # e.g. read from a config through numpy
    assert sample_boxes(1, (8, 8), (2, 2), position=numpy_ints).tolist() == [[1, 2, 2, 2]]
    boxes = sample_boxes(500, (32, 32), (8, 8), scale=(0.25, 0.5), position="random")
    sizes = boxes[:, 2]
    assert sizes.min() == 8 and sizes.max() == 16 and torch.equal(boxes[:, 2], boxes[:, 3])
    assert (boxes[:, :2] >= 0).all() and (boxes[:, :2] + boxes[:, 2:] <= 32).all()
    assert boxes[:, 0].min() == 0 and (boxes[:, 0] + boxes[:, 2]).max() == 32  # whole range used


def test_eot_off_places_exactly():
    images = torch.rand(2, 3, 12, 14)
    patch = AdversarialPatch((4, 5), init="random", position=(3, 6), eot=False)
    patched, mask = patch(images)
    expected = images.clone()
    expected[:, :, 3:7, 6:11] = patch.pixels.detach()
    assert torch.equal(patched, expected)
    box = torch.zeros(2, 1, 12, 14)
    box[:, :, 3:7, 6:11] = 1
    assert torch.equal(mask, box)


def test_eot_off_with_scale_equals_antialiased_resize():
    images = torch.rand(1, 3, 32, 32)
    patch = AdversarialPatch(16, init="random", scale=0.25, position="center", eot=False)
    patched, mask = patch(images)
    small = torch.nn.functional.interpolate(
        patch.pixels.detach(), size=(8, 8), mode="bilinear", antialias=True
    )
    torch.testing.assert_close(patched[:, :, 12:20, 12:20], small)
    assert torch.equal(patched[:, :, :12], images[:, :, :12])
    assert float(mask.sum()) == 64.0


@pytest.mark.parametrize("eot", [False, True])
def test_same_seed_same_output_and_outside_untouched(eot):
    images = torch.rand(5, 3, 24, 24)
    patch = AdversarialPatch(8, shape="circle", init="random", scale=(0.3, 0.6), eot=eot)
    torch.manual_seed(11)
    a, ma = patch(images)
    torch.manual_seed(11)
    b, mb = patch(images)
    assert torch.equal(a, b) and torch.equal(ma, mb)
    c, _ = patch(images)  # a different draw
    assert not torch.equal(a, c)
    g1, g2 = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    assert torch.equal(patch(images, generator=g1)[0], patch(images, generator=g2)[0])
    outside = (ma == 0).expand_as(a)
    assert outside.any() and torch.equal(a[outside], images[outside])
    assert a.min() >= 0 and a.max() <= 1 and ma.min() >= 0 and ma.max() <= 1


def test_eot_resumes_from_the_global_rng_state():
    """A run that restores torch.get_rng_state() gets the same EOT draws, bit for bit."""
    images = torch.rand(3, 3, 20, 20)
    patch = AdversarialPatch(6, init="random", scale=(0.3, 0.5))
    state = torch.get_rng_state()
    first, _ = patch(images)
    torch.rand(100)  # other consumers of the RNG in between
    torch.set_rng_state(state)
    again, _ = patch(images)
    assert torch.equal(first, again)


# ----------------------------------------------------------------------------- EOT geometry


def test_patch_matrix_maps_edges_onto_the_box():
    params = params_with([[3, 5, 8, 12]], (20, 20), (4, 6))
    M = patch_matrix(params)
    edges = torch.tensor([[-0.5, -0.5, 1], [5.5, 3.5, 1]], dtype=F64) @ M[0].T
    torch.testing.assert_close(edges[:, :2], torch.tensor([[4.5, 2.5], [16.5, 10.5]], dtype=F64))
    # EOT acts about the box centre: a pure shift moves the centre by the shift
    G = eot_matrix(
        torch.zeros(1),
        torch.ones(1),
        torch.tensor([[2.0, -1.0]]),
        torch.zeros(1, 4, 2),
        torch.tensor([[8.0, 12.0]]),
    )
    M = patch_matrix(dataclasses.replace(params, eot=EOTDraw(matrix=G)))
    centre = torch.tensor([2.5, 1.5, 1.0], dtype=F64) @ M[0].T
    torch.testing.assert_close(centre[:2], torch.tensor([10.5 + 2.0, 6.5 - 1.0], dtype=F64))


def test_eot_application_equals_hand_written_bilinear_warp():
    torch.manual_seed(0)
    images = torch.rand(4, 3, 20, 22)
    patch = AdversarialPatch((7, 9), shape="circle", init="random", scale=(0.45, 0.6))
    params = patch.sample_params(4, (20, 22), eot=EOT(degrees=30, distortion=0.3, translate=0.1))
    patched, mask = patch(images, params=params)
    p = photometric(patch.pixels.detach(), params.eot)
    src = torch.cat([p * patch.mask, patch.mask.expand(4, -1, -1, -1)], 1)
    ref = reference_warp(src, patch_matrix(params), 20, 22)
    torch.testing.assert_close(mask, ref[:, 3:].float(), atol=2e-6, rtol=0)
    expected = images * (1 - ref[:, 3:].float()) + ref[:, :3].float()
    torch.testing.assert_close(patched, expected, atol=2e-6, rtol=0)
    assert mask.sum() > 0


def test_identity_warp_agrees_with_exact_paste():
    """The warp path and the paste path are two implementations of the same placement.

    At native size they agree everywhere. When upscaling, the paste (F.interpolate) replicates
    the edge texels up to the box edge while the warp fades them out over half a texel on both
    sides of it (zero padding, antialiased edges); they agree wherever the source coordinate
    lies inside the texel grid.
    """
    images = torch.rand(3, 3, 24, 24)
    patch = AdversarialPatch(6, shape="circle", init="random")
    boxes = [[2, 3, 6, 6], [10, 1, 12, 12], [5, 9, 15, 15]]  # native, 2x and 2.5x upscaling
    pasted = apply_patch(images, patch.pixels, patch.mask, params_with(boxes, (24, 24), (6, 6)))
    identity = torch.eye(3, dtype=F64).repeat(3, 1, 1)
    warped = apply_patch(
        images, patch.pixels, patch.mask, params_with(boxes, (24, 24), (6, 6), matrix=identity)
    )
    for out_paste, out_warp in zip(pasted, warped):
        torch.testing.assert_close(out_paste[0], out_warp[0], atol=1e-5, rtol=0)
    for b, (top, left, size, _) in enumerate(boxes):
        s = size / 6
        u = torch.arange(24, dtype=F64)
        inside_x = ((u - left + 0.5) / s - 0.5 >= 0) & ((u - left + 0.5) / s - 0.5 <= 5)
        inside_y = ((u - top + 0.5) / s - 0.5 >= 0) & ((u - top + 0.5) / s - 0.5 <= 5)
        interior = inside_y[:, None] & inside_x[None, :]
        for out_paste, out_warp in zip(pasted, warped):
            a, c = out_paste[b][:, interior], out_warp[b][:, interior]
            torch.testing.assert_close(a, c, atol=1e-5, rtol=0)
        # elsewhere they differ only in a band of ceil(s) px around the box edge
        r = math.ceil(s)
        band = torch.zeros(24, 24, dtype=torch.bool)
        band[max(0, top - r) : top + size + r, max(0, left - r) : left + size + r] = True
        band[top + r : top + size - r, left + r : left + size - r] = False
        differ = (pasted[1][b, 0] - warped[1][b, 0]).abs() > 1e-5
        assert not (differ & ~band).any()
        assert differ.any() == (size != 6)


def test_mask_covers_exactly_the_warped_patch():
    """White patch on white images stays white (no dark fringe); on black images it equals the mask."""
    patch = AdversarialPatch(10, shape="circle", init=torch.ones(3, 10, 10), scale=(0.4, 0.7))
    torch.manual_seed(1)
    params = patch.sample_params(8, (32, 32), eot=GEOMETRIC)
    white, mask = patch(torch.ones(8, 3, 32, 32), params=params)
    assert (white >= 1 - 1e-6).all()
    black, mask2 = patch(torch.zeros(8, 3, 32, 32), params=params)
    torch.testing.assert_close(black, mask2.expand_as(black), atol=1e-6, rtol=0)
    assert torch.equal(mask, mask2)


def _centroid(weights: torch.Tensor) -> torch.Tensor:
    """(y, x) centroid of a (H, W) non-negative map."""
    H, W = weights.shape
    ys, xs = torch.meshgrid(torch.arange(H, dtype=F64), torch.arange(W, dtype=F64), indexing="ij")
    total = weights.to(F64).sum()
    return torch.stack([(ys * weights).sum() / total, (xs * weights).sum() / total])


def test_mask_centroid_follows_translation():
    patch = AdversarialPatch(8, shape="circle")
    box = [[10, 12, 8, 8]]
    base = apply_patch(
        torch.zeros(1, 3, 32, 32), patch.pixels, patch.mask, params_with(box, (32, 32), (8, 8))
    )[1]
    shift = torch.tensor([[2.3, -1.7]], dtype=F64)  # (dx, dy), sub-pixel
    G = eot_matrix(
        torch.zeros(1), torch.ones(1), shift, torch.zeros(1, 4, 2), torch.tensor([[8.0, 8.0]])
    )
    moved = apply_patch(
        torch.zeros(1, 3, 32, 32),
        patch.pixels,
        patch.mask,
        params_with(box, (32, 32), (8, 8), matrix=G),
    )[1]
    delta = _centroid(moved[0, 0]) - _centroid(base[0, 0])
    torch.testing.assert_close(delta, torch.tensor([-1.7, 2.3], dtype=F64), atol=1e-4, rtol=0)
    torch.testing.assert_close(moved.sum(), base.sum(), atol=1e-3, rtol=0)


def test_patch_content_rotates_with_the_mask():
    """A marker in the patch's corner lands where the rotation sends it; the mask stays centred."""
    pixels = torch.zeros(3, 12, 12)
    pixels[:, 1:4, 1:4] = 1.0  # marker centred at patch pixel (2, 2)
    patch = AdversarialPatch(init=pixels)
    box = [[10, 10, 12, 12]]
    theta = math.radians(30)
    G = eot_matrix(
        torch.tensor([theta]),
        torch.ones(1),
        torch.zeros(1, 2),
        torch.zeros(1, 4, 2),
        torch.tensor([[12.0, 12.0]]),
    )
    params = params_with(box, (32, 32), (12, 12), matrix=G)
    patched, mask = patch(torch.zeros(1, 3, 32, 32), params=params)
    expected = torch.tensor([2.0, 2.0, 1.0], dtype=F64) @ patch_matrix(params)[0].T  # (x, y, 1)
    marker = _centroid(patched[0, 0].detach())
    torch.testing.assert_close(marker, expected[[1, 0]], atol=0.05, rtol=0)
    torch.testing.assert_close(
        _centroid(mask[0, 0]), torch.tensor([15.5, 15.5], dtype=F64), atol=1e-3, rtol=0
    )
    # and it really moved: the unrotated marker sits at (12, 12)
    assert (marker - torch.tensor([12.0, 12.0], dtype=F64)).norm() > 1.0


@pytest.mark.parametrize("geometric", [False, True])
def test_strong_photometric_stays_in_range(geometric):
    patch = AdversarialPatch(8, init="random", scale=0.5)
    eot = EOT(contrast=(0.2, 3.0), brightness=0.6, noise=0.5)
    if not geometric:
        eot = dataclasses.replace(eot, degrees=0.0, scale=(1.0, 1.0), translate=0.0, distortion=0.0)
    images = torch.rand(6, 3, 16, 16)
    patched, mask = patch(images, eot=eot)
    assert patched.min() >= 0 and patched.max() <= 1
    if not geometric:  # exact placement: saturated patch pixels show up as exact 0 and 1
        assert (patched == 1).any() and (patched == 0).any()
    outside = (mask == 0).expand_as(patched)
    assert outside.any() and torch.equal(patched[outside], images[outside])


def test_prefilter_spreads_gradient_when_the_patch_shrinks():
    """A 48 px patch warped to ~5 px must not alias: nearly every patch pixel gets gradient."""
    patch = AdversarialPatch(48, init="random", scale=0.1, position="center")
    torch.manual_seed(0)
    patched, mask = patch(torch.rand(2, 3, 48, 48), eot=GEOMETRIC)
    (patched * torch.rand_like(patched)).sum().backward()
    reached = (patch.pixels.grad.abs().sum(1) > 0).float().mean()
    assert reached > 0.9
    area = 5 * 5  # 0.1 * 48 rounds to 5 px, times the scale jitter in [0.9, 1.1]^2
    assert 0.7 * area < float(mask[0].sum()) < 1.3 * area


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("eot", [False, True])
def test_gradient_reaches_the_patch_only(eot):
    images = torch.rand(3, 3, 24, 24)
    patch = AdversarialPatch(8, shape="circle", init="random", scale=(0.3, 0.5), eot=eot)
    patched, mask = patch(images)
    (patched * torch.randn_like(patched)).sum().backward()
    grad = patch.pixels.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert not mask.requires_grad and patch.mask.grad is None and images.grad is None
    assert [n for n, p in patch.named_parameters()] == ["pixels"]


def test_gradcheck_paste_path():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 10, 11, dtype=F64)
    mask = patch_mask("circle", 4, dtype=F64)
    params = params_with([[1, 2, 4, 4], [3, 1, 6, 6]], (10, 11), (4, 4))

    def f(pixels):
        return apply_patch(images, pixels, mask, params)[0]

    pixels = (0.3 + 0.4 * torch.rand(1, 3, 4, 4, dtype=F64)).requires_grad_()
    assert torch.autograd.gradcheck(f, (pixels,))


def test_gradcheck_warp_path_with_photometric():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 10, 10, dtype=F64)
    patch = AdversarialPatch(4, shape="circle", scale=0.5, dtype=F64)
    params = patch.sample_params(
        2, (10, 10), eot=EOT(noise=0.05, brightness=0.05, contrast=(0.9, 1.1))
    )

    def f(pixels):
        return apply_patch(images, pixels, patch.mask, params)[0]

    pixels = (0.3 + 0.4 * torch.rand(1, 3, 4, 4, dtype=F64)).requires_grad_()
    assert torch.autograd.gradcheck(f, (pixels,))


# ----------------------------------------------------------------------------- bad input


def test_bad_images_raise_before_any_draw():
    patch = AdversarialPatch(4, scale=(0.2, 0.4))
    channels_last, pixels255, empty = (
        torch.rand(2, 16, 16, 3),
        torch.rand(2, 3, 16, 16) * 255,
        torch.rand(0, 3, 16, 16),
    )
    state = torch.get_rng_state()
    with pytest.raises(ImageLayoutError, match="channels-last"):
        patch(channels_last)
    with pytest.raises(ImageRangeError, match="255"):
        patch(pixels255)
    with pytest.raises(InputError, match="empty batch"):
        patch(empty)
    assert torch.equal(torch.get_rng_state(), state)


def test_patch_larger_than_image():
    images = torch.rand(1, 3, 32, 32)
    big, too_far, wide = (
        AdversarialPatch(40),
        AdversarialPatch(8, scale=(0.5, 1.5)),
        AdversarialPatch(8, position=(30, 0)),
    )
    state = torch.get_rng_state()
    with pytest.raises(InputError, match="larger than the image"):
        big(images)
    with pytest.raises(InputError, match=r"1\.0 or less always fits"):
        too_far(images)
    with pytest.raises(InputError, match="top <= 24"):
        wide(images)
    assert torch.equal(torch.get_rng_state(), state)
    # a wide patch fits wide images at scale > 1 (longer side / shorter image side)
    patched, mask = AdversarialPatch((4, 8), scale=1.5, eot=False)(torch.rand(1, 3, 32, 64))
    assert float(mask.sum()) == 24 * 48


@pytest.mark.parametrize(
    "scale", [0, -0.3, (0.5, 0.2), (0.0, 0.3), float("nan"), "big", (0.1, 0.2, 0.3)]
)
def test_bad_scale(scale):
    with pytest.raises(InputError, match="scale"):
        AdversarialPatch(4, scale=scale)


@pytest.mark.parametrize("position", ["left", (1.5, 2), (-1, 0), (1,)])
def test_bad_position(position):
    with pytest.raises(InputError, match="position"):
        AdversarialPatch(4, position=position)


def test_mismatched_params_and_arguments():
    patch = AdversarialPatch(4)
    params = patch.sample_params(2, (16, 16))
    with pytest.raises(InputError, match="sample_params"):
        patch(torch.rand(3, 3, 16, 16), params=params)
    with pytest.raises(InputError, match="sample_params"):
        patch(torch.rand(2, 3, 16, 20), params=params)
    with pytest.raises(InputError, match="not both"):
        patch(torch.rand(2, 3, 16, 16), params=params, eot=False)
    with pytest.raises(InputError, match="eot"):
        patch(torch.rand(2, 3, 16, 16), eot="yes")
    with pytest.raises(InputError, match=r"\(1, 3, h, w\)"):
        apply_patch(torch.rand(2, 3, 16, 16), torch.rand(3, 4, 4), patch.mask, params)


def test_bad_sizes_name_the_argument():
    with pytest.raises(InputError, match="image size must be a positive int"):
        sample_boxes(1, (0, 8), (2, 2))
    with pytest.raises(InputError, match="patch size must be a positive int"):
        sample_boxes(1, (8, 8), (2, 2, 2))
    with pytest.raises(InputError, match="image size"):
        AdversarialPatch(4).sample_params(2, "big")
    assert sample_boxes(1, 8, 2, position=(0, 0)).tolist() == [[0, 0, 2, 2]]


def test_docstring_examples_run():
    import doctest

    import attnpatch.patch.placement

    result = doctest.testmod(attnpatch.patch.placement, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
