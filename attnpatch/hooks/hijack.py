"""``with hijack(unet, controller):`` — install controlled processors, always restore the
originals — and the checkpoint replay that keeps gradients right when backward runs later.

**Checkpoint replay** (the whole mechanism lives in this module). Activation checkpointing
re-runs a forward function during backward. By then the hijack may have exited (the processors
are the originals again) and the controller has moved on (its step advanced), so a plain
recompute would run other code than the forward did, record maps twice and edit with the wrong
step. attnpatch's recomputes go through torch's public ``context_fn`` hook instead:

* at forward time :func:`checkpoint` snapshots every attention module's processor and, for each
  hijack whose processors are installed, the controller's step and what the model call fixed
  (latent size, token grid, text length);
* around the recompute it re-installs those processors and enters
  ``controller.replaying(step)`` (observers record nothing, editors edit as in the forward),
  then puts back whatever was installed.

:func:`checkpoint` serves ``ddim_invert`` / ``ddim_denoise(..., checkpoint=True)``. diffusers'
own block checkpointing (``unet.enable_gradient_checkpointing()`` before entering the hijack)
is routed through the same replay while the block is active, by swapping the blocks' private
``_gradient_checkpointing_func`` and swapping it back on exit. Block checkpoints may nest inside
a :func:`checkpoint` (``memory="low"``): the replay of the outer call also re-installs the
blocks' checkpointing as the forward had it, so the inner recomputes replay too. A recompute
that bypasses the replay (a ``torch.utils.checkpoint`` around a UNet call that attnpatch does
not manage) is refused with an error, detected through torch's private
``torch._C._current_graph_task_id()``.
Those two private attributes are used here only, and tests pin both.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

from ..errors import HookError, InputError, ModelError
from ..families import attention_layers, checkpointable_blocks, family_of
from .controllers import AttentionControl
from .processor import ControlledAttnProcessor, ControlledRotaryProcessor, HijackState

__all__ = ["hijack", "is_hijacked", "checkpoint", "attention_modules", "in_backward"]

C = TypeVar("C", bound=AttentionControl)


def attention_modules(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(path, module)`` for every diffusers attention module (anything with a processor);
    found once per model and cached (:func:`attnpatch.families.attention_layers`)."""
    for layer in attention_layers(module):
        yield layer.name, layer.module


