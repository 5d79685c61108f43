"""Activation checkpointing that recomputes with the attention processors of the forward pass.

``torch.utils.checkpoint`` (non-reentrant) re-runs a function during backward. If attention
processors were swapped in between (``hijack`` exited before ``loss.backward()``, as the
user's pipeline does), a plain recompute runs different code than the forward did: wrong
gradients, or torch's ``CheckpointError``. :func:`checkpoint` fixes that generically: at forward
time it snapshots every attention module's processor (and, through a small protocol, the state
of stateful processors); during the recompute it re-installs exactly those objects, replays
their state, and afterwards puts back whatever was installed.

The protocol: a processor may carry ``attnpatch_replay_owners``, a tuple of objects with a
``capture()`` method that returns a context manager. ``capture()`` is called at forward time;
the context manager is entered around the recompute. attnpatch's controlled processors use it
so a controller neither stores maps twice nor advances its step during a recompute, and applies
the same edits as in the forward pass. This module knows nothing about controllers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

__all__ = ["checkpoint", "checkpoint_context_fn", "attention_modules", "in_backward"]


def attention_modules(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(path, module)`` for every diffusers attention module (anything with a processor)."""
    for name, sub in module.named_modules():
        if hasattr(sub, "set_processor") and hasattr(sub, "processor"):
            yield name, sub


def in_backward() -> bool:
    """True while the autograd engine runs a backward pass on this thread.

    During a non-reentrant checkpoint recompute this is how code can tell that it is being
    re-run rather than run. It reads ``torch._C._current_graph_task_id()`` (the id of the
    running graph task, -1 outside backward), which torch's own checkpoint code uses; the
    test-suite pins its behaviour so an upstream change is caught.
    """
    return torch._C._current_graph_task_id() != -1


class _Recompute:
    """Re-installs forward-time processors and replays captured states around a recompute."""

    def __init__(self, processors: list[tuple[nn.Module, Any]], captured: list[Any]):
        self._processors = processors
        self._captured = captured
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> _Recompute:
        stack = contextlib.ExitStack()
        try:
            for mod, proc in self._processors:
                current = mod.processor
                if current is not proc:
                    mod.set_processor(proc)
                    stack.callback(mod.set_processor, current)
            for ctx in self._captured:
                stack.enter_context(ctx)
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc: object) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()


def checkpoint_context_fn(module: nn.Module) -> Callable[[], tuple[Any, Any]]:
    """A ``context_fn`` for ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``.

    Called at forward time, it snapshots ``module``'s attention processors and captures the
    state of stateful ones; its recompute context re-installs and replays them.
    """

    def context_fn() -> tuple[Any, Any]:
        processors = [(m, m.processor) for _, m in attention_modules(module)]
        owners: dict[int, Any] = {}
        for _, proc in processors:
            for owner in getattr(proc, "attnpatch_replay_owners", ()):
                owners.setdefault(id(owner), owner)
        captured = [owner.capture() for owner in owners.values()]
        return contextlib.nullcontext(), _Recompute(processors, captured)

    return context_fn


def checkpoint(fn: Callable[..., Any], *args: Any, module: nn.Module, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` under non-reentrant activation checkpointing.

    ``module`` is the model whose attention processors must be the same in the recompute as in
    the forward pass (usually the UNet that ``fn`` calls). Values and gradients equal those of
    a plain call; memory holds only ``fn``'s inputs and outputs until backward.
    """
    return _torch_checkpoint(
        fn, *args, use_reentrant=False, context_fn=checkpoint_context_fn(module), **kwargs
    )
