"""The model registry: classifiers and diffusion stacks by name.

Classifiers (:func:`load_classifier`) come back wrapped in a :class:`NormalizedClassifier`:
it takes ``(B, 3, H, W)`` RGB in [0, 1], applies the model's own mean/std normalisation and
returns logits ``(B, num_classes)``; it is frozen (``requires_grad=False``) and stays in eval
mode (``train()`` is a no-op), so BatchNorm statistics never change during an attack.

Specs a classifier can be loaded from:

* a registered name: ``"tiny"`` (a :class:`~attnpatch.testing.TinyClassifier` trained on the
  synthetic shapes in seconds and cached on disk) or anything added with
  :func:`register_classifier`;
* ``"torchvision:<name>"`` / ``"timm:<name>"`` (needs the ``vision`` extra), with an optional
  local weights file;
* an ``nn.Module`` (wrapped as it is, with the ``mean``/``std`` you give).

Diffusion stacks (:func:`load_diffusion`) come back as :class:`DiffusionParts` (unet, vae,
text_encoder, tokenizer, scheduler as a ``DDIMScheduler``, variant, and SDXL's second text
encoder): ``"tiny"`` / ``"tiny-sd2"`` / ``"tiny-sdxl"``, a local diffusers model folder, or a
name added with :func:`register_diffusion`.

>>> clf = load_classifier("tiny")          # trained on first use (seconds), then cached
>>> clf(torch.rand(2, 3, 32, 32)).shape
torch.Size([2, 5])
>>> load_diffusion("tiny").variant
'sd15'
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._util import one_thread as _one_thread
from ..data import ShapesConfig, shapes_dataset
from ..diffusion import DiffusionParts
from ..errors import AttnPatchError
from ..images import check_image

__all__ = [
    "NormalizedClassifier",
    "DiffusionParts",
    "register_classifier",
    "register_diffusion",
    "load_classifier",
    "load_diffusion",
    "classifier_names",
    "diffusion_names",
    "load_diffusers_folder",
    "train_tiny_classifier",
    "tiny_classifier_path",
    "cache_dir",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TINY_CLASSIFIER_VERSION",
]

#: torchvision's (and most timm models') ImageNet normalisation.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------
# The classifier wrapper
# --------------------------------------------------------------------------------------------


class NormalizedClassifier(nn.Module):
    """A frozen classifier that takes [0, 1] RGB: ``(B, 3, H, W)`` -> logits ``(B, C)``.

    ``forward`` computes ``model((images - mean) / std)`` with per-channel ``mean``/``std``
    (``None`` for both: the model normalises itself, as ``TinyClassifier`` does). With
    ``validate=True`` (default) inputs are checked with :func:`~attnpatch.images.check_image`
    first (4-D, RGB channels-first, finite, in [0, 1]); it costs one min/max reduction.

    Frozen by construction: every parameter gets ``requires_grad=False`` and the model is put
    in eval mode. ``train(mode)`` is overridden to keep eval mode whatever ``mode`` is (so a
    parent module's ``.train()`` cannot switch BatchNorm to batch statistics or update its
    running averages), and ``forward`` restores eval mode if ``wrapper.model.train()`` was called
    directly. Gradients still flow to the *input* images. To fine-tune, use the bare model.

    Attributes:
        model: the wrapped ``nn.Module``.
        mean, std: ``(1, 3, 1, 1)`` buffers, or ``None``.
        num_classes: ``C``, measured on a probe batch at load (``None`` if never probed).
        classes: class names in logit order when known (``"tiny"``: the shape names), else
            ``None``.
        input_size: the ``(H, W)`` the model was trained at when known, else ``None``.
        name: the spec it was loaded from.
        info: extra facts (``"tiny"``: held-out accuracy, training seconds, cache path).

    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    >>> clf = NormalizedClassifier(net, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    >>> clf(torch.rand(1, 3, 4, 4)).shape, clf.training
    (torch.Size([1, 2]), False)
    """

    def __init__(
        self,
        model: nn.Module,
        mean: Sequence[float] | torch.Tensor | None = None,
        std: Sequence[float] | torch.Tensor | None = None,
        *,
        classes: Sequence[str] | None = None,
        input_size: tuple[int, int] | None = None,
        name: str | None = None,
        validate: bool = True,
        info: dict[str, Any] | None = None,
    ):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise AttnPatchError(
                f"a classifier must be a torch.nn.Module, got {type(model).__name__}; wrap your "
                "function in an nn.Module whose forward returns logits (B, classes)"
            )
        if (mean is None) != (std is None):
            raise AttnPatchError("give both mean and std (per-channel, 3 values each) or neither")
        self.model = model
        if mean is not None and std is not None:
            m, s = _channel_stats(mean, "mean"), _channel_stats(std, "std")
            if (s <= 0).any():
                raise AttnPatchError(f"std must be positive, got {s.flatten().tolist()}")
            self.register_buffer("mean", m)
            self.register_buffer("std", s)
        else:
            self.register_buffer("mean", None)
            self.register_buffer("std", None)
        self.classes = None if classes is None else [str(c) for c in classes]
        self.num_classes: int | None = None if classes is None else len(self.classes)
        self.input_size = input_size
        self.name = name
        self.validate = validate
        self.info: dict[str, Any] = dict(info or {})
        model.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> NormalizedClassifier:
        """Stay in eval mode whatever ``mode`` is (see the class docstring)."""
        return super().train(False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``(images - mean) / std``: what the wrapped model receives."""
        if self.mean is None:
            return images
        return (images - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.validate:
            check_image(images)
        if self.model.training:
            self.model.eval()
        return self.model(self.normalize(images))

    def extra_repr(self) -> str:
        mean = None if self.mean is None else [round(v, 4) for v in self.mean.flatten().tolist()]
        std = None if self.std is None else [round(v, 4) for v in self.std.flatten().tolist()]
        return f"name={self.name!r}, num_classes={self.num_classes}, mean={mean}, std={std}"


def _channel_stats(value: Sequence[float] | torch.Tensor, name: str) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float32).flatten()
    if t.numel() == 1:
        t = t.expand(3)
    if t.numel() != 3:
        raise AttnPatchError(f"{name} needs 3 values (one per RGB channel), got {t.numel()}")
    return t.reshape(1, 3, 1, 1).clone()


# --------------------------------------------------------------------------------------------
# Registries
# --------------------------------------------------------------------------------------------


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
        raise AttnPatchError(
            f"{kind} name must be a non-empty string without ':' (reserved for "
            f"'torchvision:'/'timm:'), got {name!r}"
        )
    if name in table and not overwrite:
        raise AttnPatchError(
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
        raise AttnPatchError(f"factory for {name!r} must be callable, got {factory!r}")
    if (mean is None) != (std is None):
        raise AttnPatchError("give both mean and std to register_classifier, or neither")
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
        raise AttnPatchError(f"factory for {name!r} must be callable, got {factory!r}")
    _DIFFUSION[name] = factory
    return factory


def classifier_names() -> list[str]:
    """Registered classifier names (``torchvision:<name>`` / ``timm:<name>`` come on top)."""
    return sorted(_CLASSIFIERS)


def diffusion_names() -> list[str]:
    """Registered diffusion-stack names (a local model folder path works too)."""
    return sorted(_DIFFUSION)


def _unknown(spec: str, names: list[str], kind: str, extra: str) -> AttnPatchError:
    close = difflib.get_close_matches(spec, names, n=3)
    hint = f" Did you mean {close}?" if close else ""
    return AttnPatchError(
        f"unknown {kind} {spec!r}.{hint} Registered: {names}; {extra}, or register your own with "
        f"register_{'classifier' if kind == 'classifier' else 'diffusion'}(name, factory)"
    )


# --------------------------------------------------------------------------------------------
# load_classifier
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
            ``"IMAGENET1K_V2"`` or ``"DEFAULT"`` is passed to torchvision instead (which reads
            ``$TORCH_HOME`` and downloads when the file is not there).
        mean, std: override the normalisation (default: the registration's; ImageNet's for
            torchvision; ``model.pretrained_cfg``'s for timm; none for an ``nn.Module``).
        classes: class names in logit order (checked against the output width).
        input_size: the probe size ``(H, W)`` (default: the model's known size, else 224 for
            torchvision/timm, 32 otherwise).
        device, dtype: where the wrapper goes (default: where the factory left it).
        **kwargs: passed to the factory (``"tiny"``: see :func:`train_tiny_classifier`'s
            arguments ``config``, ``seed``, ``cache``; torchvision/timm: their model kwargs,
            e.g. ``num_classes``).

    Returns:
        A frozen :class:`NormalizedClassifier` in eval mode. It was run once on a probe batch
        ``(2, 3, H, W)`` of gray images: anything but logits ``(2, C)`` (a tuple, a
        ``ModelOutput``, a wrong batch size, a width different from ``len(classes)``) raises
        :class:`AttnPatchError` here, before any training.
    """
    size = (input_size, input_size) if isinstance(input_size, int) else input_size
    normalised = False  # whether mean/std were applied while wrapping
    if isinstance(spec, NormalizedClassifier):
        wrapper = spec
    elif isinstance(spec, nn.Module):
        wrapper = NormalizedClassifier(spec, mean, std, classes=classes, name=type(spec).__name__)
        normalised = True
    elif not isinstance(spec, str):
        raise AttnPatchError(
            f"classifier spec must be a name, 'torchvision:<model>', 'timm:<model>' or an "
            f"nn.Module, got {type(spec).__name__}"
        )
    elif spec.startswith("torchvision:"):
        wrapper = _torchvision(spec, weights, kwargs)
        weights = None
    elif spec.startswith("timm:"):
        wrapper = _timm(spec, kwargs)
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
            raise AttnPatchError(
                f"the factory registered as {spec!r} returned {type(built).__name__}, not an "
                "nn.Module; make it return the model"
            )
    else:
        raise _unknown(
            spec, classifier_names(), "classifier", "or use 'torchvision:<model>', 'timm:<model>'"
        )
    wrapper.name = wrapper.name or (spec if isinstance(spec, str) else None)
    if weights is not None:
        _load_weights(wrapper.model, weights)
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
    _probe(wrapper, spec)
    return wrapper


def _probe(wrapper: NormalizedClassifier, spec: Any) -> None:
    """Run a ``(2, 3, H, W)`` gray batch; require logits ``(2, C)``; set ``num_classes``."""
    h, w = wrapper.input_size or (32, 32)
    ref = next(iter(wrapper.parameters()), None)
    if ref is None:
        ref = next(iter(wrapper.buffers()), torch.empty(0))
    x = torch.full(
        (2, 3, h, w), 0.5, device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None
    )
    shown = spec if isinstance(spec, str) else type(spec).__name__
    try:
        with torch.no_grad():
            out = wrapper(x)
    except AttnPatchError:
        raise
    except Exception as e:
        raise AttnPatchError(
            f"classifier {shown!r} failed on a probe batch (2, 3, {h}, {w}) in [0, 1] "
            f"({type(e).__name__}: {e}); pass input_size=(H, W) it accepts, or fix the model"
        ) from e
    if not isinstance(out, torch.Tensor):
        hint = (
            " It has .logits: wrap the model so forward returns output.logits."
            if hasattr(out, "logits")
            else " Wrap the model so forward returns the logits tensor."
        )
        raise AttnPatchError(
            f"classifier {shown!r} returned {type(out).__name__}, not logits (B, classes).{hint}"
        )
    if out.ndim != 2 or out.shape[0] != 2:
        raise AttnPatchError(
            f"classifier {shown!r} must return logits (B, classes); on a probe batch of B=2 it "
            f"returned shape {tuple(out.shape)}. Make forward return one row of class scores per "
            "image (e.g. flatten or pool spatial outputs)"
        )
    c = out.shape[1]
    if wrapper.classes is not None and len(wrapper.classes) != c:
        raise AttnPatchError(
            f"classifier {shown!r} returns {c} logits per image but {len(wrapper.classes)} class "
            "names were given; pass classes= with one name per logit"
        )
    if c < 2:
        raise AttnPatchError(
            f"classifier {shown!r} returns {c} logit per image; attacks need at least 2 classes "
            "(a binary model should return 2 logits)"
        )
    wrapper.num_classes = c


def _import_optional(module: str, extra: str = "vision") -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise AttnPatchError(
            f"{module} is not installed, so '{module}:<model>' classifiers are unavailable; "
            f"install it with pip install {module} (or pip install 'attnpatch[{extra}]'), or use "
            "a registered classifier such as 'tiny'"
        ) from e


def _torchvision(spec: str, weights: Any, kwargs: dict[str, Any]) -> NormalizedClassifier:
    tv = _import_optional("torchvision")
    name = spec.split(":", 1)[1]
    local = weights is not None and (
        os.path.sep in str(weights) or Path(weights).suffix != "" or Path(weights).exists()
    )
    tv_weights = None if (weights is None or local) else str(weights)
    try:
        model = tv.models.get_model(name, weights=tv_weights, **kwargs)
    except Exception as e:
        available: list[str] = []
        with contextlib.suppress(Exception):  # a torchvision without list_models()
            available = list(tv.models.list_models())
        close = difflib.get_close_matches(name, available, n=3)
        raise AttnPatchError(
            f"torchvision could not build {name!r} ({type(e).__name__}: {e})."
            + (f" Did you mean {close}?" if close else "")
            + " See torchvision.models.list_models() for the names"
        ) from e
    classes = None
    if tv_weights is not None:
        try:
            meta = tv.models.get_model_weights(name)[tv_weights].meta
            classes = meta.get("categories")
        except Exception:
            classes = None
    wrapper = NormalizedClassifier(
        model, IMAGENET_MEAN, IMAGENET_STD, classes=classes, input_size=(224, 224), name=spec
    )
    if local:
        _load_weights(model, weights)
    return wrapper


def _timm(spec: str, kwargs: dict[str, Any]) -> NormalizedClassifier:
    timm = _import_optional("timm")
    name = spec.split(":", 1)[1]
    try:
        model = timm.create_model(name, **kwargs)
    except Exception as e:
        raise AttnPatchError(
            f"timm could not build {name!r} ({type(e).__name__}: {e}); see timm.list_models()"
        ) from e
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    mean, std = cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
    size = cfg.get("input_size", (3, 224, 224))
    return NormalizedClassifier(model, mean, std, input_size=tuple(size[-2:]), name=spec)


def _load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    path = Path(path).expanduser()
    if not path.is_file():
        raise AttnPatchError(
            f"weights file {str(path)!r} not found; pass the path of a local .safetensors, .pt "
            "or .pth state dict"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise AttnPatchError(
            f"cannot read weights {str(path)!r} ({type(e).__name__}: {e}); save them with "
            "torch.save(model.state_dict(), path) or safetensors.torch.save_file"
        ) from e
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise AttnPatchError(f"{str(path)!r} holds a {type(state).__name__}, not a state dict")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches raise even with strict=False
        raise AttnPatchError(
            f"weights {str(path)!r} do not fit the model: {str(e).strip().splitlines()[-1]}; "
            "load the weights of this architecture (and the same num_classes)"
        ) from e
    if result.missing_keys or result.unexpected_keys:
        raise AttnPatchError(
            f"weights {str(path)!r} do not fit the model: missing {result.missing_keys[:5]}"
            f"{'...' if len(result.missing_keys) > 5 else ''}, unexpected "
            f"{result.unexpected_keys[:5]}{'...' if len(result.unexpected_keys) > 5 else ''}; "
            "load the weights of this architecture (and the same num_classes)"
        )


# --------------------------------------------------------------------------------------------
# The tiny trained classifier
# --------------------------------------------------------------------------------------------

#: Bump when the tiny classifier's training recipe changes: it is part of the cache key.
TINY_CLASSIFIER_VERSION = "tiny-classifier-v1"

_TINY_TRAIN = dict(epochs=10, batch_size=64, lr=2e-2, width=8)


def cache_dir() -> Path:
    """``$ATTNPATCH_CACHE``, else ``~/.cache/attnpatch`` (created on first write)."""
    return Path(os.environ.get("ATTNPATCH_CACHE") or Path.home() / ".cache" / "attnpatch")


def _tiny_key(config: ShapesConfig, seed: int, train: dict[str, Any]) -> tuple[str, str]:
    payload = json.dumps(
        {"version": TINY_CLASSIFIER_VERSION, "data": config.to_dict(), "seed": seed, **train},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest(), payload


def tiny_classifier_path(config: ShapesConfig | None = None, seed: int = 0) -> Path:
    """Where the ``"tiny"`` classifier of ``(config, seed)`` is cached."""
    key, _ = _tiny_key(config or ShapesConfig(), seed, _TINY_TRAIN)
    return cache_dir() / "classifiers" / f"tiny-{key[:20]}.safetensors"


def train_tiny_classifier(
    config: ShapesConfig | None = None,
    seed: int = 0,
    *,
    epochs: int = _TINY_TRAIN["epochs"],
    batch_size: int = _TINY_TRAIN["batch_size"],
    lr: float = _TINY_TRAIN["lr"],
    width: int = _TINY_TRAIN["width"],
) -> tuple[nn.Module, dict[str, Any]]:
    """Train a :class:`~attnpatch.testing.TinyClassifier` on :func:`shapes_dataset` (on CPU).

    Recipe: Adam with a one-cycle learning-rate schedule peaking at ``lr``, cross-entropy,
    mini-batches of ``batch_size`` in a seeded order, random horizontal flips (every shape
    class is closed under them, up to the rotation jitter). The model ends in eval mode.

    Deterministic given ``seed``: weights are initialised after ``torch.manual_seed(seed)``
    inside ``torch.random.fork_rng``, so the caller's global RNG state is restored afterwards
    (the training loop relies on it for exact resume); order and flips come from a private
    generator. Training runs on one CPU thread (the caller's thread count is restored): the
    result is then the same whatever ``torch.get_num_threads()`` is, and these tiny convolutions
    gain little from more threads (on a 2-core machine, 2 threads were under 1.5x faster when
    idle and up to 70x slower when other processes shared the cores).

    Returns:
        ``(model, info)``; ``info`` holds ``heldout_accuracy`` and ``train_accuracy`` (fractions),
        ``train_seconds``, ``num_heldout``.
    """
    from .tiny import TinyClassifier

    config = config or ShapesConfig()
    t0 = time.perf_counter()
    train = shapes_dataset(config, "train")
    heldout = shapes_dataset(config, "heldout")
    if len(train) == 0:
        raise AttnPatchError("train_per_class is 0: the tiny classifier needs training images")
    with _one_thread():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = TinyClassifier(len(config.classes), width)
        info = _fit(model, train, heldout, seed, epochs, batch_size, lr)
    info["train_seconds"] = time.perf_counter() - t0
    return model, info


def _fit(
    model: nn.Module,
    train: Any,
    heldout: Any,
    seed: int,
    epochs: int,
    batch_size: int,
    lr: float,
) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    n = len(train)
    steps_per_epoch = math.ceil(n / batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=max(1, epochs * steps_per_epoch)
    )
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=g)
        for k in range(0, n, batch_size):
            idx = order[k : k + batch_size]
            x, y = train.images[idx], train.labels[idx]
            flip = torch.rand(len(idx), generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    model.zero_grad(set_to_none=True)  # no stale gradients on a frozen model
    with torch.no_grad():
        train_acc = _accuracy(model, train.images, train.labels)
        held_acc = _accuracy(model, heldout.images, heldout.labels) if len(heldout) else math.nan
    return {
        "heldout_accuracy": held_acc,
        "train_accuracy": train_acc,
        "num_heldout": len(heldout),
    }


def _accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    preds = torch.cat([model(images[i : i + 512]).argmax(1) for i in range(0, len(images), 512)])
    return float((preds == labels).float().mean())


def _save_atomic(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, tmp, metadata)
        os.replace(tmp, path)  # atomic on POSIX and Windows: readers see old or new, never half
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _tiny_factory(
    config: ShapesConfig | dict[str, Any] | None = None, seed: int = 0, cache: bool = True
) -> NormalizedClassifier:
    """The ``"tiny"`` registry entry: train once per ``(config, seed)``, then load the cache."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .tiny import TinyClassifier

    if isinstance(config, dict):
        config = ShapesConfig(**config)
    config = config or ShapesConfig()
    path = tiny_classifier_path(config, seed)
    key, payload = _tiny_key(config, seed, _TINY_TRAIN)
    model = info = None
    if cache and path.is_file():
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            if meta.get("key") == key:
                model = TinyClassifier(len(config.classes), _TINY_TRAIN["width"])
                model.load_state_dict(load_file(str(path)))
                info = json.loads(meta["info"])
                info["cache_hit"] = True
        except Exception:  # a corrupt or foreign file: retrain and replace it
            model = info = None
    if model is None:
        model, info = train_tiny_classifier(config, seed, **_TINY_TRAIN)
        info["cache_hit"] = False
        if cache:
            meta = {"key": key, "config": payload, "info": json.dumps(info)}
            _save_atomic(model.state_dict(), path, meta)
    assert info is not None
    info["cache_path"] = str(path) if cache else None
    return NormalizedClassifier(
        model.eval(),
        classes=config.classes,
        input_size=(config.size, config.size),
        name="tiny",
        info=info,
    )


register_classifier("tiny", _tiny_factory)


# --------------------------------------------------------------------------------------------
# Diffusion stacks
# --------------------------------------------------------------------------------------------


_PART_FIELDS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def _as_parts(obj: Any, spec: Any) -> DiffusionParts:
    if isinstance(obj, DiffusionParts):
        parts = obj
    else:
        missing = [f for f in _PART_FIELDS if getattr(obj, f, None) is None]
        if missing:
            raise AttnPatchError(
                f"diffusion spec {spec!r} gave a {type(obj).__name__} without {missing}; return "
                "a DiffusionParts(unet, vae, text_encoder, tokenizer, scheduler, variant)"
            )
        kw = {f.name: getattr(obj, f.name, None) for f in fields(DiffusionParts)}
        kw["variant"] = kw["variant"] or _detect_variant(obj.unet)
        parts = DiffusionParts(**kw)
    _to_ddim(parts)
    for m in parts.modules():
        m.eval().requires_grad_(False)
    _check_parts(parts, spec)
    return parts


def _to_ddim(parts: DiffusionParts) -> None:
    from diffusers import DDIMScheduler

    if not isinstance(parts.scheduler, DDIMScheduler):
        parts.scheduler = DDIMScheduler.from_config(parts.scheduler.config)


def _detect_variant(unet: Any) -> str:
    """``"sdxl"`` for text-time conditioning, ``"sd2"`` for linear projections, else ``"sd15"``."""
    cfg = unet.config
    if getattr(cfg, "addition_embed_type", None) == "text_time":
        return "sdxl"
    if getattr(cfg, "use_linear_projection", False):
        return "sd2"
    return "sd15"


def _check_parts(parts: DiffusionParts, spec: Any) -> None:
    widths = [te.config.hidden_size for te in parts.text_encoders]
    cross = parts.unet.config.cross_attention_dim
    if sum(widths) != cross:
        raise AttnPatchError(
            f"diffusion stack {spec!r}: the UNet's cross_attention_dim is {cross} but the text "
            f"encoder(s) give {widths} (sum {sum(widths)}); load the text encoder(s) of the same "
            "model (SDXL needs text_encoder and text_encoder_2)"
        )
    if parts.variant not in ("sd15", "sd2", "sdxl"):
        raise AttnPatchError(
            f"diffusion stack {spec!r}: variant must be 'sd15', 'sd2' or 'sdxl', got "
            f"{parts.variant!r}"
        )


def load_diffusers_folder(
    folder: str | os.PathLike, *, dtype: torch.dtype | None = None
) -> DiffusionParts:
    """Read a diffusers model folder offline (``local_files_only=True``): SD1.x, SD2.x, SDXL.

    The folder holds ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``
    (and for SDXL ``text_encoder_2/``, ``tokenizer_2/``): what ``save_pretrained`` writes, or
    ``huggingface-cli download <repo> --local-dir <folder>`` fetches. Weights load as
    ``safetensors`` when present. The variant is read from the UNet config (see
    :func:`_detect_variant`); the scheduler is built as a ``DDIMScheduler`` from
    ``scheduler/scheduler_config.json`` whatever class it names (``prediction_type`` kept).
    A second encoder is loaded only when ``text_encoder_2/`` exists, as
    ``CLIPTextModelWithProjection``.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    root = Path(folder).expanduser()
    if root.is_file():
        raise AttnPatchError(
            f"{str(root)!r} is a single file; attnpatch reads diffusers model folders. Convert "
            "it once: StableDiffusionPipeline.from_single_file(path).save_pretrained(folder)"
        )
    needed = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]
    missing = [d for d in needed if not (root / d).is_dir()]
    if missing:
        raise AttnPatchError(
            f"{str(root)!r} is not a complete diffusers model folder: {missing} missing. Pass the "
            f"folder that holds {needed} (e.g. from save_pretrained or huggingface-cli download "
            "--local-dir)"
        )
    kw: dict[str, Any] = {"local_files_only": True}
    try:
        unet = UNet2DConditionModel.from_pretrained(root / "unet", torch_dtype=dtype, **kw)
        vae = AutoencoderKL.from_pretrained(root / "vae", torch_dtype=dtype, **kw)
        variant = _detect_variant(unet)
        has_second = (root / "text_encoder_2").is_dir()
        if has_second:
            text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", dtype=dtype, **kw)
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
                root / "text_encoder_2", dtype=dtype, **kw
            )
            tokenizer_2 = CLIPTokenizer.from_pretrained(root / "tokenizer_2", **kw)
        else:
            cls = CLIPTextModelWithProjection if variant == "sdxl" else CLIPTextModel
            text_encoder = cls.from_pretrained(root / "text_encoder", dtype=dtype, **kw)
            text_encoder_2 = tokenizer_2 = None
        tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer", **kw)
        scheduler = DDIMScheduler.from_config(DDIMScheduler.load_config(root / "scheduler"))
    except (OSError, ValueError) as e:
        raise AttnPatchError(
            f"cannot load the diffusers folder {str(root)!r}: {type(e).__name__}: {e}. Check "
            "that its weights and configs are complete (re-download or re-save it)"
        ) from e
    return DiffusionParts(
        unet, vae, text_encoder, tokenizer, scheduler, variant, text_encoder_2, tokenizer_2
    )


def load_diffusion(
    spec: str | os.PathLike | Any,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **kwargs: Any,
) -> DiffusionParts:
    """Build or load a Stable Diffusion stack; every network frozen and in eval mode.

    Args:
        spec: a registered name (``"tiny"`` = ``"tiny-sd15"``, ``"tiny-sd2"``,
            ``"tiny-sdxl"``, or yours), a local diffusers model folder (see
            :func:`load_diffusers_folder`), or a ``DiffusionParts``-like object.
            Hub ids are not downloaded: download once, pass the folder.
        device, dtype: where the networks go (``dtype`` is also the loading dtype of folders).
        **kwargs: passed to a registered factory (the tiny ones take ``seed``).

    Checks that the text encoder width(s) add up to the UNet's ``cross_attention_dim`` and
    converts the scheduler to ``DDIMScheduler``.
    """
    if isinstance(spec, (str, os.PathLike)) and str(spec) in _DIFFUSION:
        parts = _as_parts(_DIFFUSION[str(spec)](**kwargs), spec)
    elif isinstance(spec, (str, os.PathLike)):
        path = Path(spec).expanduser()
        if path.exists():
            if kwargs:
                raise AttnPatchError(
                    f"unexpected arguments {sorted(kwargs)} for a model folder; folders take "
                    "device= and dtype= only"
                )
            parts = _as_parts(load_diffusers_folder(path, dtype=dtype), str(spec))
        else:
            looks_hub = str(spec).count("/") == 1 and not str(spec).startswith((".", "/", "~"))
            extra = (
                f"{str(spec)!r} looks like a Hugging Face hub id: attnpatch never downloads; run "
                f"huggingface-cli download {spec} --local-dir DIR and pass DIR"
                if looks_hub
                else "or pass the path of an existing local diffusers model folder"
            )
            raise _unknown(str(spec), diffusion_names(), "diffusion stack", extra)
    else:
        parts = _as_parts(spec, type(spec).__name__)
    if device is not None or dtype is not None:
        parts.to(device=device, dtype=dtype)
    return parts


def _tiny_diffusion(variant: str) -> Callable[..., DiffusionParts]:
    def factory(seed: int = 0) -> DiffusionParts:
        from .tiny import tiny_sd

        sd = tiny_sd(variant, seed)
        return DiffusionParts(sd.unet, sd.vae, sd.text_encoder, sd.tokenizer, sd.scheduler, variant)

    factory.__doc__ = f"The tiny offline {variant} stack of attnpatch.testing.tiny_sd."
    return factory


register_diffusion("tiny", _tiny_diffusion("sd15"))
register_diffusion("tiny-sd15", _tiny_diffusion("sd15"))
register_diffusion("tiny-sd2", _tiny_diffusion("sd2"))
register_diffusion("tiny-sdxl", _tiny_diffusion("sdxl"))
