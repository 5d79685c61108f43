"""The synthetic shapes world (attnpatch/data/shapes.py)."""

from __future__ import annotations

import math

import pytest
import torch

from attnpatch._util import derive_seed
from attnpatch.data import SHAPE_CLASSES, SHAPES, ShapesConfig, shapes_dataset
from attnpatch.data import shapes as data
from attnpatch.errors import InputError


def _grid_area(name: str, steps: int = 801) -> float:
    t = torch.linspace(-1.2, 1.2, steps, dtype=torch.float64)
    v, u = torch.meshgrid(t, t, indexing="ij")
    cell = (2.4 / (steps - 1)) ** 2
    return float(SHAPES[name](u, v).double().sum()) * cell


@pytest.mark.parametrize(
    "name,area",
    [
        ("circle", math.pi * 0.85**2),
        ("ring", math.pi * (0.95**2 - 0.55**2)),
        ("square", 1.44**2),
        ("diamond", 2 * 0.95**2),
        ("cross", 2 * 0.56 * 1.9 - 0.56**2),
        ("triangle", 3 * math.sqrt(3) / 4),  # equilateral, circumradius 1
        ("star", 5 * 1.0 * 0.45 * math.sin(math.pi / 5)),  # 10 triangles O-outer-inner
    ],
)
def test_shape_areas_match_formulas(name, area):
    assert _grid_area(name) == pytest.approx(area, rel=0.01)


def test_triangle_and_star_point_up():
    pts_u = torch.tensor([0.0, 0.0])
    pts_v = torch.tensor([-0.9, 0.9])  # v grows downwards: first point is near the top
    assert SHAPES["triangle"](pts_u, pts_v).tolist() == [True, False]
    assert SHAPES["star"](pts_u, pts_v).tolist() == [True, False]


def test_shapes_dataset_deterministic_balanced_quantised():
    cfg = ShapesConfig(train_per_class=6, heldout_per_class=3, size=16)
    a, b = shapes_dataset(cfg), shapes_dataset(cfg)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.classes == list(SHAPE_CLASSES) == sorted(SHAPE_CLASSES)
    assert tuple(a.images.shape) == (30, 3, 16, 16)
    assert torch.bincount(a.labels).tolist() == [6] * 5
    assert float(a.images.min()) >= 0 and float(a.images.max()) <= 1
    torch.testing.assert_close(a.images * 255, (a.images * 255).round(), rtol=0, atol=1e-4)
    other_seed = shapes_dataset(
        ShapesConfig(train_per_class=6, heldout_per_class=3, seed=1, size=16)
    )
    assert not torch.equal(a.images, other_seed.images)
    held = shapes_dataset(cfg, "heldout")
    assert len(held) == 15
    flat_train, flat_held = a.images.flatten(1), held.images.flatten(1)
    assert torch.cdist(flat_held, flat_train).min() > 1.0  # no shared images
    state = torch.get_rng_state()
    shapes_dataset(cfg)
    assert torch.equal(torch.get_rng_state(), state)


def test_shape_contrasts_with_background_in_some_channel():
    """Fill and background come from opposite HSV-value bands: >= 0.25 apart in some channel."""
    cfg = ShapesConfig()
    labels = torch.arange(100) % 5
    images, alpha = data.render_shapes(
        labels, cfg.classes, 32, generator=torch.Generator().manual_seed(0), return_masks=True
    )
    assert tuple(alpha.shape) == (100, 1, 32, 32)
    inside, outside = alpha == 1, alpha == 0
    assert inside.flatten(1).any(1).all() and outside.flatten(1).any(1).all()
    fill = (images * inside).sum((2, 3)) / inside.sum((2, 3))  # (N, 3) mean colours
    for k in range(100):
        background = images[k][:, outside[k, 0]]  # (3, P)
        gap = (fill[k][:, None] - background).abs().amax(0)  # best channel, per pixel
        assert float(gap.quantile(0.05)) > 0.15  # 0.25 minus pixel noise
    # Shape sizes: coverage = area(shape) * radius^2 with radius in [0.22, 0.36] * 32 px.
    frac = alpha.flatten(1).sum(1) / 32**2
    circle = frac[labels == 0]
    lo, hi = math.pi * 0.85**2 * 0.22**2, math.pi * 0.85**2 * 0.36**2
    assert float(circle.min()) > 0.9 * lo and float(circle.max()) < 1.1 * hi


