"""Curves and bars: the loss terms against iteration, success rate against patch scale
(Brown et al. 2017, fig. 2), and success per victim model (transfer)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from ..errors import InputError
from ._base import check_lengths, new_figure

__all__ = ["loss_curves", "success_vs_scale", "transfer_bars", "smooth", "wants_log_scale"]

#: Fields of a metrics record that are not loss terms.
_NOT_TERMS = ("iteration", "step", "counter")
#: per-term extras in a record: the weight used and the measured share of the update
_NOT_PREFIXES = ("weight.", "share.")
#: A positive term is drawn on a log axis when max / min exceeds this (two decades).
LOG_SPAN = 100.0


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def smooth(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average over ``window`` values (fewer at the start).

    >>> smooth([1.0, 3.0, 5.0, 7.0], 2).tolist()
    [1.0, 2.0, 4.0, 6.0]
    """
    v = np.asarray(values, dtype=float)
    c = np.concatenate([[0.0], np.cumsum(v)])
    i = np.arange(1, len(v) + 1)
    lo = np.maximum(i - window, 0)
    return (c[i] - c[lo]) / (i - lo)


def wants_log_scale(values: Sequence[float]) -> bool:
    """True when every value is positive and they span more than two decades.

    >>> wants_log_scale([1e-3, 0.5]), wants_log_scale([1.0, 50.0]), wants_log_scale([-1, 1e3])
    (True, False, False)
    """
    v = np.asarray(values, dtype=float)
    return bool(len(v)) and bool((v > 0).all()) and float(v.max() / v.min()) > LOG_SPAN


def loss_curves(
    records: Sequence[dict],
    names: Sequence[str] | None = None,
    *,
    weights: dict[str, float] | None = None,
) -> Figure:
    """One panel per loss term against the iteration (shared x axis): the raw values faint, a
    moving average over 5 % of the run on top, the last value in the title; a log y axis where
    the term is positive and spans more than two decades (:func:`wants_log_scale`).

    With ``weights`` (``{term: weight}``, e.g. the run's resolved weights) a second column
    shows each term's weighted contribution, ``weight * value``, on a linear axis (a record's
    own ``"weight.<term>"``, the weight that iteration used, wins: ``weights.mode = "share"``
    changes it as the running norms move), and
    the total's row there draws every contribution beside the total: they add up to it (the
    title gives the largest gap between their sum and the total). Terms of weight 0 are left out.

    Args:
        records: ``metrics.jsonl`` lines: dicts with ``"iteration"`` and one number (or
            ``None``: not computed) per term.
        names: the terms, one panel each, in order; ``"total"`` gets its own panel (drawn in
            another colour). ``None``: the terms of ``weights`` and ``"total"`` when weights
            are given, else every numeric field but iteration, step and counter. Terms never
            logged (always ``None``) get no panel.
    """
    if names is None and weights is not None:
        names = [n for n, w in weights.items() if w and n != "total"] + ["total"]
    if names is None:
        names = list(dict.fromkeys(k for r in records for k, v in r.items() if _number(v)))
        names = [n for n in names if n not in _NOT_TERMS and not n.startswith(_NOT_PREFIXES)]
    if weights is not None:
        names = [n for n in names if n == "total" or weights.get(n, 0)]
    series = []
    for name in names:
        pts = [(r["iteration"], r[name]) for r in records if _number(r.get(name))]
        if pts:
            series.append((name, np.array(pts, dtype=float)))
    if not series:
        raise InputError(
            f"no values of {list(names)} in {len(records)} records to plot; pass the lines of "
            "metrics.jsonl (dicts with 'iteration' and the terms) after at least one iteration"
        )
    cols = 1 if weights is None else 2
    fig = new_figure(7.0 * (1 if cols == 1 else 1.6), 0.4 + 1.55 * len(series))
    grid = fig.subplots(len(series), cols, sharex=True, squeeze=False)
    for ax, (name, pts) in zip(grid[:, 0], series):
        _curve(ax, name, pts[:, 0], pts[:, 1], log=wants_log_scale(pts[:, 1]))
        if weights is not None:
            ax.set_title(f"{name}, raw   (last {pts[-1, 1]:.4g})", fontsize=9)
    if weights is not None:
        _weighted_column(grid[:, 1], series, weights, records)
    grid[0, 0].legend(fontsize=7, loc="upper right", framealpha=0.8)
    for ax in grid[-1]:
        ax.set_xlabel("iteration", fontsize=9)
    return fig


def _curve(ax, name: str, x: np.ndarray, y: np.ndarray, *, log: bool, color=None) -> None:
    """One term's panel: raw values faint, the moving mean on top."""
    color = color or ("black" if name == "total" else "tab:red")
    window = max(1, len(y) // 20)
    ax.plot(x, y, color=color, alpha=0.25, linewidth=0.8, label="raw")
    ax.plot(x, smooth(y, window), color=color, linewidth=1.6, label=f"moving mean ({window} it.)")
    if log:
        ax.set_yscale("log")
    else:  # 1.5 with "1e-4" above the axis, not 0.00015
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3), useMathText=True)
    ax.set_title(f"{name}   (last {y[-1]:.4g})", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, alpha=0.3)