@contextlib.contextmanager
def hijack(unet: nn.Module, controller: C) -> Iterator[C]:
    """Let ``controller`` read and edit every attention layer of ``unet`` inside the block.

    ``unet`` is the denoising model: a ``UNet2DConditionModel``, an ``SD3Transformer2DModel``
    or a ``FluxTransformer2DModel`` (any model of a registered family, see
    :mod:`attnpatch.families`; the family says where its layers sit and which tokens are image
    and which text). Its attention modules are found once per model (cached), so entering and
    leaving a block costs no walk of the module tree.

    On entry it snapshots each attention module's processor object and installs a
    :class:`~attnpatch.hooks.ControlledAttnProcessor` module by module; it also registers model
    forward hooks that record what each call fixes (latent size, token grid, text length) and
    advance ``controller.cur_step`` after each call. In ``finally`` — on normal exit, on any exception, on KeyboardInterrupt, and when
    installation fails halfway — it removes the hooks and puts back the very same processor
    objects. Nested hijacks on one UNet stack: the inner one chains to the outer one's
    processors and restores them on exit.

    Gradient checkpointing (see the module docstring): UNet calls under :func:`checkpoint`, and
    blocks of a UNet whose ``enable_gradient_checkpointing()`` was called before entering,
    recompute with these processors and the controller's step replayed, even after the block
    has exited, so maps are recorded once and gradients equal those without checkpointing.

    The controller is not reset on entry: call ``controller.reset()`` when you start a new run.

    Args:
        unet: a diffusers model with attention modules (``UNet2DConditionModel``,
            ``SD3Transformer2DModel``, ``FluxTransformer2DModel``, or any model whose attention
            layers have ``set_processor``: diffusers' ``Attention`` rules then apply).
        controller: an :class:`~attnpatch.AttentionControl`.

    Yields:
        ``controller``, so ``with hijack(unet, AttentionStore()) as store:`` works.
    """
    if not isinstance(controller, AttentionControl):
        raise InputError(
            f"hijack needs an attnpatch.AttentionControl (e.g. AttentionStore()), got "
            f"{type(controller).__name__}"
        )
    if not isinstance(unet, nn.Module):
        inner = getattr(unet, "transformer", None) or getattr(unet, "unet", None)
        attr = "transformer" if getattr(unet, "transformer", None) is not None else "unet"
        hint = f"pass its .{attr}" if isinstance(inner, nn.Module) else "pass a diffusers model"
        raise InputError(
            f"hijack needs the denoising model (an nn.Module such as pipe.unet, "
            f"pipe.transformer or parts.unet), got a {type(unet).__name__}; {hint}"
        )
    family = family_of(unet)
    layers = attention_layers(unet)  # found once per model (cached)
    blocks = checkpointable_blocks(unet)  # modules diffusers can checkpoint
    if not layers:
        raise ModelError(
            f"{type(unet).__name__} has no attention modules with set_processor(); pass the "
            "model (pipe.unet, pipe.transformer), not the pipeline"
        )
    for layer in layers:
        if id(controller) in _controllers_of(layer.module.processor):
            raise HookError(
                f"this controller already hijacks {layer.name}; nesting hijack with the same "
                "controller would count every step twice: use one block, or a second controller"
            )
    state = HijackState(controller, family, unet)
    kind = ControlledRotaryProcessor if family.convention == "rotary" else ControlledAttnProcessor
    installed: list[tuple[nn.Module, Any]] = []
    handles: list[Any] = []
    swapped: list[tuple[nn.Module, Any]] = []
    try:
        for layer in layers:
            module = layer.module
            original = module.processor
            module.set_processor(
                kind(
                    controller,
                    name=layer.name,
                    original=original,
                    state=state,
                    family=family,
                    place=(layer.place, layer.block),
                )
            )
            installed.append((module, original))
        for block in blocks:
            if block.gradient_checkpointing:
                swapped.append((block, block._gradient_checkpointing_func))
                block._gradient_checkpointing_func = _replaying_checkpoint
        unswapped = [b for b in blocks if not b.gradient_checkpointing]
        handles.append(
            unet.register_forward_pre_hook(_before_call(state, unswapped), with_kwargs=True)
        )
        handles.append(unet.register_forward_hook(_after_call(controller)))
        yield controller
    finally:
        errors: list[BaseException] = []
        for handle in handles:
            handle.remove()
        for block, func in reversed(swapped):
            block._gradient_checkpointing_func = func
        for module, original in reversed(installed):
            try:
                module.set_processor(original)
            except BaseException as e:  # keep restoring the others
                errors.append(e)
        if errors:
            raise errors[0]


def is_hijacked(unet: nn.Module) -> bool:
    """True if any attention layer of ``unet`` runs a controlled processor."""
    return any(
        isinstance(layer.module.processor, ControlledAttnProcessor)
        for layer in attention_layers(unet)
    )


def _chain(processor: Any) -> Iterator[ControlledAttnProcessor]:
    """A controlled processor and those of the enclosing hijacks it chains to."""
    while isinstance(processor, ControlledAttnProcessor):
        yield processor
        processor = processor.original


def _controllers_of(processor: Any) -> set[int]:
    return {id(p.controller) for p in _chain(processor)}


def in_backward() -> bool:
    """True while the autograd engine runs a backward pass on this thread.

    During a non-reentrant checkpoint recompute this is how code can tell that it is being
    re-run rather than run. It reads ``torch._C._current_graph_task_id()`` (the id of the
    running graph task, -1 outside backward), which torch's own checkpoint code uses; a test
    pins its behaviour so an upstream change is caught.
    """
    return torch._C._current_graph_task_id() != -1


def _before_call(state: HijackState, unswapped: list[nn.Module]):
    """The model pre-hook: record what the call fixes (latent size, token grid, text length:
    the family reads them); refuse recomputes the replay does not manage."""
    call_info = state.family.call_info

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if in_backward() and not getattr(_replays, "depth", 0):
            raise HookError(
                "a model call under hijack is being recomputed during backward by a checkpoint "
                "attnpatch does not manage, so its controller cannot replay the right step. Use "
                "ddim_denoise(..., checkpoint=True), unet.enable_gradient_checkpointing() before "
                "entering hijack, or attnpatch.hooks.checkpoint(fn, ..., module=unet)"
            )
        replaying = getattr(_replays, "depth", 0) > 0  # the replay sets the forward's blocks
        if (
            torch.is_grad_enabled()
            and not replaying
            and any(b.gradient_checkpointing for b in unswapped)
        ):
            raise HookError(
                "unet.enable_gradient_checkpointing() was called inside `with hijack(...)`, so "
                "its recomputes would bypass the controller's replay; call it before entering "
                "the block"
            )
        state.call = call_info(module, args, kwargs)

    return hook


