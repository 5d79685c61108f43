"""The diffusers attention processors that a controller drives.

:class:`ControlledAttnProcessor` is installed on one attention layer by :func:`attnpatch.hijack`
(:class:`ControlledRotaryProcessor` on layers that call their processor as Flux's
``FluxAttention`` does). On every call it builds the layer's :class:`~attnpatch.AttnSite`\\ s from
the model family's token layout (one site for a UNet layer; one per block of the attention
matrix for joint attention) and asks the controller whether it ``needs`` them:

* none -> the original processor object runs unchanged (``F.scaled_dot_product_attention`` /
  ``dispatch_attention_fn`` with its backend): no probabilities are materialised;
* some -> Q, K, V are computed as the original processor computes them (the family's
  :meth:`~attnpatch.families.Family.project`: norms, rotary embeddings, masks), the
  probabilities softmax(QKᵀ·scale) explicitly (in float32 when the layer runs in half
  precision or under autocast: the controller then gets float32, and the product with V runs in
  V's dtype), each needed block is handed to the controller, the blocks it returns are written
  back, and the probabilities are multiplied with V.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from torch import nn

from ..errors import HookError
from ..families import (
    CallInfo,
    Family,
    TokenLayout,
    family_for_processor,
    get_family,
    refuse_unreproducible,
)
from .controllers.base import AttentionControl
from .maths import (
    FP16_GRAD_SCALE,
    attention_probs,
    half_cast,
    own_saved_tensors,
    projection_probs,
)
from .site import AttnSite, JointTokens, Resolution

__all__ = [
    "ControlledAttnProcessor",
    "ControlledRotaryProcessor",
    "HijackState",
    "attention_probs",
    "half_cast",
    "FP16_GRAD_SCALE",
]

#: the blocks of a joint layer's attention, in the order controllers are asked about them:
#: kind -> (query tokens, key tokens) as "image" / "text" / "all"
_PARTS = {
    "full": ("all", "all"),
    "cross": ("image", "text"),
    "self": ("image", "image"),
    "text_cross": ("text", "image"),
    "text_self": ("text", "text"),
}


class HijackState:
    """What the processors of one hijack share: the controller, the model's family, and what
    the current model call fixes (its latent size, token grid and text length: set by the
    hijack's pre-hook)."""

    def __init__(
        self,
        controller: AttentionControl,
        family: Family | None = None,
        model: nn.Module | None = None,
    ):
        self.controller = controller
        self.family = family if family is not None else get_family("unet")
        self.model = model  # the hijacked model (its calls set ``call``)
        self.call = CallInfo()

    @property
    def latent_hw(self) -> Resolution | None:
        """The latent size of the current call (``None`` outside a model call)."""
        return self.call.latent


_ACCEPTED: dict[type, frozenset[str]] = {}
_OPTIONAL = ("encoder_hidden_states", "attention_mask", "temb", "ip_hidden_states")


def _accepted_kwargs(processor: Any) -> frozenset[str]:
    """Which of the standard keyword arguments ``processor.__call__`` names (``"*"``: any)."""
    cls = type(processor)
    cached = _ACCEPTED.get(cls)
    if cached is None or "__call__" in getattr(processor, "__dict__", {}):
        params = inspect.signature(processor.__call__).parameters
        names = {k for k in _OPTIONAL if k in params}
        if any(p.kind == p.VAR_KEYWORD for p in params.values()):
            names.add("*")
        cached = frozenset(names)
        if "__call__" not in getattr(processor, "__dict__", {}):
            _ACCEPTED[cls] = cached
    return cached


class ControlledAttnProcessor(AttnProcessor2_0):
    """An ``AttnProcessor2_0`` whose attention probabilities a controller can read and edit.

    Args:
        controller: the :class:`~attnpatch.AttentionControl` to consult.
        name: the attention module's path in the model (becomes ``AttnSite.name``).
        original: the processor it replaces; runs every call the controller does not need.
            A ``ControlledAttnProcessor`` of an enclosing hijack is chained: its controller
            still sees (and edits first) the layers it needs.
        state: the :class:`HijackState` shared by the processors of one hijack.
        family: the model family whose rules apply (default: the state's; without a state, the
            family that reproduces ``original``, else the UNet family).
        place: ``(place, block)`` of the layer (default: from ``name`` by the family's rules).
    """

    def __init__(
        self,
        controller: AttentionControl,
        *,
        name: str,
        original: Any = None,
        state: HijackState | None = None,
        family: Family | None = None,
        place: tuple[str, int] | None = None,
    ):
        if not isinstance(controller, AttentionControl):
            raise HookError(
                f"controller must be an attnpatch.AttentionControl, got {type(controller).__name__}"
            )
        self.controller = controller
        self.name = name
        self.original = original if original is not None else self._default_original()
        if family is None:
            family = state.family if state is not None else _family_of_processor(self.original)
        self.family = family
        self.state = state if state is not None else HijackState(controller, family)
        self.place, self.block = place if place is not None else family.place(name)
        self._layouts: dict[tuple[Any, ...], tuple[tuple[AttnSite, ...], tuple[Any, ...]]] = {}
        self._original_takes = _accepted_kwargs(self.original)

    # -- sites ------------------------------------------------------------------------------
    def sites(
        self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: Any = None
    ) -> tuple[AttnSite, ...]:
        """The :class:`AttnSite`\\ s of this call: one for a self- or cross-attention layer,
        five for a joint one (``"full"``, ``"cross"``, ``"self"``, ``"text_cross"``,
        ``"text_self"``); cached per input geometry and model call."""
        return self._layout(attn, hidden_states, encoder_hidden_states)[0]

    def site(
        self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: Any = None
    ) -> AttnSite:
        """The call's first site (a UNet layer's only one; a joint layer's ``"full"``)."""
        return self.sites(attn, hidden_states, encoder_hidden_states)[0]

    def _layout(
        self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: Any
    ) -> tuple[tuple[AttnSite, ...], tuple[Any, ...]]:
        ehs = encoder_hidden_states
        if isinstance(ehs, (tuple, list)):
            ehs = ehs[0]
        call = self.state.call
        key = (hidden_states.shape, None if ehs is None else ehs.shape[1], call)
        found = self._layouts.get(key)
        if found is None:
            layout = self.family.layout(self.name, hidden_states, encoder_hidden_states, call)
            found = self._sites_of(layout, attn.heads)
            self._layouts[key] = found
        return found

    def _sites_of(
        self, layout: TokenLayout, heads: int
    ) -> tuple[tuple[AttnSite, ...], tuple[Any, ...]]:
        common = dict(name=self.name, place=self.place, block=self.block, heads=heads)
        n = layout.image[1] - layout.image[0]
        if layout.kind != "joint":
            cross = layout.kind == "cross"
            keys = layout.text[1] - layout.text[0] if cross and layout.text else n
            site = AttnSite(
                is_cross=cross, query_len=n, key_len=keys, resolution=layout.resolution, **common
            )
            return (site,), (None,)
        if layout.text is None:
            raise HookError(f"{self.name}: a joint layout needs the text tokens' positions")
        tokens = JointTokens(layout.image, layout.text)
        spans = {"image": layout.image, "text": layout.text, "all": (0, tokens.length)}
        sites, slices = [], []
        for part, (q, k) in _PARTS.items():
            (q0, q1), (k0, k1) = spans[q], spans[k]
            sites.append(
                AttnSite(
                    is_cross=part == "cross",
                    query_len=q1 - q0,
                    key_len=k1 - k0,
                    resolution=layout.resolution,
                    part=part,
                    joint=tokens,
                    **common,
                )
            )
            slices.append(None if part == "full" else (slice(q0, q1), slice(k0, k1)))
        return tuple(sites), tuple(slices)

    # -- the call ---------------------------------------------------------------------------
    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        ip_hidden_states: Any = None,
        **kwargs: Any,
    ) -> Any:
        layout = self._layout(attn, hidden_states, encoder_hidden_states)
        sites, needs = layout[0], self.controller.needs
        if not (needs(sites[0]) if len(sites) == 1 else any(needs(s) for s in sites)):
            passed = {
                "encoder_hidden_states": encoder_hidden_states,
                "attention_mask": attention_mask,
            }
            if temb is not None:
                passed["temb"] = temb
            if ip_hidden_states is not None:
                passed["ip_hidden_states"] = ip_hidden_states
            if "*" not in self._original_takes:
                passed = {k: v for k, v in passed.items() if k in self._original_takes}
            return self.original(attn, hidden_states, *args, **passed, **kwargs)
        extra = {"temb": temb}
        return self._run_controlled(
            attn, hidden_states, encoder_hidden_states, attention_mask, extra, layout
        )

    def _edit(self, probs: torch.Tensor, site: AttnSite) -> torch.Tensor:
        """Enclosing hijacks' controllers first, then this one."""
        outer = self.original
        if isinstance(outer, ControlledAttnProcessor):
            probs = outer._edit(probs, site)
        if self.controller.needs(site):
            given = probs
            with own_saved_tensors():
                probs = self.controller(given, site)
            if not isinstance(probs, torch.Tensor) or probs.shape != given.shape:
                got = tuple(probs.shape) if isinstance(probs, torch.Tensor) else type(probs)
                raise HookError(
                    f"{type(self.controller).__name__} returned {got} at {site.name}; a controller "
                    f"must return probabilities of the shape it received {tuple(given.shape)}"
                )
            # an edit (not the tensor it was given) is checked once: NaN would spread silently
            if probs is not given and not bool(torch.isfinite(probs.detach()).all()):
                raise HookError(
                    f"{type(self.controller).__name__} returned NaN or Inf probabilities at "
                    f"{site.name}; check its edit (e.g. a division by a zero sum)"
                )
        return probs

    def _edit_blocks(
        self, probs: torch.Tensor, sites: tuple[AttnSite, ...], slices: tuple[Any, ...]
    ) -> torch.Tensor:
        """Each site's block of ``probs`` to the controllers; edited blocks written back (out
        of place: the tensor controllers were given is never changed)."""
        for site, where in zip(sites, slices):
            if where is None:
                probs = self._edit(probs, site)
                continue
            block = probs[:, :, where[0], where[1]]
            edited = self._edit(block, site)
            if edited is not block:
                probs = probs.clone()
                probs[:, :, where[0], where[1]] = edited
        return probs

    def _base_processor(self) -> Any:
        proc = self.original
        while isinstance(proc, ControlledAttnProcessor):
            proc = proc.original
        return proc

    def _run_controlled(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Any,
        attention_mask: torch.Tensor | None,
        extra: dict[str, Any],
        layout: tuple[tuple[AttnSite, ...], tuple[Any, ...]],
    ) -> Any:
        base = self._base_processor()
        if not self.family.reproduces(base):
            refuse_unreproducible(self.family, self.name, base)
        try:
            proj = self.family.project(
                attn, hidden_states, encoder_hidden_states, attention_mask, extra
            )
        except HookError as e:
            raise HookError(f"layer {self.name}: {e}") from None
        # (B, heads, L, S); fp32 under half precision: what the controller reads (and the
        # losses on it) keeps fp32 precision, the product with V runs in V's dtype
        probs = self._edit_blocks(projection_probs(proj), *layout)
        out = torch.matmul(half_cast(probs, proj.value.dtype), proj.value)
        return proj.finish(out)

    #: the processor a layer of this call convention runs by default
    _default_original: Any = AttnProcessor2_0

    #: :func:`half_cast`, the gradient-scaled cast at float16 boundaries (the DDIM loop uses
    #: it at the UNet's inputs and output, so one rule holds on both sides)
    half_cast = staticmethod(half_cast)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, controller="
            f"{type(self.controller).__name__}, original={type(self.original).__name__})"
        )