def _weighted_column(axes, series, weights: dict[str, float], records: Sequence[dict]) -> None:
    """``weight * value`` per term; the total's panel: every contribution and the total."""
    terms = [(n, pts) for n, pts in series if n != "total"]
    at = {r["iteration"]: r for r in records}

    def weight(name: str, it: float) -> float:
        return float(at[it].get(f"weight.{name}", weights[name]))

    def label(name: str) -> str:
        used = {weight(name, it) for it in at if _number(at[it].get(name))}
        return f"{used.pop():g} x {name}" if len(used) == 1 else f"w x {name}"

    for ax, (name, pts) in zip(axes, series):
        if name == "total":
            continue
        contribution = np.array([weight(name, it) * v for it, v in pts])
        _curve(ax, name, pts[:, 0], contribution, log=False, color="tab:blue")
        ax.set_title(f"{label(name)}   (last {contribution[-1]:.4g})", fontsize=9)
    total = dict(series).get("total")
    if total is None:
        return
    ax = axes[[n for n, _ in series].index("total")]
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink"]
    x = total[:, 0]
    summed = np.zeros_like(x)
    for i, (name, _) in enumerate(terms):
        v = np.array(
            [weight(name, it) * at[it][name] if _number(at[it].get(name)) else 0.0 for it in x]
        )
        summed += v
        ax.plot(x, v, color=colors[i % len(colors)], linewidth=1.0, label=label(name))
    ax.plot(x, total[:, 1], color="black", linewidth=1.6, label="total")
    gap = float(np.abs(summed - total[:, 1]).max())
    ax.set_title(f"total = sum of the weighted terms (max gap {gap:.2g})", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best", framealpha=0.8, ncols=2)


def success_vs_scale(
    scales: Sequence[float],
    success: Sequence[float],
    control: Sequence[float] | None = None,
    *,
    trained: float | tuple[float, float] | None = None,
) -> Figure:
    """Attack success rate (%) against patch scale, the patch and (dashed) the random-noise
    control, as in Brown et al.'s adversarial patch paper.

    Args:
        scales: the placed patch's longer side as a fraction of the image's shorter side (the
            ``scale`` of :class:`attnpatch.AdversarialPatch`; its area is about scale² of the
            image), increasing.
        success, control: rates in [0, 1], one per scale.
        trained: the scale (a line) or ``(low, high)`` range (a band) the patch was trained
            at, marked in grey; ``None``: not marked.
    """
    check_lengths(scales=scales, success=success, control=control)
    fig = new_figure(5.0, 3.4)
    ax = fig.add_subplot()
    x = np.asarray(scales, dtype=float)
    if isinstance(trained, (int, float)):
        ax.axvline(trained, color="0.6", linewidth=6, alpha=0.35, label="trained scale")
    elif trained is not None:
        ax.axvspan(*trained, color="0.6", alpha=0.25, linewidth=0, label="trained scales")
    ax.plot(x, 100 * np.asarray(success, float), "o-", color="tab:red", label="patch")
    if control is not None:
        ax.plot(x, 100 * np.asarray(control, float), "s--", color="gray", label="random control")
    ax.set_xlabel("patch scale (patch side / image side)")
    ax.set_ylabel("attack success (%)")
    ax.set_ylim(-2, 102)
    ax.set_xticks(x)
    ax.grid(True, alpha=0.3)
    ax.legend(frameon=False)
    ax.set_title("success rate vs patch scale (EOT on)", fontsize=10)
    return fig


def transfer_bars(
    names: Sequence[str],
    success: Sequence[float],
    control: Sequence[float],
    surrogate: str | None = None,
) -> Figure:
    """Grouped bars per victim model: the patch's success rate (%) next to the random-noise
    control's, each bar labelled with its value; the surrogate (the model the patch was
    trained on, if among ``names``) is hatched and its name marked.

    Args:
        names: victim model names; success, control: rates in [0, 1], one per name.
        surrogate: the name of the model the patch was trained against.
    """
    n = check_lengths(names=names, success=success, control=control)
    if surrogate is not None and surrogate not in names:
        raise InputError(
            f"surrogate {surrogate!r} is not among the victims {list(names)}; pass one of them "
            "or surrogate=None"
        )
    fig = new_figure(max(4.0, 1.0 + 1.1 * n), 3.6)
    ax = fig.add_subplot()
    x = np.arange(n)
    width = 0.38
    hatch = ["//" if name == surrogate else "" for name in names]
    for shift, values, color, label in (
        (-width / 2, success, "tab:red", "patch"),
        (width / 2, control, "lightgray", "random control"),
    ):
        bars = ax.bar(
            x + shift, 100 * np.asarray(values, float), width, color=color, label=label,
            hatch=hatch, edgecolor="black", linewidth=0.5,
        )  # fmt: skip
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    ax.set_xticks(x, [f"{m}\n(surrogate)" if m == surrogate else m for m in names], fontsize=8)
    ax.set_ylabel("attack success (%)")
    ax.set_ylim(0, 110)
    ax.legend(frameon=False, fontsize=8, ncols=2, loc="upper right")
    ax.set_title("transfer: success per victim model", fontsize=10)
    return fig
