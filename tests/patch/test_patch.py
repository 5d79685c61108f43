"""The adversarial patch: mask, init, clamp, control, files (attnpatch/patch/patch.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attnpatch.errors import ConfigError, DataError, ImageRangeError, InputError
from attnpatch.patch.eot import EOT
from attnpatch.patch.patch import AdversarialPatch, patch_mask

# ----------------------------------------------------------------------------- masks and init


def test_circle_mask_area_is_pi_r_squared():
    for r in (4, 8, 16):
        m = patch_mask("circle", 2 * r)
        assert m.shape == (1, 1, 2 * r, 2 * r)
        assert abs(float(m.sum()) - math.pi * r * r) < 0.01 * math.pi * r * r
        assert m.min() >= 0 and m.max() == 1
        torch.testing.assert_close(m, m.flip(-1))
        torch.testing.assert_close(m, m.transpose(-1, -2))
    ellipse = patch_mask("circle", (8, 20))
    assert abs(float(ellipse.sum()) - math.pi * 4 * 10) < 0.02 * math.pi * 40
    assert torch.equal(patch_mask("square", (3, 5)), torch.ones(1, 1, 3, 5))
    with pytest.raises(InputError, match="square"):
        patch_mask("triangle", 4)


def test_init_gray_random_and_images(tmp_path):
    from PIL import Image

    gray = AdversarialPatch(6)
    assert gray.pixels.shape == (1, 3, 6, 6) and torch.equal(
        gray.pixels, torch.full_like(gray.pixels, 0.5)
    )
    assert AdversarialPatch().size == (16, 16)
    a = AdversarialPatch((4, 5), init="random", generator=torch.Generator().manual_seed(1))
    b = AdversarialPatch((4, 5), init="random", generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.pixels, b.pixels) and a.pixels.min() >= 0 and a.pixels.max() < 1
    torch.manual_seed(5)
    c = AdversarialPatch(4, init="random")
    torch.manual_seed(5)
    assert torch.equal(c.pixels, torch.rand(1, 3, 4, 4))  # global CPU RNG when no generator

    image = torch.rand(3, 7, 9)
    d = AdversarialPatch(init=image)
    assert d.size == (7, 9) and torch.equal(d.pixels[0], image)
    assert AdversarialPatch(4, init=image).size == (4, 4)

    array = (torch.rand(5, 6, 3) * 255).round().to(torch.uint8)
    path = tmp_path / "p.png"
    Image.fromarray(array.numpy()).save(path)
    e = AdversarialPatch(init=path)
    assert torch.equal(e.pixels[0], array.permute(2, 0, 1).float() / 255)
    assert torch.equal(AdversarialPatch(init=str(path)).pixels, e.pixels)

    with pytest.raises(DataError, match="no file"):
        AdversarialPatch(init="nope.png")
    with pytest.raises(ImageRangeError, match="255"):
        AdversarialPatch(init=torch.rand(3, 4, 4) * 255)
    with pytest.raises(InputError, match="shape"):
        AdversarialPatch(4, shape="star")


# ----------------------------------------------------------------------------- control and clamp


def test_params_replay_and_control_share_placement():
    images = torch.rand(4, 3, 24, 24)
    patch = AdversarialPatch(6, shape="circle", init="random", scale=(0.3, 0.5))
    params = patch.sample_params(4, (24, 24))
    a, ma = patch(images, params=params)
    b, mb = patch(images, params=params)
    assert torch.equal(a, b)
    control = patch.random_like(generator=torch.Generator().manual_seed(0))
    assert control.size == patch.size and torch.equal(control.mask, patch.mask)
    assert (control.scale, control.position, control.eot) == (
        patch.scale,
        patch.position,
        patch.eot,
    )
    assert not torch.equal(control.pixels, patch.pixels)
    c, mc = control(images, params=params)
    assert torch.equal(mc, ma) and not torch.equal(c, a)


def test_clamp_keeps_parameter_and_optimizer_state():
    patch = AdversarialPatch(4, init="random")
    param = patch.pixels
    opt = torch.optim.Adam(patch.parameters(), lr=10.0)
    patched, _ = patch(torch.rand(1, 3, 8, 8), eot=False)
    (-patched.sum()).backward()
    opt.step()
    assert patch.pixels.max() > 1  # the step left the valid range
    exp_avg = opt.state[param]["exp_avg"].clone()
    grad = param.grad.clone()
    assert patch.clamp_() is patch  # no torch.no_grad() needed by the caller
    assert patch.pixels is param and param.min() >= 0 and param.max() <= 1
    assert torch.equal(opt.state[param]["exp_avg"], exp_avg) and torch.equal(param.grad, grad)
    with torch.no_grad():
        param[0, 0, 0, 0] = float("nan")
    with pytest.raises(ConfigError, match="NaN"):
        patch.clamp_()


# ----------------------------------------------------------------------------- files


def test_save_load_apply_is_bit_exact(tmp_path):
    eot = EOT(degrees=15.0, noise=0.05)
    patch = AdversarialPatch(
        (6, 8), shape="circle", init="random", scale=(0.2, 0.4), position="random", eot=eot
    )
    path = patch.save(tmp_path / "run" / "patch.safetensors", extra={"config": "abc"})
    assert [p.name for p in path.parent.iterdir()] == ["patch.safetensors"]  # no temp file left
    loaded = AdversarialPatch.load(path)
    assert (loaded.size, loaded.shape, loaded.scale, loaded.position) == (
        (6, 8),
        "circle",
        (0.2, 0.4),
        "random",
    )
    assert loaded.eot == eot and loaded.extra == {"config": "abc"}
    assert torch.equal(loaded.pixels, patch.pixels) and torch.equal(loaded.mask, patch.mask)
    images = torch.rand(3, 3, 40, 40)
    for use_eot in (False, True):
        torch.manual_seed(4)
        a = patch(images, eot=use_eot)
        torch.manual_seed(4)
        b = loaded(images, eot=use_eot)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    fixed = AdversarialPatch(4, position=(1, 2), scale=0.25, eot=False)
    again = AdversarialPatch.load(fixed.save(tmp_path / "fixed.safetensors"))
    assert (again.position, again.scale, again.eot.enabled) == ((1, 2), 0.25, False)


def test_load_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(DataError, match="no patch file"):
        AdversarialPatch.load(tmp_path / "missing.safetensors")
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(DataError, match="not an attnpatch patch"):
        AdversarialPatch.load(tmp_path / "model.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(DataError, match="safetensors"):
        AdversarialPatch.load(tmp_path / "junk.safetensors")


def test_to_image():
    patch = AdversarialPatch((5, 7), shape="circle", init="random")
    rgb = patch.to_image()
    assert rgb.mode == "RGB" and rgb.size == (7, 5)
    expected = (patch.pixels.detach()[0] * 255).round().to(torch.uint8).permute(1, 2, 0)
    assert torch.equal(torch.from_numpy(np.array(rgb)), expected)
    rgba = patch.to_image(alpha=True)
    assert rgba.mode == "RGBA" and rgba.getpixel((0, 0))[3] < rgba.getpixel((3, 2))[3] == 255


def test_bad_sizes_raise():
    for size in (0, (4, -1), (4, 4, 4), 2.5, True):
        with pytest.raises(InputError, match="size must be a positive int"):
            AdversarialPatch(size)
    with pytest.raises(InputError, match="positive"):
        patch_mask("circle", 0)


def test_half_precision_init_image_is_resized():
    image = torch.rand(3, 12, 12)
    half = AdversarialPatch(6, init=image, dtype=torch.float16)
    ref = AdversarialPatch(6, init=image, dtype=torch.float32)
    assert half.pixels.dtype == torch.float16 and half.size == (6, 6)
    torch.testing.assert_close(half.pixels.float(), ref.pixels, atol=1e-3, rtol=0)


def test_docstring_examples_run():
    import doctest

    import attnpatch.patch.patch

    result = doctest.testmod(attnpatch.patch.patch, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