def _after_call(controller: AttentionControl):
    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        controller.step_end()

    return hook


# ----------------------------------------------------------------------------- replay


#: How many replays are active on this thread (a recompute runs on the thread that runs the
#: backward node, and so do the replay's enter, the UNet's hooks and the replay's exit).
_replays = threading.local()


class _Replay:
    """Re-installs forward-time processors and replays hijack states around a recompute."""

    def __init__(self, module: nn.Module):
        # the attention modules of ``module`` (found once per model: the cached index)
        self.processors = [
            (layer.module, layer.module.processor) for layer in attention_layers(module)
        ]
        # diffusers blocks checkpointed inside ``module`` (memory="low" nests them in a
        # checkpointed UNet call): the recompute must route them through the replay as the
        # forward did, even after the hijack (which swapped their function) has exited.
        self.blocks = [
            (sub, sub._gradient_checkpointing_func)
            for sub in checkpointable_blocks(module)
            if getattr(sub, "gradient_checkpointing", False) is True
        ]
        states: dict[int, HijackState] = {}
        for _, proc in self.processors:
            for p in _chain(proc):
                states.setdefault(id(p.state), p.state)
        self.states = [(s, s.controller.cur_step, s.call) for s in states.values()]
        self.module = module
        self._stack: contextlib.ExitStack | None = None

    def _record_calls(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """While recomputing a whole model call, what the call fixes (latent size, token grid,
        text length) is read from its arguments, as the hijack's pre-hook did in the forward
        pass (the snapshot above predates the call; the hijack may have exited)."""
        for state, _, _ in self.states:
            if state.model is module:
                state.call = state.family.call_info(module, args, kwargs)

    def __enter__(self) -> _Replay:
        stack = contextlib.ExitStack()
        try:
            for module, proc in self.processors:
                current = module.processor
                if current is not proc:
                    module.set_processor(proc)
                    stack.callback(module.set_processor, current)
            for block, func in self.blocks:
                stack.callback(setattr, block, "_gradient_checkpointing_func", _block_func(block))
                stack.callback(
                    setattr, block, "gradient_checkpointing", block.gradient_checkpointing
                )
                block._gradient_checkpointing_func = func
                block.gradient_checkpointing = True
            for state, step, call in self.states:
                stack.callback(setattr, state, "call", state.call)
                state.call = call
                stack.enter_context(state.controller.replaying(step))
            if any(state.model is self.module for state, _, _ in self.states):
                handle = self.module.register_forward_pre_hook(self._record_calls, with_kwargs=True)
                stack.callback(handle.remove)
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        _replays.depth = getattr(_replays, "depth", 0) + 1
        return self

    def __exit__(self, *exc: object) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            _replays.depth -= 1
            stack.close()


def checkpoint(fn: Callable[..., Any], *args: Any, module: nn.Module, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` under non-reentrant activation checkpointing, replay-safe.

    ``module`` is the model whose attention processors must be the same in the recompute as in
    the forward pass (usually the UNet that ``fn`` calls); any hijack active at forward time is
    replayed (see the module docstring). Values and gradients equal those of a plain call;
    memory holds only ``fn``'s inputs and outputs until backward.
    """

    def context_fn() -> tuple[Any, Any]:
        return contextlib.nullcontext(), _Replay(module)

    return _torch_checkpoint(fn, *args, use_reentrant=False, context_fn=context_fn, **kwargs)


def _block_func(block: nn.Module) -> Any:
    return getattr(block, "_gradient_checkpointing_func", None)


def _replaying_checkpoint(block: nn.Module, *args: Any) -> Any:
    """diffusers' ``_gradient_checkpointing_func(block, *args)``, with the replay."""
    return checkpoint(block.__call__, *args, module=block)
