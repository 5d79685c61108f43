"""EOT distribution, draws, matrices and photometric transforms (attnpatch/eot.py)."""

from __future__ import annotations

import math

import pytest
import torch

from attnpatch.errors import InputError
from attnpatch.patch.eot import EOT, EOTDraw, eot_matrix, photometric

F64 = torch.float64


def _apply_h(M: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """Apply (B, 3, 3) homographies to (B, n, 2) points."""
    homog = torch.cat([pts, torch.ones_like(pts[..., :1])], -1) @ M.transpose(1, 2)
    return homog[..., :2] / homog[..., 2:]


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"degrees": -1.0}, "degrees"),
        ({"degrees": 180.0}, "degrees"),
        ({"scale": (1.2, 0.8)}, "scale"),
        ({"scale": 1.1}, "scale"),
        ({"scale": (0.0, 1.0)}, "scale"),
        ({"translate": float("nan")}, "translate"),
        ({"distortion": 1.0}, "distortion"),
        ({"contrast": (0.0, 1.2)}, "contrast"),
        ({"brightness": "0.1"}, "brightness"),
        ({"noise": -0.1}, "noise"),
        ({"enabled": 1}, "enabled"),
    ],
)
def test_bad_config_names_the_field(kwargs, word):
    with pytest.raises(InputError, match=word):
        EOT(**kwargs)


def test_dict_round_trip_and_unknown_key():
    eot = EOT(degrees=10.0, scale=(0.8, 1.0), noise=0.0)
    assert EOT.from_dict(eot.to_dict()) == eot
    # JSON turns tuples into lists; from_dict must accept them
    data = eot.to_dict()
    data["scale"] = list(data["scale"])
    assert EOT.from_dict(data) == eot
    with pytest.raises(InputError, match="unknown EOT keys"):
        EOT.from_dict({**eot.to_dict(), "rotation": 3})


def test_flags():
    assert EOT().geometric and EOT().photometric
    assert not EOT(enabled=False).geometric and not EOT(enabled=False).photometric
    off_geo = EOT(degrees=0, scale=(1, 1), translate=0, distortion=0)
    assert not off_geo.geometric and off_geo.photometric
    off_photo = EOT(contrast=(1, 1), brightness=0, noise=0)
    assert off_photo.geometric and not off_photo.photometric


def test_disabled_draws_nothing_and_consumes_no_randomness():
    state = torch.get_rng_state()
    draw = EOT(enabled=False).sample(3, torch.full((3, 2), 8.0), (8, 8))
    assert draw == EOTDraw()
    assert torch.equal(torch.get_rng_state(), state)


# ----------------------------------------------------------------------------- sampling


def test_draw_order_matches_the_documented_order():
    """Recompute every draw by hand from a generator with the same seed."""
    B, h, w = 3, 5, 7
    sizes = torch.tensor([[10.0, 14.0], [6.0, 8.0], [12.0, 12.0]])
    eot = EOT(degrees=30, scale=(0.5, 1.5), translate=0.2, distortion=0.3)
    draw = eot.sample(B, sizes, (h, w), generator=torch.Generator().manual_seed(7))

    g = torch.Generator().manual_seed(7)
    angle = (torch.rand(B, generator=g, dtype=F64) * 60 - 30) * math.pi / 180
    scale = 0.5 + torch.rand(B, generator=g, dtype=F64)
    shift = (torch.rand(B, 2, generator=g, dtype=F64) * 0.4 - 0.2) * sizes.to(F64).flip(-1)
    half = sizes.to(F64).flip(-1)[:, None] / 2
    corners = (torch.rand(B, 4, 2, generator=g, dtype=F64) * 0.6 - 0.3) * half
    contrast = 0.8 + 0.4 * torch.rand(B, generator=g, dtype=F64)
    brightness = torch.rand(B, generator=g, dtype=F64) * 0.2 - 0.1
    noise = (torch.rand(B, 3, h, w, generator=g) * 2 - 1) * 0.1

    torch.testing.assert_close(draw.matrix, eot_matrix(angle, scale, shift, corners, sizes))
    torch.testing.assert_close(draw.contrast, contrast)
    torch.testing.assert_close(draw.brightness, brightness)
    torch.testing.assert_close(draw.noise, noise)


