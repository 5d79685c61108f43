"""Model class -> family, and each model's attention layers found once.

``register_family(family)`` maps the class names in ``family.model_classes`` (matched along the
model's MRO, so subclasses are served too) to the family, in the style of timm's
``register_model``. ``family_of(model)`` looks a model up (cached per class);
``attention_layers(model)`` walks the module tree once per model and caches the result until a
module is registered anywhere in the process (torch's global module-registration hook: a
``setattr`` of a module, ``add_module``, ``ModuleList`` / ``Sequential`` changes, an
``nn.Module`` processor set or restored). Entering ``hijack`` therefore costs no tree walk.
Deleting a submodule (``del model.blocks[3]``) fires no hook: call :func:`forget` after such
surgery (the next registration anywhere also refreshes the cache).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook

from ..errors import ModelError
from .base import AttnLayer, Family

__all__ = [
    "register_family",
    "family_of",
    "get_family",
    "family_names",
    "all_places",
    "family_for_processor",
    "attention_layers",
    "checkpointable_blocks",
    "forget",
    "predict",
    "unregister_family",
]

_FAMILIES: dict[str, Family] = {}
_BY_CLASS: dict[str, Family] = {}
_BY_TYPE: dict[type, Family | None] = {}


def register_family(family: Family, *, replace: bool = False) -> Family:
    """Register ``family`` (an instance) for the model classes named in its
    ``model_classes``; returns it. A name or class already taken is refused unless
    ``replace=True``.

    >>> from attnpatch.families import Family, get_family
    >>> class Mine(Family):
    ...     name, places, model_classes = "mine", ("stage",), ("MyTransformer",)
    >>> register_family(Mine())
    <Mine 'mine' (MyTransformer)>
    >>> get_family("mine").places
    ('stage',)
    >>> _ = unregister_family("mine")  # (tests keep the registry as they found it)
    """
    if not isinstance(family, Family):
        raise ModelError(f"register_family takes a Family instance, got {type(family).__name__}")
    if not replace:
        if family.name in _FAMILIES:
            raise ModelError(f"a model family named {family.name!r} is already registered")
        taken = [c for c in family.model_classes if c in _BY_CLASS]
        if taken:
            raise ModelError(
                f"model class(es) {taken} already belong to family "
                f"{_BY_CLASS[taken[0]].name!r}; pass replace=True to take them over"
            )
    _FAMILIES[family.name] = family
    for cls in family.model_classes:
        _BY_CLASS[cls] = family
    _BY_TYPE.clear()
    return family


def unregister_family(name: str) -> Family:
    """Remove a registered family (for tests and experiments); returns it."""
    family = _FAMILIES.pop(name)
    for cls in [c for c, f in _BY_CLASS.items() if f is family]:
        del _BY_CLASS[cls]
    _BY_TYPE.clear()
    return family


def get_family(name: str) -> Family:
    """The family registered as ``name`` (``"unet"``, ``"sd3"``, ``"flux"``, ...)."""
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ModelError(f"no model family {name!r}; registered: {sorted(_FAMILIES)}") from None


def family_names() -> tuple[str, ...]:
    """Names of the registered families, in registration order."""
    return tuple(_FAMILIES)


def all_places() -> tuple[str, ...]:
    """Every place name of the registered families (``"down"``, ``"mid"``, ``"up"``,
    ``"joint"``, ``"single"``, ...), without repeats."""
    return tuple(dict.fromkeys(p for f in _FAMILIES.values() for p in f.places))


def _by_type(cls: type) -> Family | None:
    if cls not in _BY_TYPE:
        _BY_TYPE[cls] = next(
            (_BY_CLASS[c.__name__] for c in cls.__mro__ if c.__name__ in _BY_CLASS), None
        )
    return _BY_TYPE[cls]


def family_for_processor(processor: object) -> Family | None:
    """The family whose maths reproduces ``processor`` (``None``: none does)."""
    for family in _FAMILIES.values():
        if family.reproduces(processor):
            return family
    return None


def family_of(model: nn.Module, *, strict: bool = False) -> Family:
    """The family of ``model``: by its class (or a base class); for a model no family names
    (a block, a custom model), by the processor of its first attention layer, else the UNet
    family (whose rules are diffusers' ``Attention`` defaults). ``strict=True`` refuses a
    model whose class no family names, with the registered ones in the message.

    >>> from attnpatch.testing import tiny_unet
    >>> family_of(tiny_unet()).name
    'unet'
    """
    family = _by_type(type(model))
    if family is not None:
        return family
    if strict:
        known = sorted(c for c in _BY_CLASS)
        raise ModelError(
            f"no attnpatch model family serves {type(model).__name__}; known model classes: "
            f"{known}. Add one with attnpatch.families.register_family (docs/architecture.md)"
        )
    return _index(model).family


def _base(processor: object) -> object:
    while hasattr(processor, "original") and hasattr(processor, "controller"):
        processor = processor.original
    return processor


def predict(
    model: nn.Module,
    latents: torch.Tensor,
    timestep: torch.Tensor | float,
    cond: torch.Tensor,
    pooled: torch.Tensor | None = None,
    *,
    guidance: float | torch.Tensor | None = None,
    added_cond: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``family_of(model).predict(model, ...)``: the model's output ``(B, C, h, w)`` for
    ``latents`` ``(B, C, h, w)`` in the VAE's scaled layout at ``timestep`` (the scheduler's
    units); see :meth:`Family.predict`."""
    return family_of(model, strict=True).predict(
        model, latents, timestep, cond, pooled, guidance=guidance, added_cond=added_cond
    )


# ----------------------------------------------------------------------------- the cache

#: bumped whenever any module registers a submodule anywhere in the process
_generation = [0]


def _bump(module: nn.Module, name: str, submodule: nn.Module | None) -> None:
    _generation[0] += 1


register_module_module_registration_hook(_bump)


@dataclass(frozen=True)
class _Index:
    generation: int
    family: Family
    layers: tuple[AttnLayer, ...]
    blocks: tuple[nn.Module, ...]


_INDEX: dict[int, _Index] = {}


def forget(model: nn.Module) -> None:
    """Drop ``model``'s cached layers (after deleting submodules, which fires no hook)."""
    _INDEX.pop(id(model), None)


def _index(model: nn.Module) -> _Index:
    key = id(model)
    found = _INDEX.get(key)
    if found is not None and found.generation == _generation[0]:
        return found
    found_modules, blocks = [], []
    for name, sub in model.named_modules():  # one traversal for both lists
        if hasattr(sub, "set_processor") and hasattr(sub, "processor"):
            found_modules.append((name, sub))
        if hasattr(sub, "gradient_checkpointing"):
            blocks.append(sub)
    family = _by_type(type(model))
    if family is None and found_modules:
        family = family_for_processor(_base(found_modules[0][1].processor))
    family = family or _FAMILIES["unet"]
    layers = tuple(AttnLayer(name, sub, *family.place(name)) for name, sub in found_modules)
    index = _Index(_generation[0], family, layers, tuple(blocks))
    if found is None:
        weakref.finalize(model, _INDEX.pop, key, None)
    _INDEX[key] = index
    return index


def attention_layers(model: nn.Module) -> tuple[AttnLayer, ...]:
    """Every attention module of ``model`` (anything with ``processor`` and
    ``set_processor``), in module order, with its place and block; cached (see the module
    docstring)."""
    return _index(model).layers


def checkpointable_blocks(model: nn.Module) -> tuple[nn.Module, ...]:
    """The modules of ``model`` diffusers can checkpoint (they have ``gradient_checkpointing``),
    in module order; cached with :func:`attention_layers`."""
    return _index(model).blocks
