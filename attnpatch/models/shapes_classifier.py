"""The ``"tiny"`` classifier: a small CNN trained on the synthetic shapes, cached on disk.

:class:`TinyClassifier` maps ``(B, 3, H, W)`` RGB in [0, 1] to logits ``(B, num_classes)``;
:func:`tiny_classifier` builds an untrained one with seeded weights;
:func:`train_tiny_classifier` trains one on :func:`~attnpatch.data.shapes_dataset` in seconds on
CPU; :func:`tiny_factory` (registered as ``"tiny"``) trains once per ``(config, seed)`` and
then loads the cached weights from :func:`tiny_classifier_path`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._util import atomic_write, one_thread, seeded
from ..data import ShapesConfig, shapes_dataset
from ..errors import AttnPatchError
from .classifier import NormalizedClassifier

__all__ = [
    "TinyClassifier",
    "tiny_classifier",
    "train_tiny_classifier",
    "tiny_classifier_path",
    "cache_dir",
    "TINY_CLASSIFIER_VERSION",
]

#: Bump when the tiny classifier's training recipe changes: it is part of the cache key.
TINY_CLASSIFIER_VERSION = "tiny-classifier-v1"

_TINY_TRAIN = dict(epochs=10, batch_size=64, lr=2e-2, width=8)


class TinyClassifier(nn.Module):
    """A small CNN with BatchNorm: ``(B, 3, H, W)`` in [0, 1] -> logits ``(B, num_classes)``.

    It normalises its input itself (per-channel mean 0.5, std 0.25), like the registry's
    wrapped classifiers, so callers always pass [0, 1] RGB images.
    """

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer("mean", torch.full((1, 3, 1, 1), 0.5))
        self.register_buffer("std", torch.full((1, 3, 1, 1), 0.25))

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
        x = (images - self.mean) / self.std
        x = self.features(x)
        return self.head(x.mean(dim=(2, 3)))


def tiny_classifier(num_classes: int = 10, seed: int = 0, width: int = 16) -> TinyClassifier:
    """An untrained :class:`TinyClassifier` (eval mode, weights trainable)."""
    with seeded(seed):
        model = TinyClassifier(num_classes, width)
    return model.eval()


# --------------------------------------------------------------------------------------------
# Training and the cache
# --------------------------------------------------------------------------------------------


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
    """Train a :class:`TinyClassifier` on :func:`~attnpatch.data.shapes_dataset` (on CPU).

    Recipe: Adam with a one-cycle learning-rate schedule peaking at ``lr``, cross-entropy,
    mini-batches of ``batch_size`` in a seeded order, random horizontal flips (every shape
    class is closed under them, up to the rotation jitter). The model ends in eval mode.

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
    config = config or ShapesConfig()
    t0 = time.perf_counter()
    train = shapes_dataset(config, "train")
    heldout = shapes_dataset(config, "heldout")
    if len(train) == 0:
        raise AttnPatchError("train_per_class is 0: the tiny classifier needs training images")
    with one_thread():
        with seeded(seed):
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


def _load_cached(path: Path, key: str, config: ShapesConfig) -> tuple[nn.Module, dict] | None:
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
        model = TinyClassifier(len(config.classes), _TINY_TRAIN["width"])
        model.load_state_dict(load_file(str(path)))
        info = json.loads(meta["info"])
    except Exception:  # a corrupt or foreign file: retrain and replace it
        return None
    info["cache_hit"] = True
    return model, info


def tiny_factory(
    config: ShapesConfig | dict[str, Any] | None = None, seed: int = 0, cache: bool = True
) -> NormalizedClassifier:
    """The ``"tiny"`` registry entry: train once per ``(config, seed)``, then load the cache.

    The file (:func:`tiny_classifier_path`) is written atomically, with the cache key, the
    config JSON and ``info`` in its safetensors metadata; ``cache=False`` neither reads nor
    writes it. Returns an unprobed :class:`NormalizedClassifier` (no mean/std: the model
    normalises itself) with the shape names as ``classes`` and ``info["cache_hit"]``,
    ``info["cache_path"]`` set.
    """
    from safetensors.torch import save_file

    if isinstance(config, dict):
        config = ShapesConfig(**config)
    config = config or ShapesConfig()
    path = tiny_classifier_path(config, seed)
    key, payload = _tiny_key(config, seed, _TINY_TRAIN)
    cached = _load_cached(path, key, config) if cache else None
    if cached is not None:
        model, info = cached
    else:
        model, info = train_tiny_classifier(config, seed, **_TINY_TRAIN)
        info["cache_hit"] = False
        if cache:
            meta = {"key": key, "config": payload, "info": json.dumps(info)}
            state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
            with atomic_write(path) as tmp:
                save_file(state, str(tmp), meta)
    info["cache_path"] = str(path) if cache else None
    return NormalizedClassifier(
        model.eval(),
        classes=config.classes,
        input_size=(config.size, config.size),
        name="tiny",
        info=info,
    )
