"""The attention pipeline's memory modes: what each one recomputes, and the pieces "low" needs.

* ``"fast"`` — no recomputation: the whole graph of the VAE encoder and the ``2k`` UNet calls
  stays alive until backward (memory grows with ``k``).
* ``"balanced"`` — each UNet call is recomputed during backward
  (:func:`attnpatch.hooks.checkpoint`): memory flat in ``k``, one UNet call's activations alive
  at a time in backward; about one extra UNet forward per call.
* ``"low"`` — also recomputes block by block inside each recomputed call (diffusers' own
  ``enable_gradient_checkpointing()`` blocks, routed through the same replay), checkpoints the
  VAE encoder (its resnets inside one recomputed encode) and runs the two guidance halves as
  separate calls; about two extra forwards per call.

Defaults (``memory=None``): ``"fast"`` on the CPU (RAM is rarely the limit there and time is:
fast runs at 1.02x the bare forward+backward, balanced 1.44x, low 2.12x at SD size), ``"low"``
on accelerators (their memory is). docs/performance.md has the measurements.

On the CPU, what "low" saves only shows in the process's memory if freed blocks go back to the
OS: glibc keeps them in its heaps by default (its mmap threshold climbs to 32 MiB as big blocks
are freed, and later blocks below it come from heaps that seldom shrink). The first low-mode
call on the CPU therefore fixes glibc's mmap threshold at 64 KiB for the process
(:func:`return_freed_memory`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .._util import deprecated
from ..errors import AttnPatchError
from ..hooks import AttentionControl, AttnSite
from ..hooks import checkpoint as replay_checkpoint

__all__ = [
    "MEMORY_MODES",
    "resolve_memory",
    "block_checkpointing",
    "CondHalf",
    "return_freed_memory",
    "MMAP_THRESHOLD",
]

MEMORY_MODES = ("low", "balanced", "fast")
#: glibc's mmap threshold (bytes) the low mode sets on the CPU: blocks of this size and more
#: are mmapped, so freeing them unmaps them (glibc's own default is 128 KiB, then dynamic).
MMAP_THRESHOLD = 64 * 1024
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
_malloc_state: dict[str, bool] = {}


def return_freed_memory() -> bool:
    """Make freed blocks of :data:`MMAP_THRESHOLD` bytes and more go back to the OS, for the
    whole process: glibc's ``mallopt(M_MMAP_THRESHOLD, 64 KiB)`` (what the environment variable
    ``MALLOC_MMAP_THRESHOLD_=65536`` does at start-up), once. ``True`` when it is in effect.

    Left alone (``False``): not glibc; ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_``
    set (the user chose); ``ATTNPATCH_MALLOC=0`` (opt out). It costs page faults on the big
    allocations it now maps afresh; docs/performance.md measures it.
    """
    if "done" in _malloc_state:
        return _malloc_state["done"]
    env = os.environ
    chosen = any(k in env for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"))
    ok = False
    if env.get("ATTNPATCH_MALLOC", "1") != "0" and not chosen and _glibc():
        try:
            ok = ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
        except (OSError, AttributeError):
            ok = False
    _malloc_state["done"] = ok
    return ok


def _glibc() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def resolve_memory(memory: str | None, checkpoint: bool | None, device: torch.device) -> str:
    """The mode from ``memory`` and the legacy ``checkpoint`` flag (``True`` = "balanced"; it
    warns: ``FutureWarning``, removed in attnpatch 0.3.0).

    >>> resolve_memory(None, None, torch.device("cpu")), resolve_memory("low", None, None)
    ('fast', 'low')
    """
    if memory is not None and memory not in MEMORY_MODES:
        raise AttnPatchError(
            f"memory must be one of {MEMORY_MODES} (or None for the device's default), got "
            f"{memory!r}"
        )
    if checkpoint is not None:
        deprecated(
            "checkpoint=",
            "memory='balanced' (checkpoint=True) or memory='fast' (False)",
            stacklevel=4,  # the AttentionPipeline(...) call
        )
        legacy = "balanced" if checkpoint else "fast"
        if memory is not None and (memory == "fast") == bool(checkpoint):
            raise AttnPatchError(
                f"checkpoint={checkpoint} contradicts memory={memory!r}; pass memory= alone "
                "(checkpoint=True is memory='balanced', False is 'fast')"
            )
        if memory is None:
            return legacy
    if memory is not None:
        return memory
    return "fast" if device is None or device.type == "cpu" else "low"


def _replayed_block(block: nn.Module, *args: Any) -> Any:
    """diffusers' ``_gradient_checkpointing_func(block, *args)``, through the replay."""
    return replay_checkpoint(block.__call__, *args, module=block)


@contextlib.contextmanager
def block_checkpointing(unet: nn.Module) -> Iterator[None]:
    """Inside the block, ``unet``'s diffusers blocks are checkpointed through attnpatch's replay
    (``enable_gradient_checkpointing``); their previous settings are restored on exit."""
    saved = [
        (m, m.gradient_checkpointing, getattr(m, "_gradient_checkpointing_func", None))
        for m in unet.modules()
        if hasattr(m, "gradient_checkpointing")
    ]
    if not saved or not getattr(unet, "_supports_gradient_checkpointing", False):
        raise AttnPatchError(
            f"{type(unet).__name__} does not support diffusers' gradient checkpointing, which "
            "memory='low' needs; use memory='balanced'"
        )
    try:
        unet.enable_gradient_checkpointing(gradient_checkpointing_func=_replayed_block)
        yield
    finally:
        for m, flag, func in saved:
            m.gradient_checkpointing = flag
            if func is None:
                m.__dict__.pop("_gradient_checkpointing_func", None)
            else:
                m._gradient_checkpointing_func = func


class CondHalf(AttentionControl):
    """``inner`` sees only the conditional calls of split guidance, numbered as steps.

    With ``split_guidance`` each denoising step is two UNet calls, uncond (even ``cur_step``)
    then cond (odd); ``inner`` is consulted on the cond calls only, with ``cur_step`` = the
    denoising step, so it records ``B`` cond rows per step. The uncond half runs the original
    processors: the same values as the joint call, up to rounding.
    """

    def __init__(self, inner: AttentionControl):
        self.inner = inner
        self.cur_step = 0

    def needs(self, site: AttnSite) -> bool:
        return self.cur_step % 2 == 1 and self.inner.needs(site)

    def __call__(self, probs: torch.Tensor, site: AttnSite) -> torch.Tensor:
        return self.inner(probs, site)

    def step_end(self) -> None:
        if not self.recomputing:
            if self.cur_step % 2 == 1:
                self.inner.step_end()
            self.cur_step += 1

    def reset(self) -> None:
        super().reset()
        self.inner.reset()

    @contextlib.contextmanager
    def replaying(self, step: int) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            if step % 2 == 1:
                stack.enter_context(self.inner.replaying(step // 2))
            stack.enter_context(super().replaying(step))
            yield
