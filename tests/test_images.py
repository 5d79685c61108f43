"""check_image's diagnoses and to_diffusion_input against PIL's resampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from attnpatch.errors import ImageLayoutError, ImageRangeError, InputError
from attnpatch.images import check_image, save_image, to_diffusion_input, to_pil


def _rand(*shape, seed=0, dtype=torch.float32):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ----------------------------------------------------------------------------- check_image


def test_valid_batches_pass_and_are_returned_as_is():
    x = _rand(2, 3, 8, 8)
    assert check_image(x) is x
    y = x * 2 - 1
    assert check_image(y, (-1, 1)) is y
    for ok in (
        x.half(),
        torch.full((1, 3, 2, 2), 1.0 + 5e-5),  # within tolerance
    ):
        assert check_image(ok) is ok
    five = _rand(1, 5, 4, 4)
    assert check_image(five, channels=None) is five
    with pytest.raises(ImageRangeError, match="must lie in"):
        check_image(torch.full((1, 3, 2, 2), 1.0 + 2e-4))  # just past the tolerance
    meta = torch.empty(1, 3, 4, 4, device="meta")
    assert check_image(meta) is meta  # no data to read: shape checks only


def test_check_keeps_the_graph():
    x = _rand(1, 3, 4, 4).requires_grad_(True)
    (check_image(x) * 3).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 3.0))


@pytest.mark.parametrize(
    "x, kwargs, needles, error",
    [
        (np.zeros((1, 3, 4, 4)), {}, ["torch.Tensor", "torch.as_tensor"], ImageLayoutError),
        (_rand(3, 8, 8), {}, ["4-D", "x.unsqueeze(0)"], ImageLayoutError),
        (_rand(1, 1, 3, 8, 8), {}, ["4-D", "reshape"], ImageLayoutError),
        (
            (_rand(1, 3, 4, 4) * 255).to(torch.uint8),
            {},
            ["floating-point", "x.float() / 255"],
            ImageLayoutError,
        ),
        (_rand(2, 16, 16, 3), {}, ["channels-last", "x.permute(0, 3, 1, 2)"], ImageLayoutError),
        (_rand(2, 16, 16, 3), {"channels": None}, ["channels-last"], ImageLayoutError),
        (
            _rand(2, 1, 8, 8),
            {},
            ["3 channels", "got 1", "x.expand(-1, 3, -1, -1)"],
            ImageLayoutError,
        ),
        (_rand(2, 4, 8, 8), {}, ["3 channels", "got 4", "x[:, :3]"], ImageLayoutError),
        (_rand(2, 2, 8, 8), {}, ["3 channels", "got 2", "pass 3-channel"], ImageLayoutError),
        (_rand(1, 3, 4, 4) * 255, {}, ["[0, 1]", "[0, 255]", "x / 255"], ImageRangeError),
        (
            _rand(1, 3, 4, 4) * 255,
            {"value_range": (-1, 1)},
            ["[-1, 1]", "x / 127.5 - 1"],
            ImageRangeError,
        ),
        (
            _rand(1, 3, 4, 4) * 2 - 1,
            {},
            ["[-1, 1] diffusion input", "(x + 1) / 2"],
            ImageRangeError,
        ),
        (
            _rand(1, 3, 4, 4) * 1.5 + 0.2,
            {},
            ["must lie in [0, 1]", "x.clamp(0, 1)"],
            ImageRangeError,
        ),
        (_rand(1, 3, 4, 4), {"value_range": (1, 0)}, ["low < high"], InputError),
    ],
)
def test_bad_batches_are_named_with_a_fix(x, kwargs, needles, error):
    with pytest.raises(error) as err:  # the type says what to fix
        check_image(x, **kwargs)
    assert isinstance(err.value, ValueError)
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values(bad):
    x = _rand(1, 3, 4, 4)
    x[0, 1, 2, 3] = bad
    with pytest.raises(ImageRangeError, match="NaN or Inf"):
        check_image(x)


def test_out_of_range_reports_the_observed_range():
    x = _rand(1, 3, 4, 4)
    x[0, 0, 0, 0] = 1.25
    with pytest.raises(ImageRangeError) as err:
        check_image(x, name="patch")
    assert "patch must lie in [0, 1]" in str(err.value) and "1.25" in str(err.value)


# ----------------------------------------------------------------------------- to_diffusion_input


def _pil_resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """PIL's float ("F" mode) BILINEAR resize per channel: the classic antialiased reference."""
    out = torch.empty(x.shape[0], x.shape[1], h, w, dtype=torch.float64)
    for b in range(x.shape[0]):
        for c in range(x.shape[1]):
            img = Image.fromarray(x[b, c].double().numpy().astype(np.float32), mode="F")
            out[b, c] = torch.from_numpy(np.asarray(img.resize((w, h), Image.BILINEAR)).copy())
    return out


