"""The run folder's figures (Pillow): sizes, layout and colours from known inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from attnpatch.training import viz


def test_image_grid_layout():
    images = torch.zeros(5, 3, 4, 6)
    images[4] = 1.0  # the fifth image white: second row, second column with nrow=3
    grid = viz.image_grid(images, nrow=3, scale=2, pad=1)
    assert grid.size == (3 * (12 + 1) + 1, 2 * (8 + 1) + 1)
    a = np.asarray(grid)
    top, left = 1 + (8 + 1), 1 + (12 + 1)
    assert (a[top : top + 8, left : left + 12] == 255).all()
    assert (a[1:9, 1:13] == 0).all()  # the first image, black
    assert (a[0] == 255).all()  # padding is white


def test_heatmap_normalises_and_blends():
    image = torch.zeros(3, 4, 4)
    amap = torch.tensor([[0.0, 2.0], [2.0, 2.0]])  # min-max normalised to [0, 1]
    out = viz.heatmap(image, amap, alpha=1.0)
    assert out.shape == (3, 4, 4)
    # colormap: 0 -> (0, 0, 0.5) dark blue; 1 -> (0.5, 0, 0) dark red
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([0.0, 0.0, 0.5]))
    torch.testing.assert_close(out[:, 3, 3], torch.tensor([0.5, 0.0, 0.0]))
    half = viz.heatmap(torch.ones(3, 4, 4), amap, alpha=0.25)
    torch.testing.assert_close(half[:, 3, 3], torch.tensor([0.75 + 0.125, 0.75, 0.75]))


def test_attention_figure_has_one_tile_per_map():
    image = torch.rand(3, 8, 8)
    maps = [("step 0", torch.rand(4, 4)), ("mean", torch.rand(4, 4))]
    fig = viz.attention_figure(image, maps, scale=2)
    assert fig.size == (3 * (16 + 4) + 4, 16 + 20)


def test_loss_curves_one_panel_per_logged_term(tmp_path):
    records = [{"iteration": i, "a": float(i), "b": None, "c": 1.0} for i in range(10)]
    fig = viz.loss_curves(records, ["a", "b", "c"], size=(200, 60))
    assert fig.size == (200, 2 * 60)  # "b" was never logged: no panel
    viz.save(fig, tmp_path / "curves.png")
    with Image.open(tmp_path / "curves.png") as im:
        assert im.size == (200, 120)
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]


@pytest.mark.parametrize("scale", [1, 3])
def test_to_pil_upscales_nearest(scale):
    x = torch.tensor([[[0.0, 1.0]]]).expand(3, 1, 2)
    a = np.asarray(viz.to_pil(x, scale))
    assert a.shape == (scale, 2 * scale, 3)
    assert (a[:, :scale] == 0).all() and (a[:, scale:] == 255).all()
