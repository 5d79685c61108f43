"""The model registry: classifiers and diffusion stacks by name.

Classifiers (:func:`load_classifier`) come back wrapped in a
:class:`~attnpatch.models.NormalizedClassifier`: it takes ``(B, 3, H, W)`` RGB in [0, 1],
applies the model's own mean/std normalisation and returns logits ``(B, num_classes)``; it is
frozen (``requires_grad=False``) and stays in eval mode (``train()`` is a no-op), so BatchNorm
statistics never change during an attack.

Specs a classifier can be loaded from:

* a registered name: ``"tiny"`` (a :class:`~attnpatch.testing.TinyClassifier` trained on the
  synthetic shapes in seconds and cached on disk), ``"tiny-b"`` / ``"tiny-c"`` (two other
  architectures trained the same way, for transfer tests: :mod:`.tiny_classifiers`) or anything
  added with :func:`register_classifier`;
* ``"torchvision:<name>"`` / ``"timm:<name>"`` (needs the ``vision`` extra), with an optional
  local weights file;
* an ``nn.Module`` (wrapped as it is, with the ``mean``/``std`` you give).

Diffusion stacks (:func:`load_diffusion`) come back as :class:`~attnpatch.diffusion.DiffusionParts`
(unet, vae, text_encoder, tokenizer, scheduler as a ``DDIMScheduler``, variant, and SDXL's second
text encoder; for SD3 / Flux a ``transformer``, ``unet=None``, their text encoders and a
``FlowMatchEulerDiscreteScheduler``): ``"shapes"`` (a tiny SD trained on the shapes world,
shipped with the package: its attention means something; :mod:`.shapes_sd`), ``"shapes-sd3"``
(its SD3 sibling, a small MMDiT trained on the same world, shipped too; :mod:`.shapes_sd3`),
``"tiny"`` /
``"tiny-sd2"`` / ``"tiny-sdxl"`` / ``"tiny-sd3"`` / ``"tiny-flux"`` (random weights, for fast
tests), a local diffusers model folder, or a name added with :func:`register_diffusion`.

The building blocks live beside this module: :mod:`.classifier` (the wrapper, the probe,
torchvision / timm, weights files), :mod:`.diffusion` (folders, conversion, checks),
:mod:`.tiny` (the tiny SD stacks) and :mod:`.shapes_classifier` (the ``"tiny"`` classifier).

>>> clf = load_classifier("tiny")          # trained on first use (seconds), then cached
>>> clf(torch.rand(2, 3, 32, 32)).shape
torch.Size([2, 5])
>>> load_diffusion("tiny").variant
'sd15'
"""

from __future__ import annotations

import difflib
import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._util import deprecated
from ..diffusion import DiffusionParts, part_dtypes
from ..errors import InputError, ModelError
from . import hub
from .classifier import (
    NormalizedClassifier,
    build_timm,
    build_torchvision,
    load_weights,
    probe_classifier,
)
from .diffusion import as_parts, load_diffusers_folder
from .shapes_classifier import TINY_CLASSIFIERS, tiny_factory
from .shapes_sd import SHAPES_WEIGHTS, load_shapes_sd
from .shapes_sd3 import SHAPES_SD3_WEIGHTS, load_shapes_sd3
from .tiny import tiny_sd
from .tiny_dit import tiny_flux, tiny_sd3

__all__ = [
    "register_classifier",
    "register_diffusion",
    "load_classifier",
    "load_diffusion",
    "classifier_names",
    "diffusion_names",
]


@dataclass
class _ClassifierEntry:
    factory: Callable[..., nn.Module]
    mean: Sequence[float] | None
    std: Sequence[float] | None
    input_size: tuple[int, int] | None
    classes: Sequence[str] | None


_CLASSIFIERS: dict[str, _ClassifierEntry] = {}
_DIFFUSION: dict[str, Callable[..., Any]] = {}


