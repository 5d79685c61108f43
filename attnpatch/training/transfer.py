"""Transfer evaluation: one patch against several victim classifiers, in one table.

:func:`evaluate_transfer` scores a patch on every victim with the *same* placements and EOT
draws (one draw per image and EOT sample, shared by every victim and by the random-noise
control), so the rows are comparable: a difference between two rows is the victims', not the
dice's. With the same seed, the surrogate's row equals :func:`~attnpatch.training.evaluate_patch`
on that classifier (the draws are taken from the generator in the same order).

The label rule (column ``label_rule``), per victim:

* ``"label"`` — the victim shares the data's label space: its ``classes`` name every data class
  (its outputs are mapped by name), or, when one side has no names, its output width equals the
  number of data classes (the outputs are the labels). Success as in ``evaluate_patch``:
  untargeted, prediction != true label among the images it classifies right clean; targeted,
  prediction == target among the images not of the target class.
* ``"changed"`` — any other victim (e.g. a 1000-way ImageNet model on the shapes): its
  predictions cannot be compared with the labels, so success is "the prediction differs from
  the victim's own clean prediction", counted on every image, and clean accuracy is empty.
  A targeted patch cannot be scored this way: a target with such a victim is an error.

Each victim classifies the patched images resized (bilinear, antialiased) to its
``input_size`` when that differs from the images' size (the placement is drawn on the images).
:class:`TransferTable` prints as an aligned text table and writes ``transfer.csv``,
``transfer.json`` (with a description of every column) and ``transfer.png``
(:func:`attnpatch.viz.transfer_bars`). :func:`evaluate_transfer_file` is ``attnpatch evaluate``:
a saved patch, the held-out data and settings of its run (from the file's metadata), victims
by name.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._util import num_threads
from ..data import ImageFolder, ShapesConfig, shapes_dataset
from ..errors import AttnPatchError, ConfigError, DataError, InputError, RunFolderError
from ..images import resize
from ..models import TINY_CLASSIFIERS, NormalizedClassifier, classifier_names, load_classifier
from ..patch import AdversarialPatch
from .config import TrainConfig, config_from_dict
from .run import _held_tensors, _shapes_config, resolve_device
from .transfer_table import TransferRow, TransferTable

__all__ = ["evaluate_transfer", "evaluate_transfer_file", "TransferTable", "TransferRow"]

# --------------------------------------------------------------------------------------------
# The evaluation
# --------------------------------------------------------------------------------------------


def _victims(
    classifiers: Sequence[str | nn.Module], device: torch.device
) -> list[tuple[str, NormalizedClassifier]]:
    if isinstance(classifiers, (str, nn.Module)) or len(classifiers) == 0:
        raise ConfigError(
            "classifiers must be a non-empty list of names or classifiers, e.g. "
            "['tiny', 'tiny-b', 'tiny-c']"
        )
    given = [s for s in classifiers if isinstance(s, str)]
    if len(set(given)) < len(given):
        raise ConfigError(f"victims {given} name one twice; list each classifier once")
    out = []
    for spec in classifiers:
        clf = load_classifier(spec, device=device)
        name = spec if isinstance(spec, str) else (clf.name or type(spec).__name__)
        out.append((name, clf))
    names = [n for n, _ in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"victims {twice} appear twice; list each classifier once")
    return out


def _label_index(
    clf: NormalizedClassifier, class_names: Sequence[str] | None, num_labels: int
) -> torch.Tensor | None:
    """Data label -> the victim's output index (the ``"label"`` rule), or ``None``
    (``"changed"``)."""
    names, n = clf.classes, clf.num_classes
    if class_names is not None and names is not None:
        if all(c in names for c in class_names):
            return torch.tensor([names.index(c) for c in class_names])
        return None
    return torch.arange(n) if n == num_labels else None


def _definition(rule: str, target: str | None) -> str:
    if rule == "changed":
        return "prediction != the victim's clean prediction, on every image"
    if target is not None:
        return f"prediction == {target!r}, on images whose label is not {target!r}"
    return "prediction != true label, on images the victim classifies right clean"


def evaluate_transfer(
    patch: AdversarialPatch,
    classifiers: Sequence[str | nn.Module],
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    surrogate: str | None = None,
    target: int | str | None = None,
    eot_samples: int = 4,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
    batch_size: int = 64,
    control: AdversarialPatch | None = None,
) -> TransferTable:
    """Success of ``patch`` and of a random-noise control on every victim, EOT on.

    Args:
        patch: the trained patch (its placement and EOT settings are used, EOT forced on).
        classifiers: victims: names for :func:`~attnpatch.models.load_classifier`
            (``"tiny"``, ``"tiny-b"``, ``"torchvision:resnet50"``, ...) or modules
            (a :class:`~attnpatch.models.NormalizedClassifier` is used as it is), loaded on
            the patch's device.
        images: ``(N, 3, H, W)`` in [0, 1]; labels: ``(N,)`` data labels (indices into
            ``class_names``).
        surrogate: the name of the classifier the patch was trained against (its row is
            marked; if it is among the victims it must share the data's label space).
        target: the target class (a name, or a data label) of a targeted patch; ``None`` for
            untargeted.
        eot_samples: EOT draws per image; seed: seeds a private generator (torch's global RNG
            is untouched) drawing the control (unless given) and then every placement.
        class_names: the data's class names in label order; without them a victim is scored
            by label when its output width is ``labels.max() + 1``.
        batch_size: images per forward pass.

    Returns:
        A :class:`TransferTable`, rows in the order of ``classifiers``; see the module
        docstring for the label rule.
    """
    if images.ndim != 4 or images.shape[0] == 0 or labels.shape != (images.shape[0],):
        raise InputError(
            f"images must be (N, 3, H, W) with N >= 1 and labels (N,), got "
            f"{tuple(images.shape)} and {tuple(labels.shape)}; pass the held-out set"
        )
    if eot_samples < 1:
        raise InputError(f"eot_samples must be >= 1, got {eot_samples}")
    num_labels = len(class_names) if class_names is not None else int(labels.max()) + 1
    if isinstance(target, str):
        if class_names is None or target not in class_names:
            raise InputError(
                f"target {target!r} is not among the class names {class_names}; pass "
                "class_names= with it, or the target's label index"
            )
        target = list(class_names).index(target)
    if target is not None and not 0 <= target < num_labels:
        raise InputError(f"target label {target} is out of range 0..{num_labels - 1}")
    target_name = None if target is None else (class_names[target] if class_names else str(target))
    device = patch.pixels.device
    victims = _victims(classifiers, device)
    index = [_label_index(clf, class_names, num_labels) for _, clf in victims]
    changed = [name for (name, _), ix in zip(victims, index) if ix is None]
    if surrogate in changed:
        raise DataError(
            f"the data's classes {class_names} are not the surrogate {surrogate!r}'s "
            f"{victims[[n for n, _ in victims].index(surrogate)][1].classes}: the patch was "
            "trained on other classes; pass the held-out data of its run"
        )
    if target is not None and changed:
        raise ConfigError(
            f"victims {changed} do not share the data's classes, so a targeted patch cannot be "
            "scored on them; drop them or give them data-class outputs"
        )
    g = torch.Generator().manual_seed(seed)
    if control is None:
        control = patch.random_like(generator=g)
    clfs = [clf for _, clf in victims]
    clean, eligible, truth, hits = _count(
        patch, control, clfs, index, images, labels, target, eot_samples, g, batch_size
    )
    out = []
    for v, (name, clf) in enumerate(victims):
        n = int(eligible[v].sum()) * eot_samples
        rule = "changed" if index[v] is None else "label"
        acc = None if index[v] is None else float((clean[v] == truth[v]).float().mean())
        out.append(
            TransferRow(
                victim=name,
                surrogate=name == surrogate,
                label_rule=rule,
                success_definition=_definition(rule, target_name),
                clean_accuracy=acc,
                success_rate=float(hits[v, 0]) / max(n, 1),
                control_success_rate=float(hits[v, 1]) / max(n, 1),
                eligible=int(eligible[v].sum()),
                images=len(images),
                eot_samples=eot_samples,
                num_classes=int(clf.num_classes),
                input_size="x".join(map(str, clf.input_size)) if clf.input_size else "",
                target=target_name,
                seed=seed,
            )
        )
    return TransferTable(out, surrogate, None if class_names is None else list(class_names))


def _predict(clf: NormalizedClassifier, x: torch.Tensor) -> torch.Tensor:
    """The victim's predictions ``(B,)`` on ``x`` ``(B, 3, H, W)``, resized to its input size."""
    size = clf.input_size
    return clf(resize(x, tuple(size)) if size else x).argmax(1).cpu()


@torch.no_grad()
def _count(
    patch: AdversarialPatch,
    control: AdversarialPatch,
    victims: list[NormalizedClassifier],
    index: list[torch.Tensor | None],
    images: torch.Tensor,
    labels: torch.Tensor,
    target: int | None,
    eot_samples: int,
    g: torch.Generator,
    batch_size: int,
) -> tuple[list, list, list, torch.Tensor]:
    """Clean predictions, eligible images, the reference each prediction is compared with, and
    hits ``(V, 2)`` (patch, control) per victim, over one shared sequence of draws from ``g``."""
    device = patch.pixels.device
    starts = range(0, len(images), batch_size)
    clean = [
        torch.cat([_predict(clf, images[i : i + batch_size].to(device)) for i in starts])
        for clf in victims
    ]
    eligible, truth = [], []
    for c, ix in zip(clean, index):
        if ix is None:  # "changed": every image, against the clean prediction
            eligible.append(torch.ones(len(images), dtype=torch.bool))
            truth.append(c)
        else:
            y = ix[labels]
            eligible.append(c == y if target is None else labels != target)
            truth.append(y)
    hits = torch.zeros(len(victims), 2, dtype=torch.long)
    size = tuple(images.shape[-2:])
    for _ in range(eot_samples):
        for i in starts:
            rows = min(batch_size, len(images) - i)
            params = patch.sample_params(rows, size, eot=True, generator=g)
            x = images[i : i + batch_size].to(device)
            patched = [p(x, params=params)[0] for p in (patch, control)]
            for v, clf in enumerate(victims):
                keep, y = eligible[v][i : i + batch_size], truth[v][i : i + batch_size]
                for row, xp in enumerate(patched):
                    pred = _predict(clf, xp)
                    if index[v] is not None and target is not None:
                        hit = pred == index[v][target]
                    else:
                        hit = pred != y
                    hits[v, row] += int((hit & keep).sum())
    return clean, eligible, truth, hits


# --------------------------------------------------------------------------------------------
# attnpatch evaluate: a saved patch and its run
# --------------------------------------------------------------------------------------------


def _run_config(patch: AdversarialPatch, path: Path) -> TrainConfig | None:
    """The run's config from the patch file's metadata (``attnpatch train`` writes it)."""
    text = patch.extra.get("config")
    if text is None:
        return None
    try:
        return config_from_dict(json.loads(text))
    except (ValueError, AttnPatchError) as e:
        raise DataError(
            f"{str(path)!r} carries a run config that does not read ({e}); pass --data, "
            "--surrogate and --image-size yourself, or re-save the patch without it"
        ) from None


def _writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunFolderError(
            f"cannot create --out {str(out)!r} ({e}); choose another folder"
        ) from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise RunFolderError(f"--out {str(out)!r} is not writable; choose another folder")


def evaluate_transfer_file(
    patch_path: str | os.PathLike,
    classifiers: Sequence[str],
    *,
    data: str | None = None,
    surrogate: str | None = None,
    eot_samples: int | None = None,
    seed: int | None = None,
    image_size: int | None = None,
    device: str | None = None,
    out_dir: str | os.PathLike | None = None,
) -> TransferTable:
    """``attnpatch evaluate``: :func:`evaluate_transfer` of a saved patch on named victims.

    Defaults come from the run config in the patch file's metadata (written by ``attnpatch
    train``), else from :class:`TrainConfig`'s defaults: ``data`` = the run's ``data.eval``
    (``"synthetic"``: the run's held-out shapes), an image folder or a CSV; ``surrogate`` = its
    ``models.classifier``; ``eot_samples`` / ``seed`` = its ``eval.eot_samples`` /
    ``train.seed`` (so the surrogate's row reproduces the run's ``summary.json``); the target of
    a targeted run; ``image_size`` = its ``data.image_size``; ``device`` = its
    ``models.device``; its ``train.threads``. The tiny victims are built for the run's image size, and the
    surrogate gets the run's ``models.classifier_weights``. Every input is checked before any
    victim is built; ``out_dir`` receives ``transfer.csv``, ``transfer.json``, ``transfer.png``.
    """
    path = Path(patch_path)
    patch = AdversarialPatch.load(path)  # a missing file or a non-patch: clear errors
    cfg = _run_config(patch, path)
    run = cfg or TrainConfig()
    specs = [str(s).strip() for s in classifiers]
    if not specs or any(not s for s in specs):
        raise ConfigError(f"--classifiers needs names separated by commas, got {classifiers}")
    for spec in specs:
        if not spec.startswith(("torchvision:", "timm:")) and spec not in classifier_names():
            load_classifier(spec)  # raises the registry's message (close names, the list)
    if out_dir is not None:
        _writable(Path(out_dir))
    data = data or (run.data.eval if cfg else "synthetic")
    size = image_size or run.data.image_size
    held_cfg = dataclasses.replace(run, data=dataclasses.replace(run.data, image_size=size))
    if data == "synthetic":
        held = shapes_dataset(_shapes_config(held_cfg, run.train.seed + 1), "heldout")
    else:
        held = ImageFolder(data, size)
    classes = list(held.classes)
    if cfg and run.data.train == "synthetic" and classes != list(ShapesConfig().classes):
        raise DataError(
            f"the data's classes {classes} do not match the shapes the patch was trained on "
            f"{list(ShapesConfig().classes)}; pass --data synthetic or folders of those classes"
        )
    target = run.attack.target if cfg and run.attack.targeted else None
    if target is not None and target not in classes:
        raise DataError(
            f"the patch targets {target!r}, which is not a class of the data {classes}; pass "
            "--data with that class"
        )
    dev = resolve_device(device or run.models.device)
    tiny = ShapesConfig(size=run.data.image_size)
    victims = []
    for spec in specs:
        own = cfg is not None and spec == run.models.classifier
        weights = (run.models.classifier_weights or None) if own else None
        kwargs: dict[str, Any] = {"config": tiny} if spec in TINY_CLASSIFIERS else {}
        clf = load_classifier(spec, weights=weights, device=dev, **kwargs)
        clf.name = spec
        victims.append(clf)
    images, labels = _held_tensors(held)
    names = [run.data.class_map.get(c, c) for c in classes]  # matched by name, as in training
    target = None if target is None else run.data.class_map.get(target, target)
    with num_threads(run.train.threads):  # as the run evaluated (and as fast on busy cores)
        table = evaluate_transfer(
            patch.to(dev),
            victims,
            images,
            labels,
            surrogate=surrogate or (run.models.classifier if cfg else None),
            target=target,
            eot_samples=eot_samples or run.eval.eot_samples,
            seed=run.train.seed if seed is None else seed,
            class_names=names,
        )
    table.meta = {"patch": str(path), "data": data, "image_size": size, "run_config": bool(cfg)}
    if out_dir is not None:
        table.write(out_dir)
    return table
