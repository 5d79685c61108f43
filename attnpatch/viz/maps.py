"""Attention heat maps over an image: a figure with colour bars, and a blended tensor."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from ..errors import InputError
from ._base import check_lengths, image_array, new_figure

__all__ = ["attention_maps", "overlay"]


def _map(amap: torch.Tensor, name: str = "map") -> torch.Tensor:
    if not isinstance(amap, torch.Tensor) or amap.ndim != 2:
        shape = tuple(amap.shape) if isinstance(amap, torch.Tensor) else type(amap).__name__
        raise InputError(
            f"{name} must be a 2-D (h, w) tensor, got {shape}; average the heads, layers and "
            "tokens first, e.g. maps[0, ..., tokens].mean(-1)"
        )
    m = amap.detach().float().cpu()
    if not torch.isfinite(m).all():
        raise InputError(f"{name} contains NaN or Inf; check the attention it came from")
    return m


def _colormap(cmap: str) -> matplotlib.colors.Colormap:
    try:
        return matplotlib.colormaps[cmap]
    except KeyError:
        raise InputError(
            f"unknown colormap {cmap!r}; pass a name of matplotlib.colormaps, e.g. 'jet', "
            "'viridis' or 'inferno'"
        ) from None


def overlay(
    image: torch.Tensor, amap: torch.Tensor, cmap: str = "jet", alpha: float = 0.5
) -> torch.Tensor:
    """The heat map blended over the image: ``(1 - alpha) * image + alpha * cmap(m)``.

    Args:
        image: ``(3, H, W)`` in [0, 1].
        amap: ``(h, w)``, any range: min-max normalised to [0, 1] (a constant map is 0), then
            upsampled bilinearly to ``(H, W)``.
        cmap: a matplotlib colormap name; alpha: the map's weight in [0, 1].

    Returns:
        ``(3, H, W)`` float in [0, 1], on the CPU (e.g. for TensorBoard's ``add_image``).

    >>> overlay(torch.zeros(3, 8, 6), torch.rand(2, 2)).shape
    torch.Size([3, 8, 6])
    """
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha must be in [0, 1], got {alpha!r}; e.g. alpha=0.5")
    x = torch.from_numpy(image_array(image)).permute(2, 0, 1)
    colors = _colormap(cmap)
    m = _map(amap)
    m = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)
    m = F.interpolate(m[None, None], size=x.shape[-2:], mode="bilinear", align_corners=False)
    rgb = torch.from_numpy(colors(m[0, 0].clamp(0, 1).numpy())[..., :3]).float().permute(2, 0, 1)
    return ((1 - alpha) * x + alpha * rgb).clamp(0, 1)


def _titled(maps: Sequence[tuple[str, torch.Tensor] | torch.Tensor]) -> list[tuple[str, Any]]:
    """``(title, map)`` pairs; a bare map gets the title ``"map i"``."""
    out = []
    for i, item in enumerate(maps):
        if isinstance(item, torch.Tensor):
            out.append((f"map {i}", item))
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            out.append((str(item[0]), item[1]))
        else:
            raise InputError(
                f"maps[{i}] must be a (h, w) tensor or a (title, tensor) pair, got "
                f"{type(item).__name__}; pass e.g. [('step 0', m0), ('mean', m)]"
            )
    return out


def attention_maps(
    image: torch.Tensor,
    maps: Sequence[tuple[str, torch.Tensor] | torch.Tensor],
    token: str,
    *,
    clean: torch.Tensor | None = None,
    clean_maps: Sequence[tuple[str, torch.Tensor]] | None = None,
    cmap: str = "jet",
    alpha: float = 0.55,
) -> Figure:
    """The image, then one panel per map: the map upsampled (bilinear) over the image, with a
    colour bar of its values; the token's text in the figure title and every panel's.

    With ``clean`` and ``clean_maps`` (the same maps of the image without the patch) a first
    row shows them above the patched row, each column on one colour scale for both rows, so
    what the patch did to the word's attention reads at a glance.

    Args:
        image: ``(3, H, W)`` in [0, 1] (the patched image).
        maps: ``(title, (h, w) tensor)`` pairs, e.g. one per denoising step then ``"mean"``
            (a bare ``(h, w)`` tensor is titled ``"map i"``); values as they are (attention
            probabilities), each column on its own colour scale.
        token: the word (or token text) whose attention the maps are.
        clean: ``(3, H, W)`` in [0, 1]; clean_maps: pairs with the same titles as ``maps``.
    """
    n = check_lengths(maps=maps)
    maps = _titled(maps)
    if (clean is None) != (clean_maps is None):
        raise InputError("pass clean= and clean_maps= together (the clean row), or neither")
    rows = [("patched image", image, maps)]
    if clean is not None:
        clean_maps = _titled(clean_maps)
        if [t for t, _ in clean_maps] != [t for t, _ in maps]:
            raise InputError(
                f"clean_maps titles {[t for t, _ in clean_maps]} differ from maps titles "
                f"{[t for t, _ in maps]}; pass the clean image's maps of the same steps"
            )
        rows.insert(0, ("clean image", clean, clean_maps))
    colors = _colormap(cmap)
    fig = new_figure(0.4 + 2.35 * (n + 1), 0.35 + 2.4 * len(rows))
    grid = fig.subplots(len(rows), n + 1, squeeze=False)
    columns = [
        [_map(row[2][j][1], f"map {row[2][j][0]!r}").numpy() for row in rows] for j in range(n)
    ]
    for r, (label, img, row_maps) in enumerate(rows):
        rgb = image_array(img)
        h, w = rgb.shape[:2]
        extent = (-0.5, w - 0.5, h - 0.5, -0.5)  # the map's cells cover the image's pixels
        grid[r, 0].imshow(rgb, interpolation="nearest")
        grid[r, 0].set_title(label, fontsize=9)
        for j, (title, _) in enumerate(row_maps):
            ax, m = grid[r, j + 1], columns[j][r]
            lo = min(float(c.min()) for c in columns[j])
            hi = max(float(c.max()) for c in columns[j])
            ax.imshow(rgb, interpolation="nearest")
            shown = ax.imshow(
                m, cmap=colors, alpha=alpha, extent=extent, interpolation="bilinear",
                vmin=lo, vmax=hi,
            )  # fmt: skip
            bar = fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.03)
            bar.ax.tick_params(labelsize=7)
            bar.formatter.set_powerlimits((-2, 3))
            ax.set_title(f"'{token}' {title}", fontsize=9)
    for ax in grid.flat:
        ax.set_axis_off()
    fig.suptitle(f"cross-attention of '{token}'", fontsize=10)
    return fig
