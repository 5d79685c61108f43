"""Data labels -> the classifier's outputs, by class name.

A data set's labels index its ``classes`` (sorted folder names, CSV labels); a classifier's
outputs index its own ``classes`` when it names them (the tiny classifiers, torchvision weights'
categories). The two are matched **by name**, never by position: a folder named ``Cat`` is not
output 0 because it sorts first. ``data.class_map`` maps data names that differ from the
classifier's (``{"kitty": "tabby cat"}``). Only a classifier that names no classes is matched by
position, and only when the counts agree.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..errors import ConfigError, DataError
from ..models import probe_classifier

__all__ = ["class_indices"]


def class_indices(
    classifier: nn.Module,
    classes: Sequence[str],
    image_size: int,
    class_map: Mapping[str, str] | None = None,
) -> torch.Tensor:
    """``(len(classes),)`` int64: data label -> classifier output index.

    Args:
        classifier: ``(B, 3, H, W)`` in [0, 1] -> logits ``(B, C)`` (probed once here); its
            ``classes`` attribute, when set, names the ``C`` outputs.
        classes: the data's class names, in label order.
        image_size: the probe's side.
        class_map: data class name -> classifier class name, for names that differ.

    Raises :class:`~attnpatch.errors.DataError` for a data class the classifier does not name
    (naming it, with the closest names), and :class:`~attnpatch.errors.ConfigError` for a
    ``class_map`` that names no data class or maps two classes to one output.
    """
    class_map = dict(class_map or {})
    n = probe_classifier(classifier, image_size)
    names = getattr(classifier, "classes", None)
    stray = [k for k in class_map if k not in classes]
    if stray:
        raise ConfigError(
            f"data.class_map names {stray[:5]}, which are not classes of the data {list(classes)}; "
            "map the data's class names (folder names or CSV labels)"
        )
    if names is None:
        if class_map:
            raise ConfigError(
                "data.class_map needs a classifier that names its classes (a .classes attribute); "
                "this one does not: drop data.class_map, or register the classifier with classes="
            )
        if n == len(classes):
            return torch.arange(n)  # nothing to match by: the outputs are the labels
        raise DataError(
            f"the classifier has {n} outputs but the data has {len(classes)} classes "
            f"{list(classes)}, and it names no output; use a classifier trained on these classes, "
            "or one whose .classes names them (e.g. torchvision weights' categories)"
        )
    names = [str(c) for c in names]
    wanted = [class_map.get(c, c) for c in classes]
    unknown = [(c, w) for c, w in zip(classes, wanted) if w not in names]
    if unknown:
        c, w = unknown[0]
        close = difflib.get_close_matches(w, names, n=3)
        hint = f" (closest: {close})" if close else ""
        shown = [u for u, _ in unknown[:5]]
        raise DataError(
            f"data class(es) {shown} are not classes of the classifier, which names "
            f"{len(names)} (e.g. {names[:5]}){hint}; classes are matched by name, not by "
            f"position: rename the class folders to the classifier's names, or map them with "
            f"--data.class_map {c}=<the classifier's name>"
        )
    twice = sorted({w for w in wanted if wanted.count(w) > 1})
    if twice:
        raise ConfigError(
            f"two data classes map to the classifier's {twice[0]!r}; each data class needs its "
            "own output: fix data.class_map"
        )
    return torch.tensor([names.index(w) for w in wanted])