def test_no_resize_is_exactly_2x_minus_1():
    x = _rand(2, 3, 16, 24)
    torch.testing.assert_close(to_diffusion_input(x), x * 2 - 1, atol=0, rtol=0)
    torch.testing.assert_close(to_diffusion_input(x, (16, 24)), x * 2 - 1, atol=0, rtol=0)


@pytest.mark.parametrize(
    "size, multiple, expected",
    [
        (None, 8, (32, 32)),  # 30 rounds up
        (12, 8, (16, 16)),  # shrink, rounded up to the multiple
        ((14, 40), 2, (14, 40)),  # one side shrinks, one grows
        ((64, 48), 8, (64, 48)),  # enlarge
    ],
)
def test_resize_matches_pil(size, multiple, expected):
    x = _rand(2, 3, 30, 30, seed=1)
    y = to_diffusion_input(x, size, multiple=multiple)
    assert tuple(y.shape) == (2, 3, *expected)
    ref = _pil_resize(x, *expected) * 2 - 1
    torch.testing.assert_close(y.double(), ref, atol=2e-6, rtol=0)
    assert y.min() >= -1 and y.max() <= 1


def test_gradients_reach_the_images():
    x = _rand(1, 3, 30, 30).requires_grad_(True)
    y = to_diffusion_input(x, 16)
    (y * torch.linspace(0, 1, y.numel()).view_as(y)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and (x.grad != 0).sum() > 800


def test_half_precision_shrink_on_cpu():
    x = _rand(1, 3, 20, 20).half()
    y = to_diffusion_input(x, 8)
    assert y.dtype == torch.float16 and y.shape == (1, 3, 8, 8)
    ref = to_diffusion_input(x.float(), 8)
    torch.testing.assert_close(y.float(), ref, atol=2e-3, rtol=0)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"size": (8, 8, 8)}, "(height, width) pair"),
        ({"size": "big"}, "(height, width) pair"),
        ({"size": 0}, "positive"),
        ({"multiple": 0}, "positive int"),
        ({"multiple": True}, "positive int"),
    ],
)
def test_bad_arguments(kwargs, needle):
    with pytest.raises(InputError) as err:
        to_diffusion_input(_rand(1, 3, 8, 8), **kwargs)
    assert needle in str(err.value)


def test_rejects_diffusion_side_input():
    with pytest.raises(ImageRangeError, match=r"\(x \+ 1\) / 2"):
        to_diffusion_input(_rand(1, 3, 8, 8) * 2 - 1)


# ----------------------------------------------------------------------------- 8-bit output


def test_to_pil_rounds_and_clamps_to_8_bits(tmp_path):
    x = torch.tensor([0.0, 0.5, 1.0, 1.7, -0.2, 127.4 / 255]).reshape(1, 1, 6).expand(3, 1, 6)
    got = np.asarray(to_pil(x))
    assert got.shape == (1, 6, 3)
    assert got[0, :, 0].tolist() == [0, 128, 255, 255, 0, 127]  # round-half-even at 127.5
    rgba = to_pil(torch.cat([x, torch.zeros(1, 1, 6)]))
    assert rgba.mode == "RGBA" and np.asarray(rgba)[..., 3].max() == 0
    with pytest.raises(InputError, match=r"\(3, H, W\)"):
        to_pil(torch.zeros(1, 3, 2, 2))
    save_image(x, tmp_path / "x.png")
    with Image.open(tmp_path / "x.png") as im:
        assert np.array_equal(np.asarray(im), got)
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]  # no temporary file left