def _check_name(name: str, table: dict[str, Any], overwrite: bool, kind: str) -> None:
    if not isinstance(name, str) or not name or ":" in name:
        raise InputError(
            f"{kind} name must be a non-empty string without ':' (reserved for "
            f"'torchvision:'/'timm:'), got {name!r}"
        )
    if name in table and not overwrite:
        raise InputError(
            f"{kind} {name!r} is already registered; pick another name or pass overwrite=True"
        )


def register_classifier(
    name: str,
    factory: Callable[..., nn.Module] | None = None,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    input_size: int | tuple[int, int] | None = None,
    classes: Sequence[str] | None = None,
    overwrite: bool = False,
):
    """Register ``factory`` so that ``load_classifier(name, **kwargs)`` calls ``factory(**kwargs)``.

    The factory returns an ``nn.Module`` mapping normalised images to logits; ``mean``/``std``
    (its input normalisation, in [0, 1] pixel units; omit both if it normalises itself),
    ``input_size`` (the probe size and :attr:`NormalizedClassifier.input_size`, default 32) and
    ``classes`` describe it. A factory may also return a ready :class:`NormalizedClassifier`,
    which is used as is. Without ``factory`` this returns a decorator.

    >>> @register_classifier("linear-demo", mean=(0.5,) * 3, std=(0.5,) * 3, overwrite=True)
    ... def linear_demo(num_classes=3):
    ...     return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, num_classes))
    >>> load_classifier("linear-demo", num_classes=4)(torch.rand(2, 3, 8, 8)).shape
    torch.Size([2, 4])
    """
    if factory is None:

        def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
            register_classifier(
                name,
                fn,
                mean=mean,
                std=std,
                input_size=input_size,
                classes=classes,
                overwrite=overwrite,
            )
            return fn

        return decorator
    _check_name(name, _CLASSIFIERS, overwrite, "classifier")
    if not callable(factory):
        raise InputError(f"factory for {name!r} must be callable, got {factory!r}")
    if (mean is None) != (std is None):
        raise InputError("give both mean and std to register_classifier, or neither")
    size = (input_size, input_size) if isinstance(input_size, int) else input_size
    _CLASSIFIERS[name] = _ClassifierEntry(factory, mean, std, size, classes)
    return factory


def register_diffusion(
    name: str, factory: Callable[..., Any] | None = None, *, overwrite: bool = False
):
    """Register ``factory`` so that ``load_diffusion(name, **kwargs)`` calls ``factory(**kwargs)``.

    The factory returns a :class:`DiffusionParts` (or any object with the fields ``unet``,
    ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler`` and optionally ``variant``,
    ``text_encoder_2``, ``tokenizer_2``, such as the stacks of :func:`~attnpatch.testing.tiny_sd`). Without
    ``factory`` this returns a decorator.
    """
    if factory is None:

        def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
            register_diffusion(name, fn, overwrite=overwrite)
            return fn

        return decorator
    _check_name(name, _DIFFUSION, overwrite, "diffusion stack")
    if not callable(factory):
        raise InputError(f"factory for {name!r} must be callable, got {factory!r}")
    _DIFFUSION[name] = factory
    return factory


def classifier_names() -> list[str]:
    """Registered classifier names (``torchvision:<name>`` / ``timm:<name>`` come on top)."""
    return sorted(_CLASSIFIERS)


def diffusion_names() -> list[str]:
    """Registered diffusion-stack names (a local model folder path works too)."""
    return sorted(_DIFFUSION)


