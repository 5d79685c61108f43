"""Classifiers in one fixed form: :class:`NormalizedClassifier`, the load-time probe, builders.

A :class:`NormalizedClassifier` takes ``(B, 3, H, W)`` RGB in [0, 1], applies the model's own
mean/std normalisation and returns logits ``(B, num_classes)``; it is frozen and stays in eval
mode. :func:`probe_classifier` checks once, on a gray batch, that a model really returns such
logits. The torchvision / timm builders and the local weights loader serve
:func:`~attnpatch.models.load_classifier`.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._util import as_pair
from ..errors import AttnPatchError
from ..images import check_image

__all__ = ["NormalizedClassifier", "probe_classifier", "IMAGENET_MEAN", "IMAGENET_STD"]

#: torchvision's (and most timm models') ImageNet normalisation.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
    """3 per-channel values (or 1, repeated) -> a float32 ``(1, 3, 1, 1)`` tensor."""
    t = torch.as_tensor(value, dtype=torch.float32).flatten()
    if t.numel() == 1:
        t = t.expand(3)
    if t.numel() != 3:
        raise AttnPatchError(f"{name} needs 3 values (one per RGB channel), got {t.numel()}")
    return t.reshape(1, 3, 1, 1).clone()


def probe_classifier(
    model: nn.Module,
    input_size: int | tuple[int, int] = 32,
    *,
    name: str | None = None,
    classes: Sequence[str] | None = None,
) -> int:
    """Check that ``model`` maps ``(B, 3, H, W)`` images in [0, 1] to logits ``(B, C)``; return ``C``.

    Runs one gray batch ``(2, 3, H, W)`` (every pixel 0.5; ``input_size`` is ``H = W`` or
    ``(H, W)``) under ``torch.no_grad()`` on the device and floating dtype of the model's first
    parameter (else buffer; else CPU float32). Raises :class:`AttnPatchError`, naming the model
    (``name``, default its class name) and the fix, when the model fails on that input, returns
    anything but a tensor (a tuple, a ``ModelOutput`` with ``.logits``), returns a shape other
    than ``(2, C)``, returns ``C < 2`` logits, or ``C != len(classes)`` when ``classes`` is
    given. Nothing of the model is changed (eval mode is the caller's business).

    >>> probe_classifier(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4)), 8)
    4
    """
    h, w = as_pair(input_size, "input_size")
    ref = next(iter(model.parameters()), None)
    if ref is None:
        ref = next(iter(model.buffers()), torch.empty(0))
    x = torch.full(
        (2, 3, h, w), 0.5, device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None
    )
    shown = name if name is not None else type(model).__name__
    try:
        with torch.no_grad():
            out = model(x)
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
    c = int(out.shape[1])
    if classes is not None and len(classes) != c:
        raise AttnPatchError(
            f"classifier {shown!r} returns {c} logits per image but {len(classes)} class "
            "names were given; pass classes= with one name per logit"
        )
    if c < 2:
        raise AttnPatchError(
            f"classifier {shown!r} returns {c} logit per image; attacks need at least 2 classes "
            "(a binary model should return 2 logits)"
        )
    return c


# --------------------------------------------------------------------------------------------
# torchvision / timm builders, local weights
# --------------------------------------------------------------------------------------------


def _import_optional(module: str, extra: str = "vision") -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise AttnPatchError(
            f"{module} is not installed, so '{module}:<model>' classifiers are unavailable; "
            f"install it with pip install {module} (or pip install 'attnpatch[{extra}]'), or use "
            "a registered classifier such as 'tiny'"
        ) from e


def build_torchvision(spec: str, weights: Any, kwargs: dict[str, Any]) -> NormalizedClassifier:
    """``"torchvision:<name>"`` -> a wrapped ``torchvision.models.get_model(name, ...)``.

    ``weights`` is a torchvision weights name (passed to torchvision; its categories become the
    classes) or a local file (loaded here with :func:`load_weights`); ImageNet normalisation,
    input size (224, 224).
    """
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
        load_weights(model, weights)
    return wrapper


def build_timm(spec: str, kwargs: dict[str, Any]) -> NormalizedClassifier:
    """``"timm:<name>"`` -> a wrapped ``timm.create_model(name, **kwargs)`` with the
    normalisation and input size of its ``pretrained_cfg`` (ImageNet, 224 if absent)."""
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


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a local state dict into ``model``, strictly.

    ``.safetensors``, or a ``torch.save``'d dict (``weights_only=True``), possibly under a
    ``"state_dict"`` / ``"model"`` / ``"model_state_dict"`` key, ``module.`` prefixes stripped.
    A missing file, an unreadable one, or one that does not fit raises :class:`AttnPatchError`.
    """
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
