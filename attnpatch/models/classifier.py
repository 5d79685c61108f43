"""Classifiers in one fixed form: :class:`NormalizedClassifier`, the load-time probe, builders.

A :class:`NormalizedClassifier` takes ``(B, 3, H, W)`` RGB in [0, 1], applies the model's own
mean/std normalisation and returns logits ``(B, num_classes)``; it is frozen and stays in eval
mode. :func:`probe_classifier` checks once, on a gray batch, that a model really returns such
logits. The torchvision / timm builders and the local weights loader serve
:func:`~attnpatch.models.load_classifier`.
"""

from __future__ import annotations

import difflib
import importlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from .._util import as_pair
from ..errors import AttnPatchError, InputError, ModelError
from ..images import check_image
from .hub import offline, repo_cache_folder

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
            raise InputError(
                f"a classifier must be a torch.nn.Module, got {type(model).__name__}; wrap your "
                "function in an nn.Module whose forward returns logits (B, classes)"
            )
        if (mean is None) != (std is None):
            raise InputError("give both mean and std (per-channel, 3 values each) or neither")
        self.model = model
        if mean is not None and std is not None:
            m, s = _channel_stats(mean, "mean"), _channel_stats(std, "std")
            if (s <= 0).any():
                raise InputError(f"std must be positive, got {s.flatten().tolist()}")
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
        raise InputError(f"{name} needs 3 values (one per RGB channel), got {t.numel()}")
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
    parameter (else buffer; else CPU float32). Raises :class:`~attnpatch.errors.ModelError`, naming the model
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
        raise ModelError(
            f"classifier {shown!r} failed on a probe batch (2, 3, {h}, {w}) in [0, 1] "
            f"({type(e).__name__}: {e}); pass input_size=(H, W) it accepts, or fix the model"
        ) from e
    if not isinstance(out, torch.Tensor):
        hint = (
            " It has .logits: wrap the model so forward returns output.logits."
            if hasattr(out, "logits")
            else " Wrap the model so forward returns the logits tensor."
        )
        raise ModelError(
            f"classifier {shown!r} returned {type(out).__name__}, not logits (B, classes).{hint}"
        )
    if out.ndim != 2 or out.shape[0] != 2:
        raise ModelError(
            f"classifier {shown!r} must return logits (B, classes); on a probe batch of B=2 it "
            f"returned shape {tuple(out.shape)}. Make forward return one row of class scores per "
            "image (e.g. flatten or pool spatial outputs)"
        )
    c = int(out.shape[1])
    if classes is not None and len(classes) != c:
        raise ModelError(
            f"classifier {shown!r} returns {c} logits per image but {len(classes)} class "
            "names were given; pass classes= with one name per logit"
        )
    if c < 2:
        raise ModelError(
            f"classifier {shown!r} returns {c} logit per image; attacks need at least 2 classes "
            "(a binary model should return 2 logits)"
        )
    return c


# --------------------------------------------------------------------------------------------
# torchvision / timm builders, local weights
# --------------------------------------------------------------------------------------------

#: Suffixes that make a ``weights=`` string a file path even when the file is missing.
_WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


def _import_optional(module: str, extra: str = "vision") -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ModelError(
            f"{module} is not installed, so '{module}:<model>' classifiers are unavailable; "
            f"install it with pip install 'attnpatch[{extra}]' (a torch / torchvision pair that "
            "load together, and timm), or use a registered classifier such as 'tiny'"
        ) from e
    except Exception as e:  # e.g. RuntimeError: operator torchvision::nms does not exist
        raise ModelError(
            f"{module} is installed but does not import beside torch {torch.__version__} "
            f"({type(e).__name__}: {e}); its compiled ops need the torch release it was built "
            f"for: install a matching pair with pip install 'attnpatch[{extra}]'"
        ) from e