def _unknown(spec: str, names: list[str], kind: str, extra: str) -> ModelError:
    close = difflib.get_close_matches(spec, names, n=3)
    hint = f" Did you mean {close}?" if close else ""
    return ModelError(
        f"unknown {kind} {spec!r}.{hint} Registered: {names}; {extra}, or register your own with "
        f"register_{'classifier' if kind == 'classifier' else 'diffusion'}(name, factory)"
    )


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_classifier(
    spec: str | nn.Module,
    *,
    weights: str | os.PathLike | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    classes: Sequence[str] | None = None,
    input_size: int | tuple[int, int] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **kwargs: Any,
) -> NormalizedClassifier:
    """Build, wrap, freeze and check a classifier.

    Args:
        spec: a registered name (see :func:`classifier_names`; ``"tiny"`` is built in),
            ``"torchvision:<model>"`` (``torchvision.models.get_model(model, weights=...)``),
            ``"timm:<model>"`` (``timm.create_model(model, **kwargs)``), or an ``nn.Module``.
        weights: a local weights file (``.safetensors``, or a ``torch.save``'d state dict,
            possibly under a ``"state_dict"``/``"model"`` key, ``module.`` prefixes stripped)
            loaded with ``strict=True``. For torchvision, a weights *name* such as
            ``"IMAGENET1K_V2"`` or ``"DEFAULT"`` is used only when its file is already in
            ``$TORCH_HOME/hub/checkpoints/`` (nothing is ever downloaded: otherwise the error
            gives the URL and the path to put the file at). timm's ``pretrained=True`` needs
            ``pretrained_cfg_overlay=dict(file=...)``, a local file (docs/models.md).
        mean, std: override the normalisation (default: the registration's; ImageNet's for
            torchvision; ``timm.data.resolve_model_data_config``'s for timm; none for an
            ``nn.Module``).
        classes: class names in logit order (checked against the output width).
        input_size: the probe size ``(H, W)`` (default: the model's known size, else 224 for
            torchvision/timm, 32 otherwise).
        device, dtype: where the wrapper goes (default: where the factory left it).
        **kwargs: passed to the factory (``"tiny*"``: ``config``, ``seed``, ``cache`` of
            :func:`~attnpatch.models.shapes_classifier.tiny_factory`; torchvision/timm: their
            model kwargs, e.g. ``num_classes``).

    Returns:
        A frozen :class:`NormalizedClassifier` in eval mode. It was run once on a probe batch
        ``(2, 3, H, W)`` of gray images: anything but logits ``(2, C)`` (a tuple, a
        ``ModelOutput``, a wrong batch size, a width different from ``len(classes)``) raises
        :class:`~attnpatch.errors.ModelError` here, before any training.
    """
    size = (input_size, input_size) if isinstance(input_size, int) else input_size
    normalised = False  # whether mean/std were applied while wrapping
    if isinstance(spec, NormalizedClassifier):
        wrapper = spec
    elif isinstance(spec, nn.Module):
        wrapper = NormalizedClassifier(spec, mean, std, classes=classes, name=type(spec).__name__)
        normalised = True
    elif not isinstance(spec, str):
        raise InputError(
            f"classifier spec must be a name, 'torchvision:<model>', 'timm:<model>' or an "
            f"nn.Module, got {type(spec).__name__}"
        )
    elif spec.startswith("torchvision:"):
        wrapper = build_torchvision(spec, weights, kwargs)
        weights = None
    elif spec.startswith("timm:"):
        wrapper = build_timm(spec, kwargs)
    elif spec in _CLASSIFIERS:
        entry = _CLASSIFIERS[spec]
        built = entry.factory(**kwargs)
        if isinstance(built, NormalizedClassifier):
            wrapper = built
        elif isinstance(built, nn.Module):
            wrapper = NormalizedClassifier(
                built, entry.mean, entry.std, classes=entry.classes, input_size=entry.input_size
            )
        else:
            raise ModelError(
                f"the factory registered as {spec!r} returned {type(built).__name__}, not an "
                "nn.Module; make it return the model"
            )
    else:
        raise _unknown(
            spec, classifier_names(), "classifier", "or use 'torchvision:<model>', 'timm:<model>'"
        )
    wrapper.name = wrapper.name or (spec if isinstance(spec, str) else None)
    if weights is not None:
        load_weights(wrapper.model, weights)
    if not normalised and (mean is not None or std is not None):
        wrapper = NormalizedClassifier(
            wrapper.model,
            mean,
            std,
            classes=wrapper.classes,
            input_size=wrapper.input_size,
            name=wrapper.name,
            info=wrapper.info,
        )
    if classes is not None:
        wrapper.classes = [str(c) for c in classes]
        wrapper.num_classes = len(wrapper.classes)
    if size is not None:
        wrapper.input_size = tuple(size)
    wrapper.model.requires_grad_(False)
    wrapper.eval()
    if device is not None or dtype is not None:
        wrapper.to(device=device, dtype=dtype)
    wrapper.num_classes = probe_classifier(
        wrapper,
        wrapper.input_size or (32, 32),
        name=spec if isinstance(spec, str) else type(spec).__name__,
        classes=wrapper.classes,
    )
    return wrapper


