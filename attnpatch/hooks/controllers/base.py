"""The controller interface: what a hooked attention layer asks, and what it is given back.

The I/O contract (docs/attention-control.md has the full text):

* ``needs(site) -> bool`` is asked on every call of every attention layer. ``False`` costs
  nothing: the layer runs its original processor (``F.scaled_dot_product_attention``), no
  probabilities are materialised.
* ``__call__(probs, site) -> probs`` is called for layers that are needed, with ``probs`` shaped
  ``(batch, heads, query, key)``: softmax(QKᵀ·scale) in the layer's dtype (float32 under half
  precision), rows summing to 1 over
  ``key``. It returns the probabilities the layer then multiplies with V: the same tensor to only
  observe, an edited one (same shape) to steer. Gradients flow through both.
* ``cur_step`` is the index of the current UNet call since ``reset()``; ``hijack`` advances it after
  each UNet forward by calling ``step_end()``.
* ``recomputing`` is True while activation checkpointing re-runs a forward pass during backward;
  ``cur_step`` then holds the step of the forward being recomputed. Observers should not record
  in that state (they would record twice); editors must edit exactly as in the forward pass
  (they do, if edits depend only on ``probs``, ``site`` and ``cur_step``). Whatever maths an
  observer records with (``mean``, ``amax``, ``square``, ...) is checkpoint-safe: the processor
  calls controllers outside the checkpoint's saved-tensor bookkeeping.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch

from ...errors import InputError
from ..site import AttnSite

__all__ = ["AttentionControl", "ComposeControl"]


class AttentionControl:
    """Base class of controllers. Plain Python objects, not ``nn.Module``s.

    Subclasses override :meth:`needs` and :meth:`__call__` (and :meth:`reset` when they keep
    state, calling ``super().reset()``). The base class observes nothing.
    """

    cur_step: int = 0
    _replay_depth: int = 0

    def needs(self, site: AttnSite) -> bool:
        """Does this controller want ``site``'s probabilities on this call? (default: no)."""
        return False

    def __call__(self, probs: torch.Tensor, site: AttnSite) -> torch.Tensor:
        """Observe or edit ``probs`` ``(B, heads, query, key)``; return ``(B, heads, query, key)``."""
        return probs

    @property
    def recomputing(self) -> bool:
        """True during a checkpoint recompute (record nothing, edit as in the forward pass)."""
        return self._replay_depth > 0

    def step_end(self) -> None:
        """Called by ``hijack`` after every UNet forward: advances :attr:`cur_step`."""
        if not self.recomputing:
            self.cur_step += 1

    def reset(self) -> None:
        """Forget everything recorded and start again at step 0."""
        self.cur_step = 0

    @contextlib.contextmanager
    def replaying(self, step: int) -> Iterator[None]:
        """Replay UNet call ``step`` inside the block: ``cur_step == step`` and
        :attr:`recomputing` is True (observers record nothing, editors edit as in that call);
        both are restored on exit. ``hijack``'s checkpoint replay enters it around every
        recompute during backward."""
        saved = self.cur_step
        self._replay_depth += 1
        self.cur_step = step
        try:
            yield
        finally:
            self._replay_depth -= 1
            self.cur_step = saved

    def __repr__(self) -> str:
        return f"{type(self).__name__}(cur_step={self.cur_step})"


class ComposeControl(AttentionControl):
    """Several controllers as one: each sees the layers it needs, in the given order.

    An editor placed before an observer makes the observer record the edited maps; after it,
    the original ones.

    >>> from attnpatch import AttentionStore
    >>> both = ComposeControl(AttentionStore(kinds=("cross",)), AttentionStore(kinds=("self",)))
    """

    def __init__(self, *controllers: AttentionControl | Iterable[AttentionControl]):
        flat: list[AttentionControl] = []
        for c in controllers:
            if isinstance(c, AttentionControl):
                flat.append(c)
            else:
                flat.extend(c)
        for c in flat:
            if not isinstance(c, AttentionControl):
                raise InputError(
                    f"ComposeControl takes AttentionControl objects, got {type(c).__name__}"
                )
        self.controllers: tuple[AttentionControl, ...] = tuple(flat)
        self.cur_step = 0

    def needs(self, site: AttnSite) -> bool:
        return any(c.needs(site) for c in self.controllers)

    def __call__(self, probs: torch.Tensor, site: AttnSite) -> torch.Tensor:
        for c in self.controllers:
            if c.needs(site):
                probs = c(probs, site)
        return probs

    def step_end(self) -> None:
        super().step_end()
        for c in self.controllers:
            c.step_end()

    def reset(self) -> None:
        super().reset()
        for c in self.controllers:
            c.reset()

    @contextlib.contextmanager
    def replaying(self, step: int) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for c in self.controllers:
                stack.enter_context(c.replaying(step))
            stack.enter_context(super().replaying(step))
            yield

    def __repr__(self) -> str:
        return f"ComposeControl({', '.join(map(repr, self.controllers))})"
