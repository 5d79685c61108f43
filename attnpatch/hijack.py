"""``with hijack(unet, controller):`` — install controlled processors, always restore the originals."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, TypeVar

from torch import nn
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

from .controllers.base import AttentionControl
from .errors import AttnPatchError
from .processor import ControlledAttnProcessor, HijackState
from .recompute import attention_modules, checkpoint_context_fn

__all__ = ["hijack", "is_hijacked"]

C = TypeVar("C", bound=AttentionControl)


@contextlib.contextmanager
def hijack(unet: nn.Module, controller: C) -> Iterator[C]:
    """Let ``controller`` read and edit every attention layer of ``unet`` inside the block.

    On entry it snapshots each attention module's processor object and installs a
    :class:`~attnpatch.processor.ControlledAttnProcessor` module by module; it also registers
    UNet forward hooks that record each call's latent size and advance ``controller.cur_step``
    after each call. In ``finally`` — on normal exit, on any exception, on KeyboardInterrupt,
    and when installation fails halfway — it removes the hooks and puts back the very same
    processor objects. Nested hijacks on one UNet stack: the inner one chains to the outer
    one's processors and restores them on exit.

    Gradient checkpointing: while the block is active, modules with diffusers' gradient
    checkpointing enabled recompute under a context that re-installs these processors and
    replays the controller's step, so a recompute during backward — even after the block has
    exited, as in ``with hijack(...): out = denoise(...)`` then ``loss.backward()`` — neither
    records maps twice nor advances the step, and gives the same gradients as no checkpointing.

    The controller is not reset on entry: call ``controller.reset()`` when you start a new run.

    Args:
        unet: a diffusers model with attention modules (``UNet2DConditionModel``, or any model
            whose attention layers have ``set_processor``).
        controller: an :class:`~attnpatch.AttentionControl`.

    Yields:
        ``controller``, so ``with hijack(unet, AttentionStore()) as store:`` works.
    """
    if not isinstance(controller, AttentionControl):
        raise AttnPatchError(
            f"hijack needs an attnpatch.AttentionControl (e.g. AttentionStore()), got "
            f"{type(controller).__name__}"
        )
    modules: list[tuple[str, nn.Module]] = []
    checkpointed: list[nn.Module] = []
    for name, module in unet.named_modules():  # one traversal for both lists
        if hasattr(module, "set_processor") and hasattr(module, "processor"):
            modules.append((name, module))
        if getattr(module, "gradient_checkpointing", False) and hasattr(
            module, "_gradient_checkpointing_func"
        ):
            checkpointed.append(module)
    if not modules:
        raise AttnPatchError(
            f"{type(unet).__name__} has no attention modules with set_processor(); pass the UNet "
            "(pipe.unet), not the pipeline"
        )
    for name, module in modules:
        if _controllers_of(module.processor) & {id(controller)}:
            raise AttnPatchError(
                f"this controller already hijacks {name}; nesting hijack with the same controller "
                "would count every step twice: use one block, or a second controller"
            )
    state = HijackState(controller)
    installed: list[tuple[nn.Module, Any]] = []
    handles: list[Any] = []
    swapped: list[tuple[nn.Module, Any]] = []
    try:
        for name, module in modules:
            original = module.processor
            module.set_processor(
                ControlledAttnProcessor(controller, name=name, original=original, state=state)
            )
            installed.append((module, original))
        handles.append(unet.register_forward_pre_hook(_record_latent(state), with_kwargs=True))
        handles.append(unet.register_forward_hook(_end_step(controller), always_call=False))
        for module in checkpointed:
            swapped.append((module, module._gradient_checkpointing_func))
            module._gradient_checkpointing_func = _replaying_checkpoint
        yield controller
    finally:
        errors: list[BaseException] = []
        for handle in handles:
            handle.remove()
        for module, func in reversed(swapped):
            module._gradient_checkpointing_func = func
        for module, original in reversed(installed):
            try:
                module.set_processor(original)
            except BaseException as e:  # keep restoring the others
                errors.append(e)
        if errors:
            raise errors[0]


def is_hijacked(unet: nn.Module) -> bool:
    """True if any attention layer of ``unet`` runs a controlled processor."""
    return any(isinstance(m.processor, ControlledAttnProcessor) for _, m in attention_modules(unet))


def _controllers_of(processor: Any) -> set[int]:
    ids = set()
    while isinstance(processor, ControlledAttnProcessor):
        ids.add(id(processor.controller))
        processor = processor.original
    return ids


def _replaying_checkpoint(module: nn.Module, *args: Any) -> Any:
    """diffusers' gradient-checkpointing function, with a recompute that replays the hijack."""
    return _torch_checkpoint(
        module.__call__, *args, use_reentrant=False, context_fn=checkpoint_context_fn(module)
    )


def _record_latent(state: HijackState):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs.get("sample")
        if sample is not None and getattr(sample, "ndim", 0) == 4:
            state.latent_hw = (int(sample.shape[-2]), int(sample.shape[-1]))

    return hook


def _end_step(controller: AttentionControl):
    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        controller.step_end()

    return hook