def load_diffusion(
    spec: str | os.PathLike | Any,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    torch_dtype: torch.dtype | str | None = None,
    **kwargs: Any,
) -> DiffusionParts:
    """Build or load a Stable Diffusion stack; every network frozen and in eval mode.

    Args:
        spec: a registered name (``"shapes"``, ``"tiny"`` = ``"tiny-sd15"``, ``"tiny-sd2"``,
            ``"tiny-sdxl"``, ``"tiny-sd3"``, ``"tiny-flux"``, or yours), a local diffusers model
            folder (SD1.x / 2.x / XL, SD3 / SD3.5, Flux; see :func:`load_diffusers_folder`), a
            Hugging Face hub id as diffusers takes it (``"org/name"``, ``"org/name@revision"``:
            read from the HF cache, downloaded when online and missing; :mod:`.hub`), or a
            ``DiffusionParts``-like object.
        device, dtype: where the networks go (``dtype`` is also the loading dtype of folders;
            deprecated: it warns, and goes in attnpatch 0.3.0: pass ``torch_dtype``).
        torch_dtype: half precision done right: ``torch.float16`` / ``torch.bfloat16`` (or
            their names; ``float32`` the default). Folders load each part in its dtype through
            diffusers' / transformers' own ``torch_dtype`` loading; built stacks (registered
            names, objects) are cast once. Per part (:func:`attnpatch.diffusion.part_dtypes`):
            the UNet and the text encoder(s) in ``torch_dtype``, the VAE in float32 under
            float16 (the SD VAE overflows in float16), in bfloat16 under bfloat16. The
            attention pipeline then keeps its loop, the stored maps and the images in float32.
        **kwargs: passed to a registered factory (the tiny ones take ``seed``). Folders and hub
            ids take ``variant`` (diffusers' weights variant, ``"fp16"``), and hub ids
            ``revision`` and ``local_files_only`` (default: ``HF_HUB_OFFLINE``).

    Checks that the text encoder width(s) fit the network (the UNet's
    ``cross_attention_dim``; the transformer's ``joint_attention_dim`` and
    ``pooled_projection_dim``) and converts the scheduler to ``DDIMScheduler`` (UNet stacks) or
    ``FlowMatchEulerDiscreteScheduler`` (SD3 / Flux stacks: ``"tiny-sd3"``, ``"tiny-flux"``,
    their folders; ``parts.transformer`` holds the network and ``parts.unet`` is ``None``).
    """
    if dtype is not None:
        deprecated(
            "load_diffusion(dtype=...)",
            "load_diffusion(torch_dtype=...) (half precision per part), or parts.to(dtype) "
            "after loading (one cast of everything)",
        )
    if torch_dtype is not None and dtype is not None:
        raise InputError(
            "pass torch_dtype= (per-part half precision) or dtype= (one cast of everything), "
            "not both"
        )
    per_part = None if torch_dtype is None else part_dtypes(torch_dtype)  # checks it first
    if isinstance(spec, (str, os.PathLike)) and str(spec) in _DIFFUSION:
        if kwargs.get("variant") is not None:  # not the factory's: diffusers' weights variant
            raise ModelError(
                f"variant={kwargs['variant']!r} picks the weights files of a model folder or hub "
                f"id; {str(spec)!r} is a registered stack built in code: leave variant unset"
            )
        kwargs.pop("variant", None)
        parts = as_parts(_DIFFUSION[str(spec)](**kwargs), spec)
    elif isinstance(spec, (str, os.PathLike)):
        path = Path(spec).expanduser()
        hub_kw = {k: kwargs.pop(k) for k in ("revision", "local_files_only") if k in kwargs}
        variant = kwargs.pop("variant", None)
        if not path.exists() and hub.parse_hub_id(str(spec)) is not None:
            repo, revision = hub.parse_hub_id(str(spec))
            revision = hub_kw.pop("revision", None) or revision
            path = hub.diffusion_snapshot(repo, revision, variant=variant, **hub_kw)
        if path.exists():
            if kwargs:
                raise InputError(
                    f"unexpected arguments {sorted(kwargs)} for a model folder; folders and hub "
                    "ids take device=, dtype=, torch_dtype=, variant=, revision= and "
                    "local_files_only= only"
                )
            folder = load_diffusers_folder(
                path, dtype=dtype, torch_dtype=torch_dtype, variant=variant
            )
            parts = as_parts(folder, str(spec))
            per_part = None  # loaded in their dtypes
        else:
            extra = "or pass the path of an existing local diffusers model folder or a hub id"
            raise _unknown(str(spec), diffusion_names(), "diffusion stack", extra)
    else:
        parts = as_parts(spec, type(spec).__name__)
    if device is not None or dtype is not None:
        parts.to(device=device, dtype=dtype)
    if per_part is not None:
        # nn.Module.to: diffusers' own .to() warns to load with torch_dtype instead, which a
        # stack built in code cannot do (and none of these parts has fp32-only modules)
        for module in parts.text_encoders:
            nn.Module.to(module, per_part["text_encoder"])
        nn.Module.to(parts.denoiser, per_part["unet"])
        nn.Module.to(parts.vae, per_part["vae"])
    return parts