class ControlledRotaryProcessor(ControlledAttnProcessor):
    """:class:`ControlledAttnProcessor` for attention modules that call their processor as
    ``FluxAttention`` does: ``processor(attn, hidden_states, encoder_hidden_states,
    attention_mask, image_rotary_emb, **kwargs)``, positionally."""

    _default_original = FluxAttnProcessor

    def __call__(  # type: ignore[override]
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
        ip_hidden_states: Any = None,
        ip_adapter_masks: Any = None,
    ) -> Any:
        layout = self._layout(attn, hidden_states, encoder_hidden_states)
        needs = self.controller.needs
        if not any(needs(site) for site in layout[0]):
            kwargs = {}
            if ip_hidden_states is not None:
                kwargs["ip_hidden_states"] = ip_hidden_states
            if ip_adapter_masks is not None:
                kwargs["ip_adapter_masks"] = ip_adapter_masks
            return self.original(
                attn,
                hidden_states,
                encoder_hidden_states,
                attention_mask,
                image_rotary_emb,
                **kwargs,
            )
        extra = {"image_rotary_emb": image_rotary_emb}
        return self._run_controlled(
            attn, hidden_states, encoder_hidden_states, attention_mask, extra, layout
        )


def _family_of_processor(original: Any) -> Family:
    if isinstance(original, ControlledAttnProcessor):
        return original.family
    return family_for_processor(original) or get_family("unet")
