"""evaluate_patch: success and control rates on a classifier whose decisions are known exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attnpatch as ap
from attnpatch.errors import DataError, InputError

#: EOT switched on (evaluation forces it) with every transform at zero: exact placement.
STILL = ap.EOT(
    degrees=0, scale=(1, 1), translate=0, distortion=0, contrast=(1, 1), brightness=0, noise=0
)


class RedVsGreen(nn.Module):
    """Class 1 when the image is redder than it is green, else class 0."""

    def forward(self, x):
        return torch.stack([x[:, 1].mean((1, 2)), x[:, 0].mean((1, 2))], dim=1)


def solid(n, rgb, size=8):
    return torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(n, 3, size, size).clone()


def patch_of(rgb, scale, **kw):
    p = ap.AdversarialPatch(4, init="gray", scale=scale, position="center", eot=STILL, **kw)
    with torch.no_grad():
        p.pixels.copy_(torch.tensor(rgb).view(1, 3, 1, 1).expand_as(p.pixels))
    return p


def test_rates_and_eligibility_are_exact():
    # 6 green images of class 0 (classified right) and 2 red ones labelled 0 (classified wrong)
    images = torch.cat([solid(6, (0.0, 1.0, 0.0)), solid(2, (1.0, 0.0, 0.0))])
    labels = torch.zeros(8, dtype=torch.long)
    red = patch_of((1.0, 0.0, 0.0), 1.0)  # covers the whole image: every patched image is red
    green = patch_of((0.0, 1.0, 0.0), 1.0)
    r = ap.evaluate_patch(RedVsGreen(), red, images, labels, eot_samples=3, control=green)
    assert r.clean_accuracy == 6 / 8 and r.eligible == 6 and r.images == 8 and r.eot_samples == 3
    assert r.success_rate == 1.0 and r.control_success_rate == 0.0
    assert not r.targeted and r.target is None
    half = patch_of((1.0, 0.0, 0.0), 0.5)  # a 4x4 red square on 8x8 green: still green overall
    assert ap.evaluate_patch(RedVsGreen(), half, images, labels, control=green).success_rate == 0


def test_targeted_counts_images_not_of_the_target():
    images = torch.cat([solid(3, (0.0, 1.0, 0.0)), solid(1, (1.0, 0.0, 0.0))])
    labels = torch.tensor([0, 0, 0, 1])
    red, green = patch_of((1.0, 0.0, 0.0), 1.0), patch_of((0.0, 1.0, 0.0), 1.0)
    r = ap.evaluate_patch(RedVsGreen(), red, images, labels, target=1, control=green)
    assert r.targeted and r.target == 1 and r.eligible == 3 and r.clean_accuracy == 1.0
    assert r.success_rate == 1.0 and r.control_success_rate == 0.0
    r = ap.evaluate_patch(RedVsGreen(), green, images, labels, target=0, control=red)
    assert r.eligible == 1 and r.success_rate == 1.0 and r.control_success_rate == 0.0


def test_patch_and_control_see_the_same_placements_and_draws():
    """A control identical to the patch scores exactly the patch's rate, whatever the draws."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(12, 3, 16, 16, generator=g)
    labels = torch.randint(0, 2, (12,), generator=g)
    patch = ap.AdversarialPatch(6, init="random", scale=(0.3, 0.6), eot=ap.EOT(), generator=g)
    twin = ap.AdversarialPatch(6, init="random", scale=(0.3, 0.6), eot=ap.EOT())
    with torch.no_grad():
        twin.pixels.copy_(patch.pixels)
    state = torch.get_rng_state()
    r = ap.evaluate_patch(RedVsGreen(), patch, images, labels, eot_samples=5, control=twin)
    assert torch.equal(torch.get_rng_state(), state)  # torch's global RNG is not touched
    assert r.success_rate == r.control_success_rate and 0 < r.success_rate < 1
    again = ap.evaluate_patch(RedVsGreen(), patch, images, labels, eot_samples=5, control=twin)
    assert again == r  # seeded: the same numbers every time
    other = ap.evaluate_patch(RedVsGreen(), patch, images, labels, eot_samples=5, seed=1)
    assert other.success_rate != r.success_rate or other.control_success_rate != r.success_rate


def test_summary_line_and_bad_input():
    images, labels = solid(2, (0.0, 1.0, 0.0)), torch.zeros(2, dtype=torch.long)
    r = ap.evaluate_patch(RedVsGreen(), patch_of((1.0, 0.0, 0.0), 1.0), images, labels)
    text = str(r)
    assert "clean accuracy 100.0% on 2 held-out images" in text and "patch 100.0%" in text
    assert r.to_dict()["success_rate"] == 1.0
    with pytest.raises(DataError, match="no held-out images"):
        ap.evaluate_patch(RedVsGreen(), patch_of((1.0, 0.0, 0.0), 1.0), images[:0], labels[:0])
    with pytest.raises(InputError, match="eot_samples must be >= 1"):
        ap.evaluate_patch(
            RedVsGreen(), patch_of((1.0, 0.0, 0.0), 1.0), images, labels, eot_samples=0
        )
