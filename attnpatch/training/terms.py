"""The loss terms of ``attnpatch train``: one registration each, read by everything else.

A term is a name, a function of one iteration's tensors, and its default weights (one per
``weights.mode``). The config's ``[weights]`` section, the trainer, the doctor's gradient-flow
checks, ``metrics.jsonl``, the progress bar and ``loss_curves.png`` all read this registry, so
adding a term to the pipeline is one :func:`register_term` call in a module of the training
layer (see docs/architecture.md, "Where new things go")::

    register_term(Term(
        "nps", lambda trainer, x: non_printability_score(trainer.patch.pixels),
        weight=0.0, share=0.0, label="nps", help="non-printability of the patch's colours"))

>>> [t.name for t in terms()]
['classifier', 'cross_attention', 'self_attention', 'l2', 'tv']
>>> term("cross_attention").uses
frozenset({'cross'})
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError
from ..losses import (
    classifier_loss,
    cross_attention_region,
    cross_attention_variance,
    l2_norm,
    self_attention_structure,
    total_variation,
)

if TYPE_CHECKING:  # the trainer imports this module
    from ..diffusion import AttentionResult
    from .trainer import PatchTrainer

__all__ = ["Term", "TermInputs", "register_term", "terms", "term", "term_names", "MODES"]

#: ``weights.mode``: "share" (each weight is the term's share of the update, whatever its raw
#: scale: :class:`~attnpatch.losses.GradientShares`) or "sum" (``sum_i w_i L_i``).
MODES = ("share", "sum")


@dataclass
class TermInputs:
    """What a term may read in one iteration (tensors keep their graphs).

    Attributes:
        images: the batch ``(B, 3, H, W)`` in [0, 1]; labels: ``(B,)`` data labels;
        indices: the batch's data-set indices.
        targets: ``(B,)`` classifier output indices the classifier loss uses.
        patched: ``(B, 3, H, W)`` in [0, 1]; mask: ``(B, 1, H, W)`` in [0, 1], the placed patch.
        logits: ``(B, num_classes)``.
        attention: the attention pipeline's result, ``None`` when no active term uses it.
    """

    images: torch.Tensor
    labels: torch.Tensor
    indices: list[int]
    targets: torch.Tensor
    patched: torch.Tensor
    mask: torch.Tensor
    logits: torch.Tensor
    attention: AttentionResult | None = None
    _maps: dict[Any, Any] = field(default_factory=dict, repr=False)

    def cross_maps(self, resolution: Any) -> torch.Tensor:
        """The attention result's cross maps ``(B, h, w, 77)`` at ``resolution``, aggregated
        once per iteration whichever terms (and the doctor) read them."""
        key = ("cross", resolution)
        if key not in self._maps:
            self._maps[key] = self.attention.cross_maps(resolution)
        return self._maps[key]

    def self_maps(self) -> dict[str, torch.Tensor]:
        """The attention result's self maps ``{layer: (B, h, w, h*w)}``, aggregated once."""
        if "self" not in self._maps:
            self._maps["self"] = self.attention.self_maps()
        return self._maps["self"]


@dataclass(frozen=True)
class Term:
    """One loss term of the training pipeline.

    Attributes:
        name: the ``[weights]`` key, the ``metrics.jsonl`` key, the name in logs and figures.
        compute: ``(trainer, TermInputs) -> scalar tensor`` (minimised); called only when the
            term's weight is not 0.
        weight: default weight in ``weights.mode = "sum"``.
        share: default share in ``weights.mode = "share"``.
        label: short name for the progress bar ("" : not shown there).
        uses: the attention outputs the term reads: ``"cross"`` and/or ``"self"`` maps (the
            attention pipeline runs when any active term uses one; the doctor checks that the
            gradient reaches them).
        help: one line for ``--help`` and the docs.
    """

    name: str
    compute: Callable[[PatchTrainer, TermInputs], torch.Tensor]
    weight: float
    share: float
    label: str = ""
    uses: frozenset[str] = field(default_factory=frozenset)
    help: str = ""


_TERMS: dict[str, Term] = {}


