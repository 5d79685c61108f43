"""Editing controllers: change the attention a layer uses (prompt-to-prompt style)."""

from __future__ import annotations

from collections.abc import Container, Iterable, Sequence

import torch

from ...errors import InputError
from ...families import all_places
from ..site import AttnSite, Resolution, as_resolution
from .base import AttentionControl

__all__ = ["ReweightCrossAttention"]


class ReweightCrossAttention(AttentionControl):
    """Scale the cross-attention that image positions pay to some text tokens.

    Like prompt-to-prompt's ``AttentionReweight``: ``probs[..., tokens] *= scale`` on every
    matching cross-attention layer, optionally renormalised so rows sum to 1 again.

    On joint attention (SD3, Flux) it scales the text columns of the image rows: the
    ``"cross"`` block; with ``renormalize`` it takes the whole matrix (``"full"``) so each image
    row is renormalised over all its keys, image and text (text rows are left as they are).

    Args:
        tokens: positions in the text sequence (e.g. from ``token_indices``).
        scale: factor (``> 1`` strengthens the tokens' influence, ``0`` removes it).
        places: blocks to edit (default: all: down/mid/up of a UNet, joint/single of a DiT).
        resolutions: map sizes to edit (``None``: all).
        steps: UNet calls (``cur_step`` values) to edit, e.g. ``range(0, 3)``; ``None``: all.
        renormalize: divide each row by its new sum (prompt-to-prompt does not).
    """

    def __init__(
        self,
        tokens: Sequence[int],
        scale: float,
        *,
        places: Iterable[str] | None = None,
        resolutions: Iterable[int | Resolution] | None = None,
        steps: Container[int] | None = None,
        renormalize: bool = False,
    ):
        self.tokens = [int(t) for t in tokens]
        if not self.tokens:
            raise InputError("ReweightCrossAttention needs at least one token position")
        self.scale = float(scale)
        self.places = all_places() if places is None else tuple(places)
        self.resolutions = (
            None if resolutions is None else frozenset(as_resolution(r) for r in resolutions)
        )
        self.steps = steps
        self.renormalize = renormalize
        self.cur_step = 0

    def needs(self, site: AttnSite) -> bool:
        wanted = "full" if self.renormalize and site.joint is not None else "cross"
        return (
            site.kind == wanted
            and site.place in self.places
            and (self.resolutions is None or site.resolution in self.resolutions)
            and (self.steps is None or self.cur_step in self.steps)
        )

    def __call__(self, probs: torch.Tensor, site: AttnSite) -> torch.Tensor:
        text = site.key_len if site.kind == "cross" else site.joint.text[1] - site.joint.text[0]
        if max(self.tokens) >= text:
            raise InputError(
                f"token position {max(self.tokens)} is out of range for layer {site.name} with "
                f"{text} text tokens"
            )
        if site.kind == "full":  # joint attention: the text columns of the image rows
            weight = torch.ones(probs.shape[-2:], dtype=probs.dtype, device=probs.device)
            columns = [site.joint.text[0] + t for t in self.tokens]
            weight[site.joint.image_slice, columns] = self.scale
        else:
            weight = torch.ones(probs.shape[-1], dtype=probs.dtype, device=probs.device)
            weight[self.tokens] = self.scale
        edited = probs * weight
        if self.renormalize:
            edited = edited / edited.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        return edited