def test_shape_classes_are_single_tiny_tokens():
    from attnpatch.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    for name in SHAPE_CLASSES:
        ids = tok(name, add_special_tokens=False).input_ids
        assert len(ids) == 1, name
        assert ids[0] in tok(f"a photo of a {name}").input_ids


def test_config_validation():
    with pytest.raises(InputError, match="unknown shape classes.*hexagon"):
        ShapesConfig(classes=("circle", "hexagon"))
    with pytest.raises(InputError, match="distinct"):
        ShapesConfig(classes=("circle", "circle"))
    with pytest.raises(InputError, match="split"):
        shapes_dataset(ShapesConfig(train_per_class=1), "test")
    assert ShapesConfig().key() == ShapesConfig().key() != ShapesConfig(seed=1).key()


def test_shapes_set_is_rendered_from_the_tagged_seed():
    """The set's definition, pinned: each split renders from its own derived seed."""
    cfg = ShapesConfig(train_per_class=3, heldout_per_class=2, size=16, seed=4)
    for split, k in (("train", 0), ("heldout", 1)):
        ds = shapes_dataset(cfg, split)
        g = torch.Generator().manual_seed(derive_seed("attnpatch-batches", cfg.seed, k))
        expected = data.render_shapes(ds.labels, cfg.classes, cfg.size, generator=g)
        assert torch.equal(ds.images, expected)


def test_docstring_examples_run():
    import doctest

    import attnpatch.data.shapes

    result = doctest.testmod(attnpatch.data.shapes)
    assert result.attempted > 0 and result.failed == 0


def test_non_square_images_put_the_shape_where_asked():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.25, 0.25], [0.75, 0.75], [0.5, 0.5]])
    for size in ((32, 48), (48, 32)):
        images, masks = data.render_shapes(
            torch.tensor([0, 2, 4]),
            SHAPE_CLASSES,
            size,
            generator=g,
            centres=centres,
            return_masks=True,
        )
        assert images.shape == (3, 3, *size) and masks.shape == (3, 1, *size)
        h, w = size
        ys = (torch.arange(h) + 0.5) / h
        xs = (torch.arange(w) + 0.5) / w
        m = masks[:, 0] / masks[:, 0].sum((1, 2), keepdim=True)
        cx, cy = (m.sum(1) * xs).sum(1), (m.sum(2) * ys).sum(1)
        # the shape stays inside the image, so a corner centre may move inwards
        assert torch.allclose(cx, centres[:, 0], atol=0.15), (size, cx)
        assert torch.allclose(cy, centres[:, 1], atol=0.15), (size, cy)
        assert (cx[0] < 0.45) and (cy[0] < 0.45) and (cx[1] > 0.55) and (cy[1] > 0.55)
        assert abs(cx[2] - 0.5) < 0.02 and abs(cy[2] - 0.5) < 0.02


def test_options_do_not_change_the_images():
    labels = torch.arange(10) % 5
    plain = data.render_shapes(
        labels, SHAPE_CLASSES, 32, generator=torch.Generator().manual_seed(5)
    )
    full = data.render_shapes(
        labels,
        SHAPE_CLASSES,
        32,
        generator=torch.Generator().manual_seed(5),
        return_masks=True,
        return_colours=True,
    )
    assert len(full) == 3 and torch.equal(plain, full[0]) and full[2].shape == (10, 3, 3)
