"""AttentionStore: record attention maps, differentiably, and read them back by resolution."""

from __future__ import annotations

from collections.abc import Container, Iterable

import torch
from einops import rearrange

from ...errors import HookError, InputError
from ...families import all_places
from ..site import AttnSite, Resolution, as_resolution
from .base import AttentionControl

__all__ = ["AttentionStore"]

_KINDS = ("cross", "self")


class AttentionStore(AttentionControl):
    """Records head-averaged attention maps of the layers it is asked to watch.

    Args:
        kinds: which attention to record: ``"cross"`` (image queries attending text: a UNet's
            ``attn2``, the image-to-text block of joint attention) and/or ``"self"`` (image
            to image).
        places: which blocks: ``"down"``, ``"mid"``, ``"up"`` (UNet), ``"joint"``, ``"single"``
            (SD3 / Flux); default: all.
        resolutions: spatial sizes to record (ints for square maps, ``(h, w)`` pairs); ``None``
            records every size. Self-attention at high resolution is large (``(B, h*w, h*w)`` per
            layer): restrict it.
        steps: UNet calls (values of ``cur_step``) to record, e.g. ``range(5, 10)``; ``None``
            records all.
        per_step: also keep each step's maps (for :meth:`step_maps`); by default only the running
            sum over steps is kept.

    Maps are averaged over heads when recorded and summed over steps out of place, so they
    carry gradients back to the model's inputs. Nothing is recorded while ``recomputing``.

    On a joint attention layer (SD3, Flux) the store records blocks of one softmax over image
    and text keys: a ``"cross"`` row sums to the share of attention the image token pays to the
    text (below 1), a ``"self"`` row to the rest; a UNet's rows sum to 1 per kind. All layers
    of a DiT work at one token grid, so ``aggregate("cross", grid)`` averages every layer.

    Getters return cross maps as ``(B, h, w, key)`` (``key`` = text tokens) and self maps as
    ``(B, h, w, h*w)``; ``B`` is the UNet's batch (with classifier-free guidance, ``[uncond;
    cond]``: take the last half for the conditional maps).

    >>> store = AttentionStore(kinds=("cross",), resolutions=[16])
    """

    def __init__(
        self,
        kinds: Iterable[str] = _KINDS,
        places: Iterable[str] | None = None,
        resolutions: Iterable[int | Resolution] | None = None,
        *,
        steps: Container[int] | None = None,
        per_step: bool = False,
    ):
        self.kinds = _check_choice("kinds", kinds, _KINDS)
        self.places = _check_choice(
            "places", all_places() if places is None else places, all_places()
        )
        self.resolutions = (
            None if resolutions is None else frozenset(as_resolution(r) for r in resolutions)
        )
        self.steps = steps
        self.per_step = per_step
        self.reset()

    # -- the controller interface ----------------------------------------------------------
    def needs(self, site: AttnSite) -> bool:
        return (
            site.kind in self.kinds
            and site.place in self.places
            and (self.resolutions is None or site.resolution in self.resolutions)
            and (self.steps is None or self.cur_step in self.steps)
        )

    def __call__(self, probs: torch.Tensor, site: AttnSite) -> torch.Tensor:
        if not self.recomputing:
            self._record(probs.mean(dim=1), site)
        return probs

    def reset(self) -> None:
        super().reset()
        # keyed by (layer name, kind): a joint layer records its "cross" and "self" blocks
        self._sums: dict[tuple[str, str], torch.Tensor] = {}
        self._counts: dict[tuple[str, str], int] = {}
        self._sites: dict[tuple[str, str], AttnSite] = {}
        self._per_step: dict[tuple[str, str], list[tuple[int, torch.Tensor]]] = {}
        self._recorded_steps: set[int] = set()

    def _record(self, maps: torch.Tensor, site: AttnSite) -> None:
        name = (site.name, site.kind)
        previous = self._sites.get(name)
        if previous is not None and previous.map_shape != site.map_shape:
            raise HookError(
                f"layer {site.name} produced {site.kind} maps of shape {site.map_shape} after "
                f"{previous.map_shape} in the same run; call store.reset() between inputs of "
                "different sizes"
            )
        self._sites[name] = site
        # Out of place: the sum keeps the graph of every step.
        self._sums[name] = maps if name not in self._sums else self._sums[name] + maps
        self._counts[name] = self._counts.get(name, 0) + 1
        if self.per_step:
            self._per_step.setdefault(name, []).append((self.cur_step, maps))
        self._recorded_steps.add(self.cur_step)

    # -- getters ------------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        """How many distinct model calls recorded something."""
        return len(self._recorded_steps)

    def sites(
        self,
        kind: str | None = None,
        resolution: int | Resolution | None = None,
        places: Iterable[str] | None = None,
    ) -> list[AttnSite]:
        """The recorded sites matching the filters, in first-recorded (execution) order."""
        res = None if resolution is None else as_resolution(resolution)
        places = set(all_places() if places is None else places)
        return [
            s
            for s in self._sites.values()
            if (kind is None or s.kind == kind)
            and (res is None or s.resolution == res)
            and s.place in places
        ]

    def maps(
        self,
        kind: str,
        resolution: int | Resolution | None = None,
        places: Iterable[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per layer, the step-average of its head-averaged maps: ``{name: (B, h, w, key)}``."""
        _check_kind(kind)
        return {
            s.name: self._spatial(self._sums[s.name, kind] / self._counts[s.name, kind], s)
            for s in self._matching(kind, resolution, places)
        }

    def aggregate(
        self,
        kind: str,
        resolution: int | Resolution,
        places: Iterable[str] | None = None,
    ) -> torch.Tensor:
        """Average over heads, matching layers and stored steps at one resolution.

        Like prompt-to-prompt's ``aggregate_attention``: ``(B, h, w, key)`` (``key = h*w`` for
        self-attention). Raises if nothing matching was recorded, listing what was.
        """
        _check_kind(kind)
        self._check_one_resolution("aggregate", kind, resolution)
        layers = list(self.maps(kind, resolution, places).values())
        return torch.stack(layers).mean(dim=0) if len(layers) > 1 else layers[0]

    def step_maps(
        self,
        kind: str,
        resolution: int | Resolution,
        places: Iterable[str] | None = None,
    ) -> dict[int, torch.Tensor]:
        """Per step, the layer-average at one resolution: ``{step: (B, h, w, key)}``.

        Needs ``per_step=True``.
        """
        _check_kind(kind)
        self._check_one_resolution("step_maps", kind, resolution)
        if not self.per_step:
            raise HookError("step_maps() needs per-step maps; create the store with per_step=True")
        by_step: dict[int, list[torch.Tensor]] = {}
        for s in self._matching(kind, resolution, places):
            for step, m in self._per_step[s.name, kind]:
                by_step.setdefault(step, []).append(self._spatial(m, s))
        return {step: torch.stack(ms).mean(dim=0) for step, ms in sorted(by_step.items())}

    def _matching(
        self, kind: str, resolution: int | Resolution | None, places: Iterable[str]
    ) -> list[AttnSite]:
        found = self.sites(kind, resolution, places)
        places = all_places() if places is None else tuple(places)
        if not found:
            recorded = sorted({(s.kind, s.place, s.resolution) for s in self._sites.values()})
            raise HookError(
                f"no {kind}-attention maps at resolution {resolution} in {places} were recorded "
                f"(recorded: {recorded or 'nothing'}); check the store's kinds/places/resolutions "
                "filters and that the model ran under hijack(model, store)"
            )
        return found

    def _check_one_resolution(self, what: str, kind: str, resolution: object) -> None:
        """Averaging maps needs one size: ``None`` (or anything but an int or a pair) is refused
        with the sizes that were recorded."""
        if resolution is None:
            recorded = sorted({s.resolution for s in self._sites.values() if s.kind == kind})
            raise InputError(
                f"{what}({kind!r}, None): maps are averaged at one resolution; pass one of the "
                f"recorded {kind}-attention sizes {recorded or '(none recorded yet)'}, e.g. "
                f"store.{what}({kind!r}, {recorded[0] if recorded else '16'})"
            )

    @staticmethod
    def _spatial(maps: torch.Tensor, site: AttnSite) -> torch.Tensor:
        h, w, _ = site.map_shape
        return rearrange(maps, "b (h w) k -> b h w k", h=h, w=w)

    def __repr__(self) -> str:
        return (
            f"AttentionStore(kinds={self.kinds}, places={self.places}, layers={len(self._sites)}, "
            f"steps={self.num_steps}, cur_step={self.cur_step})"
        )


def _check_choice(what: str, values: Iterable[str], allowed: Iterable[str]) -> tuple[str, ...]:
    if isinstance(values, str):
        values = (values,)
    values = tuple(values)
    allowed = tuple(allowed)
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise InputError(f"{what} must be a non-empty subset of {allowed}, got {values}")
    return values


def _check_kind(kind: str) -> None:
    if kind not in _KINDS:
        raise InputError(f"kind must be 'cross' or 'self', got {kind!r}")