def _torchvision_weights(tv: Any, name: str, weights: Any) -> tuple[Path | None, Any]:
    """``weights=`` of a torchvision spec -> ``(local file, None)`` or ``(None, enum member)``.

    A weights *name* is torchvision's: its file is read from the torch hub cache
    (``$TORCH_HOME/hub/checkpoints/``), downloaded there by torchvision when missing, unless
    offline (``HF_HUB_OFFLINE=1``, :func:`.hub.offline`): then a missing file is an error.
    """
    if isinstance(weights, os.PathLike) or Path(str(weights)).expanduser().is_file():
        return Path(weights).expanduser(), None
    text = str(weights)
    try:
        enum = tv.models.get_model_weights(name)
    except Exception:  # a builder without a weights enum
        enum = None
    key = (
        text.split(".", 1)[1] if enum is not None and text.startswith(f"{enum.__name__}.") else text
    )
    member = None if enum is None else enum.__members__.get(key)
    if member is None:
        if os.path.sep in text or text.lower().endswith(_WEIGHT_SUFFIXES):
            return Path(text).expanduser(), None  # load_weights says it is not found
        names = [] if enum is None else list(enum.__members__)
        raise ModelError(
            f"weights {text!r} are neither a local file nor a torchvision weights name of "
            f"{name!r} (its names: {names}); pass the path of an existing .pth / .safetensors "
            "state dict, or one of those names"
        )
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(member.url).path)
    if not cached.is_file() and offline():
        raise ModelError(
            f"torchvision weights {enum.__name__}.{member.name} of {name!r} are not in torch "
            f"hub's cache ({cached} does not exist) and HF_HUB_OFFLINE is set; download them "
            f"once with `curl -L {member.url} -o {cached}` (or unset HF_HUB_OFFLINE: "
            "torchvision downloads them there), or pass weights=<the local file>"
        )
    return None, member


def build_torchvision(spec: str, weights: Any, kwargs: dict[str, Any]) -> NormalizedClassifier:
    """``"torchvision:<name>"`` -> a wrapped ``torchvision.models.get_model(name, ...)``.

    ``weights``: ``None`` (random weights), a local file (built with ``weights=None``, then
    loaded strictly with :func:`load_weights`), or a torchvision weights name (``"DEFAULT"``,
    ``"IMAGENET1K_V2"``, ``"ResNet50_Weights.IMAGENET1K_V2"``): torchvision loads it from torch
    hub's cache (downloading it there when missing, unless offline: ``HF_HUB_OFFLINE=1`` makes
    a missing file a :class:`ModelError` naming its path) and its ``meta["categories"]`` become
    the classes. torchvision's deprecated ``pretrained=`` is refused (pass the weights name).
    ImageNet mean/std, (224, 224).
    """
    tv = _import_optional("torchvision")
    name = spec.split(":", 1)[1]
    if "pretrained" in kwargs:
        raise ModelError(
            f"torchvision's pretrained= is its deprecated interface; for {spec!r} pass "
            "weights='DEFAULT' (or another weights name), or weights=<local file>"
        )
    available = list(tv.models.list_models())
    if name not in available:
        close = difflib.get_close_matches(name, available, n=3)
        raise ModelError(
            f"torchvision has no model {name!r}."
            + (f" Did you mean {close}?" if close else "")
            + " See torchvision.models.list_models() for the names"
        )
    local, named = (None, None) if weights is None else _torchvision_weights(tv, name, weights)
    try:
        model = tv.models.get_model(name, weights=named, **kwargs)
    except Exception as e:
        raise ModelError(
            f"torchvision could not build {name!r} with {kwargs or 'no arguments'} "
            f"({type(e).__name__}: {e}); fix the arguments (a weights name fixes num_classes)"
        ) from e
    classes = None if named is None else named.meta.get("categories")
    wrapper = NormalizedClassifier(
        model, IMAGENET_MEAN, IMAGENET_STD, classes=classes, input_size=(224, 224), name=spec
    )
    if local is not None:
        load_weights(model, local)
    return wrapper