# --------------------------------------------------------------------------------------------
# The built-in names
# --------------------------------------------------------------------------------------------


def _tiny_diffusion(variant: str) -> Callable[..., DiffusionParts]:
    def factory(seed: int = 0) -> DiffusionParts:
        return tiny_sd(variant, seed)

    factory.__doc__ = f"The tiny offline {variant} stack of attnpatch.testing.tiny_sd."
    return factory


def _shapes_diffusion() -> DiffusionParts:
    """The tiny SD trained on the shapes world, from the weights shipped in the package."""
    if not (SHAPES_WEIGHTS / "unet" / "config.json").is_file():
        raise ModelError(
            f"the shipped 'shapes' weights are missing from {SHAPES_WEIGHTS}; reinstall "
            "attnpatch, or rebuild them with python -m attnpatch.models.train_shapes --out DIR "
            "and load DIR"
        )
    return load_shapes_sd()


def _shapes_sd3_diffusion() -> DiffusionParts:
    """The tiny SD3 trained on the shapes world, from the weights shipped in the package."""
    if not (SHAPES_SD3_WEIGHTS / "transformer" / "config.json").is_file():
        raise ModelError(
            f"the shipped 'shapes-sd3' weights are missing from {SHAPES_SD3_WEIGHTS}; reinstall "
            "attnpatch, or rebuild them with python -m attnpatch.models.train_shapes_sd3 --out "
            "DIR and load DIR"
        )
    return load_shapes_sd3()


register_classifier("tiny", tiny_factory)
for _arch in TINY_CLASSIFIERS[1:]:  # "tiny-b", "tiny-c": other architectures, same recipe
    register_classifier(_arch, functools.partial(tiny_factory, arch=_arch))
register_diffusion("shapes", _shapes_diffusion)
register_diffusion("shapes-sd3", _shapes_sd3_diffusion)
register_diffusion("tiny", _tiny_diffusion("sd15"))
register_diffusion("tiny-sd15", _tiny_diffusion("sd15"))
register_diffusion("tiny-sd2", _tiny_diffusion("sd2"))
register_diffusion("tiny-sdxl", _tiny_diffusion("sdxl"))
register_diffusion("tiny-sd3", tiny_sd3)
register_diffusion("tiny-flux", tiny_flux)
