"""What a model family says about its attention, its inputs and its scheduler.

A :class:`Family` describes one diffusers model class (a UNet, an SD3 or Flux transformer):

* its **attention layers**: which modules they are and where they sit (:class:`AttnLayer`:
  ``place`` ``"down"``/``"mid"``/``"up"`` in a UNet, ``"joint"``/``"single"`` in a DiT, and
  the block index);
* each **model call**: what it fixes for all its layers (:class:`CallInfo`: the latent size,
  the image-token grid, the number of text tokens), read from the call's arguments;
* each **attention call**: which tokens of its query/key sequences are image and which are text
  (:class:`TokenLayout`);
* the **maths of the processors it reproduces** (:meth:`Family.project`): Q, K, V exactly as
  the original processor computes them, and how the attention output becomes the module's
  output, so the hook layer can build the probabilities the original never materialises;
* the **scheduler family** (``"ddim"`` or ``"flow"``) and the **model call**
  (:meth:`Family.predict`, :meth:`Family.example_call`).

Families are stateless singletons; :mod:`attnpatch.families.registry` maps model classes to them
and caches each model's layers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import HookError

__all__ = ["AttnLayer", "CallInfo", "TokenLayout", "Projection", "Family", "Grid"]

Grid = tuple[int, int]


@dataclass(frozen=True)
class AttnLayer:
    """One attention module of a model.

    Attributes:
        name: module path, e.g. ``"transformer_blocks.3.attn"``.
        module: the module (it has ``processor`` and ``set_processor``).
        place: where it sits: ``"down"``, ``"mid"``, ``"up"`` (UNet), ``"joint"`` (a DiT's
            double-stream block: SD3's ``JointTransformerBlock``, with SD3.5's ``attn2``;
            Flux's ``FluxTransformerBlock``), ``"single"`` (Flux's single-stream block), or
            ``"other"``.
        block: the block's index within its place (0 for the mid block).
    """

    name: str
    module: nn.Module = field(repr=False, compare=False)
    place: str = "other"
    block: int = 0


@dataclass(frozen=True)
class CallInfo:
    """What one model call fixes for all its attention layers (recorded by ``hijack``).

    Attributes:
        latent: ``(h, w)`` of the latents in the VAE's layout (Flux: before its 2x2 packing);
            ``None`` if the call's inputs do not tell.
        grid: ``(h, w)`` of the image tokens at the model's finest attention level (UNet: the
            latent size; SD3: latent / patch size; Flux: latent / 2).
        text: text tokens of the call (keys of cross-attention; ``None``: not known).
    """

    latent: Grid | None = None
    grid: Grid | None = None
    text: int | None = None


@dataclass(frozen=True)
class TokenLayout:
    """Who is who along one attention call's query and key sequences.

    Attributes:
        kind: ``"self"`` (image queries, image keys), ``"cross"`` (image queries, text keys:
            a UNet's ``attn2``) or ``"joint"`` (one sequence of image and text tokens serves as
            queries and keys: SD3 / Flux joint attention, Flux single-stream blocks).
        image: ``(start, stop)`` of the image tokens in the query sequence (and, for
            ``"joint"``, in the key sequence).
        text: ``(start, stop)`` of the text tokens in the key sequence (``"cross"``) or the
            joint sequence (``"joint"``); ``None`` for ``"self"``.
        resolution: ``(h, w)`` of the image tokens, or ``None`` if unknown (a non-square layer
            run outside ``hijack``).
    """

    kind: str
    image: tuple[int, int]
    text: tuple[int, int] | None
    resolution: Grid | None


@dataclass
class Projection:
    """One attention call up to the softmax, as the original processor computes it.

    The probabilities are ``softmax(query @ key.T * scale + mask)`` (``upcast_attention``:
    scores in float32; ``upcast_softmax``: softmax in float32), the output ``probs @ value``,
    and ``finish`` turns that ``(B, heads, L, d)`` output into what the module returns.
    """

    query: torch.Tensor  # (B, heads, L, d)
    key: torch.Tensor  # (B, heads, S, d)
    value: torch.Tensor  # (B, heads, S, d)
    scale: float
    finish: Callable[[torch.Tensor], Any]
    mask: torch.Tensor | None = None  # additive, broadcastable to (B, heads, L, S)
    upcast_attention: bool = False
    upcast_softmax: bool = False


class Family:
    """Base class of model families: subclass, fill in, and ``register_family`` an instance.

    Class attributes: ``name`` (e.g. ``"sd3"``), ``scheduler`` (``"ddim"`` or ``"flow"``),
    ``places`` (the place names of its layers), ``model_classes`` (class names it serves, for
    messages), ``processors`` (processor classes whose maths :meth:`project` reproduces).
    """

    name: ClassVar[str] = "base"
    scheduler: ClassVar[str] = "ddim"
    places: ClassVar[tuple[str, ...]] = ()
    model_classes: ClassVar[tuple[str, ...]] = ()
    processors: ClassVar[tuple[type, ...]] = ()
    #: how the attention module calls its processor: ``"attention"`` (diffusers' ``Attention``:
    #: ``encoder_hidden_states``, ``attention_mask`` and named extras by keyword) or
    #: ``"rotary"`` (``AttentionModuleMixin`` modules such as ``FluxAttention``: positional
    #: ``(hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)``)
    convention: ClassVar[str] = "attention"

    # -- where --------------------------------------------------------------------------------
    def place(self, name: str) -> tuple[str, int]:
        """``(place, block)`` of the attention module at path ``name``."""
        return "other", 0

    def is_attention(self, module: nn.Module) -> bool:
        """Is ``module`` an attention module (it has a processor it calls)?"""
        return hasattr(module, "set_processor") and hasattr(module, "processor")

    # -- when ---------------------------------------------------------------------------------
    def call_info(self, model: nn.Module, args: tuple, kwargs: dict) -> CallInfo:
        """What the model call ``model(*args, **kwargs)`` fixes (read before it runs)."""
        return CallInfo()

    def layout(
        self, name: str, hidden_states: torch.Tensor, encoder_hidden_states: Any, call: CallInfo
    ) -> TokenLayout:
        """The token layout of one call of the attention module ``name``."""
        raise NotImplementedError

    # -- the maths ----------------------------------------------------------------------------
    def reproduces(self, processor: Any) -> bool:
        """Does :meth:`project` compute what ``processor`` computes?"""
        return isinstance(processor, self.processors)

    def project(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Any,
        attention_mask: torch.Tensor | None,
        extra: dict[str, Any],
    ) -> Projection:
        """Q, K, V of one call as the original processor computes them (see
        :class:`Projection`). ``extra``: the call's other arguments (``temb``,
        ``image_rotary_emb``)."""
        raise NotImplementedError

    # -- the model call -----------------------------------------------------------------------
    def predict(
        self,
        model: nn.Module,
        latents: torch.Tensor,
        timestep: torch.Tensor | float,
        cond: torch.Tensor,
        pooled: torch.Tensor | None = None,
        *,
        guidance: float | torch.Tensor | None = None,
        added_cond: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The model's output for ``latents`` ``(B, C, h, w)`` (the VAE's scaled layout) at
        ``timestep`` (the scheduler's units), conditioned on ``cond`` ``(B, T, D)``: ``(B, C,
        h, w)`` (eps for a UNet, flow velocity for SD3 / Flux)."""
        raise NotImplementedError

    def example_call(
        self,
        model: nn.Module,
        latent: Grid,
        *,
        batch: int = 1,
        text_len: int = 77,
    ) -> Callable[[], Any]:
        """A zero-input call of ``model`` at latent size ``latent`` (for tracing its sites;
        works on the ``meta`` device)."""
        raise NotImplementedError

    def latent_multiple(self, model: nn.Module) -> int:
        """What the latent sides must be multiples of (the transformer's patch size; 1 for a
        UNet, which takes any size its down-sampling allows)."""
        return 1

    def default_guidance(self, model: nn.Module) -> float | None:
        """The embedded guidance scale the family's pipeline passes by default (Flux-dev:
        3.5), or ``None`` for a model without a guidance embedding."""
        return None

    def default_latent(self, model: nn.Module) -> Grid:
        """The latent size the model was trained at (its config's ``sample_size``)."""
        size = int(model.config.sample_size)
        return (size, size)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} ({', '.join(self.model_classes)})>"


def refuse_unreproducible(family: Family, name: str, processor: Any) -> None:
    """The error for an observed layer whose processor the family cannot reproduce."""
    raise HookError(
        f"layer {name} runs {type(processor).__name__}, whose computation attnpatch cannot "
        f"reproduce while reading its attention (the {family.name} family reproduces "
        f"{', '.join(p.__name__ for p in family.processors)}); restore a standard processor "
        "(e.g. model.set_attn_processor(AttnProcessor2_0()) on a UNet) or exclude this layer "
        "in your controller's needs()"
    )


def image_grid(tokens: int, grid: Grid | None) -> Grid | None:
    """``grid`` if it holds ``tokens`` image tokens, else the square side if ``tokens`` is a
    square, else ``None``."""
    if grid is not None and grid[0] * grid[1] == tokens:
        return grid
    side = int(tokens**0.5)
    for s in (side - 1, side, side + 1):
        if s > 0 and s * s == tokens:
            return (s, s)
    return None


def first(args: Sequence[Any], kwargs: dict[str, Any], index: int, name: str) -> Any:
    """Argument ``name`` of a call, given positionally at ``index`` or by keyword."""
    if len(args) > index:
        return args[index]
    return kwargs.get(name)
