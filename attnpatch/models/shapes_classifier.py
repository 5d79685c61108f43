"""The tiny shapes classifiers: small networks trained on the synthetic shapes, cached on disk.

Three architectures (:data:`TINY_CLASSIFIERS`), each registered under its name:

* ``"tiny"`` — :class:`TinyClassifier`, a 3-block CNN with BatchNorm (seed 0);
* ``"tiny-b"`` — :class:`~attnpatch.models.tiny_classifiers.TinyResNet`, a residual net with
  GroupNorm (seed 1);
* ``"tiny-c"`` — :class:`~attnpatch.models.tiny_classifiers.TinyStridedCNN`, a wide shallow
  CNN of strided convolutions with a global max readout (seed 2).

Each maps ``(B, 3, H, W)`` RGB in [0, 1] to logits ``(B, num_classes)``.
:func:`tiny_classifier` builds an untrained ``"tiny"`` with seeded weights;
:func:`train_tiny_classifier` trains any of them on :func:`~attnpatch.data.shapes_dataset` in
seconds on CPU, with one training loop and a recipe per architecture;
:func:`tiny_factory` (the registry entries) trains once per ``(arch, config, seed)`` and then
loads the cached weights from :func:`tiny_classifier_path`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._util import atomic_write, one_thread, seeded
from ..data import ShapesConfig, shapes_dataset
from ..errors import InputError, ModelError
from .classifier import NormalizedClassifier
from .tiny_classifiers import ShapesNet, TinyResNet, TinyStridedCNN

__all__ = [
    "TinyClassifier",
    "tiny_classifier",
    "train_tiny_classifier",
    "tiny_classifier_path",
    "cache_dir",
    "TINY_CLASSIFIER_VERSION",
    "TINY_CLASSIFIERS",
]

#: Bump when the ``"tiny"`` classifier's training recipe changes: it is part of its cache key.
#: (``"tiny-b"`` / ``"tiny-c"`` carry their own versions in ``_ARCHS``.)
TINY_CLASSIFIER_VERSION = "tiny-classifier-v1"

_TINY_TRAIN = dict(epochs=10, batch_size=64, lr=2e-2, width=8)


class TinyClassifier(ShapesNet):
    """A small CNN with BatchNorm: ``(B, 3, H, W)`` in [0, 1] -> logits ``(B, num_classes)``.

    It normalises its input itself (per-channel mean 0.5, std 0.25), like the registry's
    wrapped classifiers, so callers always pass [0, 1] RGB images.
    """

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__(num_classes)

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(
            block(3, width), block(width, 2 * width), block(2 * width, 4 * width)
        )
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.features(self.normalise(images))
        return self.head(x.mean(dim=(2, 3)))


def tiny_classifier(num_classes: int = 10, seed: int = 0, width: int = 16) -> TinyClassifier:
    """An untrained :class:`TinyClassifier` (eval mode, weights trainable)."""
    with seeded(seed):
        model = TinyClassifier(num_classes, width)
    return model.eval()


@dataclass(frozen=True)
class _Arch:
    """One tiny architecture: ``build(num_classes, width)``, its recipe, default seed and the
    version in its cache key (``None``: ``"tiny"``'s original key, which has no arch field)."""

    build: Callable[[int, int], nn.Module]
    train: dict[str, Any]
    seed: int
    version: str | None


_ARCHS: dict[str, _Arch] = {
    "tiny": _Arch(TinyClassifier, _TINY_TRAIN, 0, None),
    "tiny-b": _Arch(TinyResNet, dict(epochs=10, batch_size=64, lr=1e-2, width=8), 1, "v1"),
    "tiny-c": _Arch(TinyStridedCNN, dict(epochs=10, batch_size=64, lr=5e-3, width=32), 2, "v1"),
}

#: The tiny shapes classifiers' registry names, one per architecture.
TINY_CLASSIFIERS: tuple[str, ...] = tuple(_ARCHS)


def _arch(name: str) -> _Arch:
    if name not in _ARCHS:
        raise ModelError(
            f"unknown tiny classifier architecture {name!r}; choose from {list(_ARCHS)}"
        )
    return _ARCHS[name]


# --------------------------------------------------------------------------------------------
# Training and the cache
# --------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """``$ATTNPATCH_CACHE``, else ``~/.cache/attnpatch`` (created on first write)."""
    return Path(os.environ.get("ATTNPATCH_CACHE") or Path.home() / ".cache" / "attnpatch")


def _tiny_key(config: ShapesConfig, seed: int, arch: str) -> tuple[str, str]:
    spec = _arch(arch)
    if spec.version is None:  # "tiny": the key it always had (existing caches stay valid)
        head = {"version": TINY_CLASSIFIER_VERSION}
    else:
        head = {"version": f"{arch}-{spec.version}", "arch": arch}
    payload = json.dumps(
        {**head, "data": config.to_dict(), "seed": seed, **spec.train}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest(), payload


def tiny_classifier_path(
    config: ShapesConfig | None = None, seed: int | None = None, *, arch: str = "tiny"
) -> Path:
    """Where the tiny classifier ``arch`` of ``(config, seed)`` is cached (``seed`` defaults
    to the architecture's: 0, 1, 2 for ``"tiny"``, ``"tiny-b"``, ``"tiny-c"``)."""
    seed = _arch(arch).seed if seed is None else seed
    key, _ = _tiny_key(config or ShapesConfig(), seed, arch)
    return cache_dir() / "classifiers" / f"{arch}-{key[:20]}.safetensors"


def train_tiny_classifier(
    config: ShapesConfig | None = None,
    seed: int | None = None,
    *,
    arch: str = "tiny",
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    width: int | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train the tiny classifier ``arch`` (one of :data:`TINY_CLASSIFIERS`) on
    :func:`~attnpatch.data.shapes_dataset` (on CPU).

    ``seed`` and the recipe's ``epochs``, ``batch_size``, ``lr`` and ``width`` default to the
    architecture's (``"tiny"``: seed 0, 10 epochs of 64, lr 2e-2, width 8; ``"tiny-b"``: seed
    1, lr 1e-2, width 8; ``"tiny-c"``: seed 2, lr 5e-3, width 32).

    Recipe (one loop for every architecture): Adam with a one-cycle learning-rate schedule
    peaking at ``lr``, cross-entropy, mini-batches of ``batch_size`` in a seeded order, random
    horizontal flips (every shape class is closed under them, up to the rotation jitter). The
    model ends in eval mode.

    Deterministic given ``seed``: weights are initialised after ``torch.manual_seed(seed)``
    inside ``torch.random.fork_rng``, so the caller's global RNG state is restored afterwards
    (the training loop relies on it for exact resume); order and flips come from a private
    generator. Training runs on one CPU thread (the caller's thread count is restored): the
    result is then the same whatever ``torch.get_num_threads()`` is, and these tiny convolutions
    gain little from more threads and lose much when other processes share the cores (timings
    in docs/performance.md).

    Returns:
        ``(model, info)``; ``info`` holds ``heldout_accuracy`` and ``train_accuracy`` (fractions),
        ``train_seconds``, ``num_heldout``.
    """
    spec = _arch(arch)
    seed = spec.seed if seed is None else seed
    given = dict(epochs=epochs, batch_size=batch_size, lr=lr, width=width)
    recipe = {k: spec.train[k] if v is None else v for k, v in given.items()}
    config = config or ShapesConfig()
    t0 = time.perf_counter()
    train = shapes_dataset(config, "train")
    heldout = shapes_dataset(config, "heldout")
    if len(train) == 0:
        raise InputError("train_per_class is 0: the tiny classifier needs training images")
    with one_thread(), torch.enable_grad():  # trains even when called under no_grad
        with seeded(seed):
            model = spec.build(len(config.classes), recipe["width"])
        epochs, batch, rate = recipe["epochs"], recipe["batch_size"], recipe["lr"]
        info = _fit(model, train, heldout, seed, epochs, batch, rate)
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


def _load_cached(
    path: Path, key: str, config: ShapesConfig, arch: str
) -> tuple[nn.Module, dict] | None:
    """The cached model and its info, or ``None`` for a missing, foreign or corrupt file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("key") != key:
            return None
        spec = _arch(arch)
        with seeded(0):  # the init is overwritten; the caller's RNG must not move
            model = spec.build(len(config.classes), spec.train["width"])
        model.load_state_dict(load_file(str(path)))
        info = json.loads(meta["info"])
    except Exception:  # a corrupt or foreign file: retrain and replace it
        return None
    info["cache_hit"] = True
    return model, info


def tiny_factory(
    config: ShapesConfig | dict[str, Any] | None = None,
    seed: int | None = None,
    cache: bool = True,
    *,
    arch: str = "tiny",
) -> NormalizedClassifier:
    """The ``"tiny"``, ``"tiny-b"``, ``"tiny-c"`` registry entries (``arch``): train once per
    ``(arch, config, seed)``, then load the cache (``seed`` defaults to the architecture's).

    The cache key holds the architecture, its version and recipe, the config and the seed;
    ``"tiny"`` keeps the key it had before the other two existed.

    The file (:func:`tiny_classifier_path`) is written atomically, with the cache key, the
    config JSON and ``info`` in its safetensors metadata; ``cache=False`` neither reads nor
    writes it. Returns an unprobed :class:`NormalizedClassifier` (no mean/std: the model
    normalises itself) with the shape names as ``classes`` and ``info["cache_hit"]``,
    ``info["cache_path"]`` set.
    """
    from filelock import FileLock
    from safetensors.torch import save_file

    if isinstance(config, dict):
        config = ShapesConfig(**config)
    config = config or ShapesConfig()
    seed = _arch(arch).seed if seed is None else seed
    path = tiny_classifier_path(config, seed, arch=arch)
    key, payload = _tiny_key(config, seed, arch)
    cached = _load_cached(path, key, config, arch) if cache else None
    if cached is None and cache:
        # one process trains, others (data-parallel ranks, test workers) wait and load its file
        lock = cache_dir() / "locks" / f"{path.name}.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(lock)):
            cached = _load_cached(path, key, config, arch)
            if cached is None:
                model, info = train_tiny_classifier(config, seed, arch=arch)
                info["cache_hit"] = False
                meta = {"key": key, "config": payload, "info": json.dumps(info)}
                state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
                with atomic_write(path) as tmp:
                    save_file(state, str(tmp), meta)
    if cached is not None:
        model, info = cached
    elif not cache:
        model, info = train_tiny_classifier(config, seed, arch=arch)
        info["cache_hit"] = False
    info["cache_path"] = str(path) if cache else None
    return NormalizedClassifier(
        model.eval(),
        classes=config.classes,
        input_size=(config.size, config.size),
        name=arch,
        info=info,
    )