def build_timm(spec: str, kwargs: dict[str, Any]) -> NormalizedClassifier:
    """``"timm:<name>"`` -> a wrapped ``timm.create_model(name, **kwargs)``.

    Mean, std and input size come from ``timm.data.resolve_model_data_config(model)`` (the
    model's ``pretrained_cfg``). Random weights unless ``pretrained=True``: timm's own loader
    then reads the weights from the Hugging Face cache (``timm/<model>.<tag>``; downloaded when
    online and missing; ``HF_HUB_OFFLINE=1``: a missing file is a :class:`ModelError` naming
    ``hf download`` and the cache path), or from a local file with
    ``pretrained_cfg_overlay=dict(file=PATH)``; it adapts the classifier head to
    ``num_classes``. A head-less model (``num_classes=0``, which returns features) is refused.
    """
    timm = _import_optional("timm")
    name = spec.split(":", 1)[1]
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise ModelError(
            f"timm has no model {name!r}."
            + (f" Did you mean {close}?" if close else "")
            + " See timm.list_models()"
        )
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    file = overlay.get("file")
    if kwargs.get("pretrained") and file is not None and not Path(file).expanduser().is_file():
        raise ModelError(
            f"pretrained_cfg_overlay file {str(file)!r} not found; pass an existing "
            f".safetensors / .pth file of the weights of {name!r}"
        )
    if kwargs.get("pretrained") and file is None and offline():
        cfg = timm.models.get_pretrained_cfg(name)
        if cfg is not None and not cfg.hf_hub_id and cfg.url:  # timm would use torch hub
            cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg.url).path).name
            if not cached.is_file():
                raise ModelError(
                    f"timm's pretrained weights of {name!r} are not in torch hub's cache "
                    f"({cached}) and HF_HUB_OFFLINE is set; download them once with "
                    f"`curl -L {cfg.url} -o {cached}`, or pass pretrained_cfg_overlay=dict(file=PATH)"
                )
    try:
        model = timm.create_model(name, **kwargs)
    except FileNotFoundError as e:  # LocalEntryNotFoundError: offline, not in the HF cache
        repo = overlay.get("hf_hub_id") or _timm_hub_id(timm, name)
        raise ModelError(
            f"timm's pretrained weights of {name!r} are not in the Hugging Face cache "
            f"({repo_cache_folder(repo.split('@')[0])}) and the hub may not be reached "
            f"(HF_HUB_OFFLINE=1 or no network); download them once with `hf download {repo} "
            "model.safetensors`, or pass pretrained_cfg_overlay=dict(file=PATH)"
        ) from e
    except Exception as e:
        raise ModelError(
            f"timm could not build {name!r} with {sorted(kwargs) or 'no arguments'} "
            f"({type(e).__name__}: {e}); fix the arguments, or the weights file"
        ) from e
    if getattr(model, "num_classes", None) == 0:
        raise ModelError(
            f"timm model {name!r} was built without a classifier head (num_classes=0: it "
            "returns features); pass num_classes >= 2 or leave it at the default"
        )
    cfg = timm.data.resolve_model_data_config(model)
    return NormalizedClassifier(
        model, cfg["mean"], cfg["std"], input_size=tuple(cfg["input_size"][-2:]), name=spec
    )


def _timm_hub_id(timm: Any, name: str) -> str:
    """The HF repo timm reads ``name``'s pretrained weights from (``timm/<model>.<tag>``)."""
    try:
        return timm.models.get_pretrained_cfg(name).hf_hub_id or f"timm/{name}"
    except Exception:
        return f"timm/{name}"


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a local state dict into ``model``, strictly.

    ``.safetensors``, or a ``torch.save``'d dict (``weights_only=True``), possibly under a
    ``"state_dict"`` / ``"model"`` / ``"model_state_dict"`` key, ``module.`` prefixes stripped.
    A missing file, an unreadable one, or one that does not fit raises :class:`~attnpatch.errors.ModelError`.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(
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
        raise ModelError(
            f"cannot read weights {str(path)!r} ({type(e).__name__}: {e}); save them with "
            "torch.save(model.state_dict(), path) or safetensors.torch.save_file"
        ) from e
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise ModelError(f"{str(path)!r} holds a {type(state).__name__}, not a state dict")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches raise even with strict=False
        raise ModelError(
            f"weights {str(path)!r} do not fit the model: {str(e).strip().splitlines()[-1]}; "
            "load the weights of this architecture (and the same num_classes)"
        ) from e
    if result.missing_keys or result.unexpected_keys:
        raise ModelError(
            f"weights {str(path)!r} do not fit the model: missing {result.missing_keys[:5]}"
            f"{'...' if len(result.missing_keys) > 5 else ''}, unexpected "
            f"{result.unexpected_keys[:5]}{'...' if len(result.unexpected_keys) > 5 else ''}; "
            "load the weights of this architecture (and the same num_classes)"
        )
