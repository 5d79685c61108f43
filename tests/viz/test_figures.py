"""attnpatch.viz: each figure's content through matplotlib's object model (lines, images,
colour bars, bars, texts), the PNG's size, overlay's values, headless and threaded drawing."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.image import AxesImage
from PIL import Image

from attnpatch import viz
from attnpatch.errors import ImageRangeError, InputError


def _images(ax) -> list[AxesImage]:
    return [a for a in ax.get_children() if isinstance(a, AxesImage)]


def _panels(fig) -> list:
    """The figure's axes without the colour bars' own axes."""
    bars = {id(im.colorbar.ax) for ax in fig.axes for im in _images(ax) if im.colorbar}
    return [ax for ax in fig.axes if id(ax) not in bars]


def _records(n: int = 40) -> list[dict]:
    rng = np.random.default_rng(0)
    return [
        {
            "iteration": i,
            "step": i % 2 == 1,
            "counter": i % 2,
            "decades": float(10.0 ** (-i / 10)),  # positive, 1 .. 2e-4: four decades
            "narrow": float(1.0 + i),  # positive, 1 .. 40: under two decades
            "never": None,
            "total": float(-i + rng.normal()),  # negative
        }
        for i in range(n)
    ]


def test_loss_curves_one_panel_per_logged_term_raw_and_smoothed():
    records = _records()
    fig = viz.loss_curves(records, ["decades", "narrow", "never", "total"])
    assert len(fig.axes) == 3  # "never" was never logged: no panel
    assert [ax.get_title().split()[0] for ax in fig.axes] == ["decades", "narrow", "total"]
    for ax, name in zip(fig.axes, ["decades", "narrow", "total"]):
        raw, smooth = ax.get_lines()
        values = np.array([r[name] for r in records])
        np.testing.assert_array_equal(raw.get_xdata(), np.arange(len(records)))
        np.testing.assert_allclose(raw.get_ydata(), values)
        window = len(records) // 20  # 5 % of the run
        expected = [values[max(0, i - window + 1) : i + 1].mean() for i in range(len(values))]
        np.testing.assert_allclose(smooth.get_ydata(), expected)
        assert raw.get_alpha() < 1 and smooth.get_linewidth() > raw.get_linewidth()
    shared = fig.axes[0].get_shared_x_axes()
    assert shared.joined(fig.axes[0], fig.axes[2])  # one iteration axis
    assert fig.axes[-1].get_xlabel() == "iteration"


def test_loss_curves_log_scale_exactly_when_a_positive_term_spans_two_decades():
    records = _records()
    fig = viz.loss_curves(records, ["decades", "narrow", "total"])
    assert [ax.get_yscale() for ax in fig.axes] == ["log", "linear", "linear"]
    # at the boundary: a span of 100 stays linear, just over it is logarithmic
    for top, scale in ((100.0, "linear"), (100.5, "log")):
        recs = [{"iteration": 0, "a": 1.0}, {"iteration": 1, "a": top}]
        assert viz.loss_curves(recs).axes[0].get_yscale() == scale
    recs = [{"iteration": 0, "a": 0.0}, {"iteration": 1, "a": 1e6}]  # not positive: linear
    assert viz.loss_curves(recs).axes[0].get_yscale() == "linear"


def test_loss_curves_default_names_and_errors():
    fig = viz.loss_curves(_records())  # every numeric field but iteration, step, counter
    assert [ax.get_title().split()[0] for ax in fig.axes] == ["decades", "narrow", "total"]
    with pytest.raises(InputError, match="no values"):
        viz.loss_curves(_records(), ["never"])
    with pytest.raises(InputError, match="no values"):
        viz.loss_curves([])


def test_loss_curves_with_weights_raw_beside_weighted_and_the_total_adds_up():
    """weights: a second column with weight * value per term; the total's row there draws
    every contribution, and they sum to the logged total."""
    rng = np.random.default_rng(1)
    weights = {"ce": 10.0, "attn": 1000.0, "off": 0.0, "tv": 2.5}
    records = []
    for i in range(30):
        r = {"iteration": i, "step": False, "counter": 0, "success": 0.5, "off": None}
        r.update(ce=float(-rng.random()), attn=float(rng.random() * 1e-3), tv=None)
        if i % 3:
            r["tv"] = float(rng.random())  # not computed every iteration: 0 in the sum
        r["total"] = sum(weights[k] * r[k] for k in ("ce", "attn", "tv") if r[k] is not None)
        records.append(r)
    fig = viz.loss_curves(records, weights=weights)
    grid = np.array(fig.axes).reshape(4, 2)  # ce, attn, tv, total; raw | weighted
    assert [ax.get_title().split(",")[0] for ax in grid[:, 0]] == ["ce", "attn", "tv", "total"]
    for row, name in enumerate(["ce", "attn", "tv"]):
        raw = grid[row, 0].get_lines()[0]
        weighted = grid[row, 1].get_lines()[0]
        np.testing.assert_allclose(weighted.get_ydata(), weights[name] * raw.get_ydata())
        assert grid[row, 1].get_title().startswith(f"{weights[name]:g} x {name}")
    lines = grid[3, 1].get_lines()
    assert [line.get_label() for line in lines] == ["10 x ce", "1000 x attn", "2.5 x tv", "total"]
    parts = np.sum([line.get_ydata() for line in lines[:-1]], axis=0)
    np.testing.assert_allclose(parts, lines[-1].get_ydata(), rtol=1e-12)  # it adds up
    assert "max gap" in grid[3, 1].get_title()
    assert "success" not in " ".join(ax.get_title() for ax in fig.axes)  # not a term
    assert "off" not in [ax.get_title().split(",")[0] for ax in grid[:, 0]]  # weight 0


def test_attention_maps_clean_row_above_the_patched_on_shared_scales():
    clean, patched = torch.rand(3, 16, 16), torch.rand(3, 16, 16)
    maps = [("step 0", torch.rand(4, 4)), ("mean", torch.rand(4, 4) * 2)]
    clean_maps = [("step 0", torch.rand(4, 4) * 3), ("mean", torch.rand(4, 4))]
    fig = viz.attention_maps(patched, maps, "star", clean=clean, clean_maps=clean_maps)
    panels = _panels(fig)
    assert len(panels) == 2 * (1 + len(maps))
    assert [panels[0].get_title(), panels[3].get_title()] == ["clean image", "patched image"]
    np.testing.assert_allclose(_images(panels[0])[0].get_array(), clean.permute(1, 2, 0))
    np.testing.assert_allclose(_images(panels[3])[0].get_array(), patched.permute(1, 2, 0))
    for j in range(len(maps)):
        top, bottom = _images(panels[1 + j])[1], _images(panels[4 + j])[1]
        np.testing.assert_allclose(top.get_array(), clean_maps[j][1])
        np.testing.assert_allclose(bottom.get_array(), maps[j][1])
        both = torch.stack([clean_maps[j][1], maps[j][1]])
        for shown in (top, bottom):  # one colour scale per column
            assert shown.norm.vmin == pytest.approx(float(both.min()))
            assert shown.norm.vmax == pytest.approx(float(both.max()))
    with pytest.raises(InputError, match="together"):
        viz.attention_maps(patched, maps, "star", clean=clean)
    with pytest.raises(InputError, match="same steps"):
        viz.attention_maps(patched, maps, "star", clean=clean, clean_maps=clean_maps[:1])


def test_attention_maps_one_panel_and_colour_bar_per_map():
    image = torch.rand(3, 24, 16)
    maps = [
        ("step 0", torch.rand(6, 4)),
        ("step 1", torch.rand(6, 4) * 3),
        ("mean", torch.rand(6, 4)),
    ]
    fig = viz.attention_maps(image, maps, token="circle")
    panels = _panels(fig)
    assert len(panels) == 1 + len(maps)  # the image, then one panel per map
    assert len(fig.axes) == len(panels) + len(maps)  # a colour bar per map
    np.testing.assert_allclose(_images(panels[0])[0].get_array(), image.permute(1, 2, 0))
    for ax, (title, amap) in zip(panels[1:], maps):
        under, shown = _images(ax)
        np.testing.assert_allclose(under.get_array(), image.permute(1, 2, 0))
        np.testing.assert_allclose(shown.get_array(), amap)
        assert shown.get_extent() == [-0.5, 15.5, 23.5, -0.5]  # stretched over the image
        assert shown.colorbar is not None
        assert shown.norm.vmin == pytest.approx(float(amap.min()))
        assert shown.norm.vmax == pytest.approx(float(amap.max()))
        assert title in ax.get_title() and "'circle'" in ax.get_title()
    assert "'circle'" in fig.get_suptitle()


def test_attention_maps_without_titles(raises):
    # was: "cannot unpack non-iterable Tensor object"
    maps = [torch.rand(4, 4), torch.rand(4, 4)]
    fig = viz.attention_maps(torch.rand(3, 8, 8), maps, "x")
    titles = [ax.get_title() for ax in _panels(fig)[1:]]
    assert titles == ["'x' map 0", "'x' map 1"]
    with raises(InputError, "maps[0]", "(title, tensor)"):
        viz.attention_maps(torch.rand(3, 8, 8), [("a", "b", "c")], "x")


def test_attention_maps_refuse_bad_inputs():
    with pytest.raises(InputError, match=r"\(h, w\)"):
        viz.attention_maps(torch.rand(3, 8, 8), [("mean", torch.rand(1, 4, 4))], "x")
    with pytest.raises(ImageRangeError, match=r"\[0, 255\]"):
        viz.attention_maps(torch.rand(3, 8, 8) * 255, [("mean", torch.rand(4, 4))], "x")
    with pytest.raises(InputError, match="non-empty"):
        viz.attention_maps(torch.rand(3, 8, 8), [], "x")


def test_overlay_shape_range_and_blend():
    image = torch.rand(3, 2, 2)
    amap = torch.tensor([[0.0, 1.0], [2.0, 4.0]])  # same size: no resampling
    out = viz.overlay(image, amap, cmap="viridis", alpha=1.0)
    assert out.shape == (3, 2, 2) and out.dtype == torch.float32
    colours = matplotlib.colormaps["viridis"]((amap / 4).numpy())[..., :3]
    torch.testing.assert_close(out, torch.from_numpy(colours).float().permute(2, 0, 1))
    torch.testing.assert_close(viz.overlay(image, amap, alpha=0.0), image)
    half = viz.overlay(image, amap, cmap="viridis", alpha=0.25)
    torch.testing.assert_close(half, 0.75 * image + 0.25 * out)
    big = viz.overlay(torch.rand(3, 20, 12), torch.randn(5, 3) * 100)
    assert big.shape == (3, 20, 12) and big.min() >= 0 and big.max() <= 1
    with pytest.raises(InputError, match="colormap"):
        viz.overlay(image, amap, cmap="no-such-map")
    with pytest.raises(InputError, match="alpha"):
        viz.overlay(image, amap, alpha=2.0)


def test_patch_figure_draws_the_pixels_nearest():
    patch = torch.rand(1, 3, 6, 10)  # AdversarialPatch.pixels
    fig = viz.patch_figure(patch)
    (ax,) = fig.axes
    (im,) = _images(ax)
    np.testing.assert_allclose(im.get_array(), patch[0].permute(1, 2, 0))
    assert im.get_interpolation() == "nearest"
    assert "6x10" in ax.get_title()


def test_examples_grid_with_predictions_and_labels_under_each():
    images = torch.rand(10, 3, 8, 8)
    preds = ["a", "b"] * 5
    labels = ["a"] * 10
    fig = viz.examples(images, preds, labels, ncols=4)
    assert len(fig.axes) == 10
    for i, ax in enumerate(fig.axes):
        assert ax.get_subplotspec().get_geometry()[:2] == (3, 4)  # ceil(10 / 4) rows
        (im,) = _images(ax)
        np.testing.assert_allclose(im.get_array(), images[i].permute(1, 2, 0))
        assert ax.get_xlabel() == f"pred: {preds[i]}\ntrue: {labels[i]}"
        red = matplotlib.colors.same_color(ax.xaxis.label.get_color(), "tab:red")
        assert red == (preds[i] != labels[i])
    plain = viz.examples(images[:3], ["x", "y", "z"])  # no labels: one row, predictions only
    assert [ax.get_xlabel() for ax in plain.axes] == ["pred: x", "pred: y", "pred: z"]
    with pytest.raises(InputError, match="one length"):
        viz.examples(images, preds[:3])
    with pytest.raises(InputError, match="ncols"):
        viz.examples(images, preds, ncols=0)


def test_success_vs_scale_lines_in_percent():
    scales, success, control = [0.1, 0.2, 0.4], [0.1, 0.5, 0.75], [0.0, 0.05, 0.2]
    fig = viz.success_vs_scale(scales, success, control, trained=(0.15, 0.25))
    (ax,) = fig.axes
    patch_line, control_line = ax.get_lines()
    np.testing.assert_allclose(patch_line.get_xdata(), scales)
    np.testing.assert_allclose(patch_line.get_ydata(), [10, 50, 75])
    np.testing.assert_allclose(control_line.get_ydata(), [0, 5, 20])
    assert "image side" in ax.get_xlabel() and "%" in ax.get_ylabel()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["trained scales", "patch", "random control"]
    assert len(viz.success_vs_scale(scales, success).axes[0].get_lines()) == 1
    with pytest.raises(InputError, match="one length"):
        viz.success_vs_scale(scales, success[:2])


def test_transfer_bars_grouped_per_victim_with_the_surrogate_marked():
    names, success, control = ["resnet", "vit", "tiny"], [0.9, 0.4, 0.25], [0.1, 0.05, 0.2]
    fig = viz.transfer_bars(names, success, control, surrogate="resnet")
    (ax,) = fig.axes
    patch_bars, control_bars = ax.containers
    assert len(patch_bars) == len(control_bars) == 3
    np.testing.assert_allclose([b.get_height() for b in patch_bars], [90, 40, 25])
    np.testing.assert_allclose([b.get_height() for b in control_bars], [10, 5, 20])
    assert [bool(b.get_hatch()) for b in patch_bars] == [True, False, False]
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == ["resnet\n(surrogate)", "vit", "tiny"]
    values = sorted(t.get_text() for t in ax.texts)  # each bar labelled with its value
    assert values == sorted(f"{100 * v:.0f}" for v in success + control)
    with pytest.raises(InputError, match="surrogate"):
        viz.transfer_bars(names, success, control, surrogate="alexnet")


def test_save_writes_a_png_of_figsize_times_dpi(tmp_path):
    fig = viz.examples(torch.rand(5, 3, 8, 8), list("abcde"), ncols=3)
    path = tmp_path / "grid.png"
    viz.save(fig, path)
    width, height = fig.get_size_inches()
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == (round(width * viz.DPI), round(height * viz.DPI))
        pixels = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(pixels, viz.to_array(fig))  # what to_array renders
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]  # no temporary file left
    with pytest.raises(InputError, match="Figure"):
        viz.save("not a figure", tmp_path / "x.png")


def test_figures_draw_in_threads():
    def draw(seed: int) -> np.ndarray:
        g = torch.Generator().manual_seed(seed)
        maps = [("mean", torch.rand(4, 4, generator=g))]
        return viz.to_array(viz.attention_maps(torch.rand(3, 8, 8, generator=g), maps, "star"))

    alone = [draw(s) for s in range(4)]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(draw, range(4)))
    for a, b in zip(alone, together):
        np.testing.assert_array_equal(a, b)


def test_import_attnpatch_leaves_matplotlib_out():
    code = (
        "import sys, attnpatch\n"
        "assert 'matplotlib' not in sys.modules\n"
        "from attnpatch import viz\n"
        "assert 'matplotlib' in sys.modules and 'matplotlib.pyplot' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