def test_draws_stay_in_their_ranges():
    B = 4000
    sizes = torch.full((B, 2), 10.0)
    eot = EOT(degrees=20, scale=(0.9, 1.1), translate=0, distortion=0)
    d = eot.sample(B, sizes, (4, 4))
    angle = torch.atan2(d.matrix[:, 1, 0], d.matrix[:, 0, 0]) * 180 / math.pi
    scale = torch.hypot(d.matrix[:, 0, 0], d.matrix[:, 1, 0])
    assert angle.abs().max() <= 20 and angle.abs().max() > 19  # uses the whole range
    assert scale.min() >= 0.9 and scale.max() <= 1.1
    assert d.contrast.min() >= 0.8 and d.contrast.max() <= 1.2
    assert d.brightness.abs().max() <= 0.1
    assert d.noise.abs().max() <= 0.1 and d.noise.abs().max() > 0.099
    assert abs(float(d.noise.mean())) < 0.005  # symmetric


def test_global_rng_reproducibility_and_generator_isolation():
    sizes = torch.full((2, 2), 8.0)
    torch.manual_seed(3)
    a = EOT().sample(2, sizes, (8, 8))
    torch.manual_seed(3)
    b = EOT().sample(2, sizes, (8, 8))
    assert torch.equal(a.matrix, b.matrix) and torch.equal(a.noise, b.noise)
    state = torch.get_rng_state()
    EOT().sample(2, sizes, (8, 8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(
        torch.get_rng_state(), state
    )  # an explicit generator leaves global RNG alone


# ----------------------------------------------------------------------------- matrices


def test_eot_matrix_by_hand():
    theta, s = 0.3, 1.2
    G = eot_matrix(
        torch.tensor([theta]),
        torch.tensor([s]),
        torch.tensor([[1.5, -2.0]]),
        torch.zeros(1, 4, 2),
        torch.tensor([[6.0, 8.0]]),
    )
    expected = torch.tensor(
        [
            [s * math.cos(theta), -s * math.sin(theta), 1.5],
            [s * math.sin(theta), s * math.cos(theta), -2.0],
            [0.0, 0.0, 1.0],
        ],
        dtype=F64,
    )
    torch.testing.assert_close(G[0], expected)


def test_perspective_moves_the_corners_by_the_offsets():
    sizes = torch.tensor([[6.0, 10.0]])  # h, w
    offsets = torch.tensor([[[0.5, 0.2], [-0.3, 0.4], [0.1, -0.6], [0.7, 0.0]]], dtype=F64)
    G = eot_matrix(torch.zeros(1), torch.ones(1), torch.zeros(1, 2), offsets, sizes)
    corners = torch.tensor([[[-5.0, -3.0], [5.0, -3.0], [5.0, 3.0], [-5.0, 3.0]]], dtype=F64)
    torch.testing.assert_close(_apply_h(G, corners), corners + offsets)


# ----------------------------------------------------------------------------- photometric


def test_photometric_by_hand_and_clamped():
    torch.manual_seed(0)
    p = torch.rand(1, 3, 4, 4)
    draw = EOTDraw(
        contrast=torch.tensor([1.5, 0.5], dtype=F64),
        brightness=torch.tensor([0.3, -0.2], dtype=F64),
        noise=torch.rand(2, 3, 4, 4) * 0.2 - 0.1,
    )
    y = photometric(p, draw)
    expected = torch.stack(
        [(1.5 * p[0] + 0.3 + draw.noise[0]), (0.5 * p[0] - 0.2 + draw.noise[1])]
    ).clamp(0, 1)
    torch.testing.assert_close(y, expected)
    assert y.min() >= 0 and y.max() <= 1 and (y == 1).any() and (y == 0).any()


def test_photometric_identity_when_off_and_gradient_through_unclamped_pixels():
    p = torch.full((1, 3, 2, 2), 0.5, requires_grad=True)
    assert photometric(p, EOTDraw()) is p
    draw = EOTDraw(contrast=torch.tensor([2.0, 1.0], dtype=F64))
    photometric(p, draw).sum().backward()
    # d/dp (2p) + d/dp (p) = 3 everywhere (0.5 * 2 = 1.0 sits on the clamp's closed boundary)
    torch.testing.assert_close(p.grad, torch.full_like(p, 3.0))
    q = torch.full((1, 3, 2, 2), 0.9, requires_grad=True)
    photometric(q, draw).sum().backward()  # 1.8 is clamped: that draw contributes no gradient
    torch.testing.assert_close(q.grad, torch.full_like(q, 1.0))


def test_docstring_examples_run():
    import doctest

    import attnpatch.patch.eot

    result = doctest.testmod(attnpatch.patch.eot)
    assert result.attempted > 3 and result.failed == 0