def register_term(t: Term, *, overwrite: bool = False) -> Term:
    """Add ``t`` to the pipeline's terms (in registration order); returns it.

    A term registered here, in this module, gets a ``[weights]`` key and a
    ``--weights.<name>`` flag (``WeightsConfig`` is built from the registry when the training
    package is imported). A term registered later (e.g. from a notebook) is computed, logged and
    plotted by every trainer built afterwards, with its default weight for the run's mode.
    """
    if not isinstance(t, Term):
        raise ConfigError(f"register_term needs a Term, got {type(t).__name__}")
    if t.name in _TERMS and not overwrite:
        raise ConfigError(f"loss term {t.name!r} is already registered; pass overwrite=True")
    if (
        t.name in ("mode", "measure_every", "momentum", "exact", "total")
        or not t.name.isidentifier()
    ):
        raise ConfigError(f"{t.name!r} cannot name a loss term (reserved, or not an identifier)")
    unknown = set(t.uses) - {"cross", "self"}
    if unknown:
        raise ConfigError(
            f"term {t.name!r}: uses must be within {{'cross', 'self'}}, got {unknown}"
        )
    _TERMS[t.name] = t
    return t


def terms() -> list[Term]:
    """The registered terms, in order."""
    return list(_TERMS.values())


def term(name: str) -> Term:
    """The registered term ``name``."""
    if name not in _TERMS:
        raise ConfigError(f"unknown loss term {name!r}; registered: {list(_TERMS)}")
    return _TERMS[name]


def term_names() -> list[str]:
    return list(_TERMS)


# -- the built-in terms ---------------------------------------------------------------------------


def _classifier(trainer: PatchTrainer, x: TermInputs) -> torch.Tensor:
    attack = trainer.config.attack
    kappa = {"kappa": attack.kappa} if attack.loss == "cw" else {}
    return classifier_loss(x.logits, x.targets, targeted=attack.targeted, kind=attack.loss, **kappa)


def _cross_attention(trainer: PatchTrainer, x: TermInputs) -> torch.Tensor:
    maps = x.cross_maps(trainer.attention.cross_resolution)  # (B, h, w, 77)
    tokens = [trainer.tokens[int(y)] for y in x.labels]
    kind = trainer.config.attention.cross_loss
    if kind == "variance":
        return cross_attention_variance(maps, tokens)
    mask = trainer.attention.resize_mask(x.mask)
    return cross_attention_region(maps, mask, tokens, mode=kind)


def _self_attention(trainer: PatchTrainer, x: TermInputs) -> torch.Tensor:
    reference = trainer.references(x.images, x.labels, x.indices)  # the clean images', cached
    return self_attention_structure(x.self_maps(), reference)


def _builtin() -> None:
    for t in (
        Term(
            "classifier",
            _classifier,
            weight=10.0,
            share=0.4,
            label="cls",
            help="fool the classifier (attack.loss: -CE or CW margin; targeted or not)",
        ),
        Term(
            "cross_attention",
            _cross_attention,
            weight=1000.0,
            share=0.3,
            label="xattn",
            uses=frozenset({"cross"}),
            help="the label word's cross-attention (attention.cross_loss: variance, repel, "
            "attract)",
        ),
        Term(
            "self_attention",
            _self_attention,
            weight=10000.0,
            share=0.3,
            label="sattn",
            uses=frozenset({"self"}),
            help="self-attention structure kept close to the clean image's",
        ),
        Term(
            "l2",
            lambda trainer, x: l2_norm(x.patched, x.images),
            weight=0.01,
            share=0.05,
            label="l2",
            help="L2 distance of the patched image to the clean one",
        ),
        Term(
            "tv",
            lambda trainer, x: total_variation(trainer.patch.pixels),
            weight=0.0,
            share=0.0,
            help="total variation of the patch (smoothness)",
        ),
    ):
        register_term(t)


_builtin()


def describe(mode: str) -> dict[str, Any]:
    """``{name: default weight}`` in ``mode`` (docs and ``--help``)."""
    if mode not in MODES:
        raise ConfigError(f"weights.mode must be one of {MODES}, got {mode!r}")
    return {t.name: (t.share if mode == "share" else t.weight) for t in terms()}
