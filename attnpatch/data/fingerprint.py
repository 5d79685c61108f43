"""A labelled data set's fingerprint: what a run records of its training data, so a resumed run
can tell that the data changed underneath it.

* :class:`~attnpatch.data.ImageFolder`: every file's path (relative to the source), label and
  size in bytes; cheap (one ``stat`` per file), and it sees files added, removed, relabelled or
  replaced by another of a different size.
* in-memory sets (``get_batch`` / ``images``): the pixels and labels themselves.

>>> import torch
>>> from attnpatch.data import TensorImageDataset
>>> ds = TensorImageDataset(torch.zeros(2, 3, 4, 4), torch.tensor([0, 1]), ["a", "b"])
>>> fp = fingerprint(ds)
>>> fp["images"], fp["per_class"]
(2, {'a': 1, 'b': 1})
>>> describe_change(fp, fingerprint(ds)) is None
True
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from typing import Any

import torch

__all__ = ["fingerprint", "describe_change"]


def fingerprint(dataset: Any) -> dict[str, Any]:
    """``{"images", "classes", "per_class", "sha256"}`` of a labelled set (see the module)."""
    classes = [str(c) for c in getattr(dataset, "classes", [])]
    h = hashlib.sha256()
    h.update(repr(classes).encode())
    samples = getattr(dataset, "samples", None)
    if samples is not None:  # an ImageFolder: files, labels, sizes
        root = str(getattr(dataset, "source", ""))
        labels = [int(label) for _, label in samples]
        for path, label in samples:
            try:
                size = os.stat(path).st_size
            except OSError:
                size = -1  # gone: that is a change too
            rel = os.path.relpath(path, root) if root else path
            h.update(f"{rel}\0{label}\0{size}\n".encode())
    elif hasattr(dataset, "images") and hasattr(dataset, "labels"):  # in memory
        images, label_t = dataset.images, dataset.labels
        _update(h, images)
        labels = [int(v) for v in label_t.tolist()]
        h.update(repr(labels).encode())
    else:  # any other set: its items
        labels = []
        for i in range(len(dataset)):
            image, label = dataset[i]
            labels.append(int(label))
            _update(h, torch.as_tensor(image))
        h.update(repr(labels).encode())
    counts = Counter(labels)
    per_class = {name: counts.get(i, 0) for i, name in enumerate(classes)}
    return {
        "images": len(labels),
        "classes": classes,
        "per_class": per_class,
        "sha256": h.hexdigest(),
    }


def _update(h: Any, tensor: torch.Tensor) -> None:
    """Hash a tensor's dtype, shape and bytes (no copy when it is contiguous on the CPU)."""
    t = tensor.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())


def describe_change(before: dict[str, Any], now: dict[str, Any]) -> str | None:
    """``None`` when the two fingerprints agree, else what changed, in words."""
    if before.get("sha256") == now.get("sha256"):
        return None
    if before.get("classes") != now.get("classes"):
        return f"its classes were {before.get('classes')}, now {now.get('classes')}"
    a, b = before.get("per_class", {}), now.get("per_class", {})
    moved = [f"{c}: {a.get(c, 0)} -> {b.get(c, 0)}" for c in b if a.get(c, 0) != b.get(c, 0)]
    if moved:
        return (
            f"{before.get('images')} images then, {now.get('images')} now ({', '.join(moved[:5])})"
        )
    return f"the same {now.get('images')} images per class, but files were renamed or replaced"
