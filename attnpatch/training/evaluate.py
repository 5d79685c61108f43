"""Attack success rate on held-out images, next to a random-noise control.

Both patches are applied with the *same* placements and EOT draws (one draw per image and EOT
sample, replayed for the control), so the difference between the two rates is the patch's
effect, not luck of placement.

* untargeted: success = prediction != true label, among images the classifier gets right clean;
* targeted: success = prediction == target, among images whose true label is not the target.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from ..errors import DataError, InputError
from ..patch import AdversarialPatch
from .distributed import SINGLE, Dist

__all__ = ["evaluate_patch", "EvalResult", "success_by_scale", "SCALES"]

#: The patch scales :func:`success_by_scale` sweeps by default (patch side / image side).
SCALES = (0.1, 0.2, 0.3, 0.4, 0.5)


@dataclass
class EvalResult:
    """Rates in [0, 1] and the counts behind them."""

    clean_accuracy: float
    success_rate: float
    control_success_rate: float
    eligible: int  #: images counted (clean-correct, or not of the target class)
    images: int
    eot_samples: int
    targeted: bool
    target: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        kind = f"targeted -> class {self.target}" if self.targeted else "untargeted"
        return (
            f"clean accuracy {self.clean_accuracy:.1%} on {self.images} held-out images | "
            f"attack success ({kind}, EOT on, {self.eot_samples} draws/image, "
            f"{self.eligible} eligible): patch {self.success_rate:.1%} vs random-noise control "
            f"{self.control_success_rate:.1%}"
        )


@torch.no_grad()
def evaluate_patch(
    classifier: nn.Module,
    patch: AdversarialPatch,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    target: int | None = None,
    eot_samples: int = 4,
    seed: int = 0,
    batch_size: int = 64,
    control: AdversarialPatch | None = None,
    dist: Dist = SINGLE,
) -> EvalResult:
    """Success rate of ``patch`` and of a random-noise control on ``images`` with EOT on.

    Args:
        classifier: ``(B, 3, H, W)`` in [0, 1] -> logits.
        patch: the trained patch (its placement and EOT settings are used, EOT forced on).
        images: ``(N, 3, H, W)`` in [0, 1]; labels: ``(N,)``.
        target: the target class for a targeted attack, ``None`` for untargeted.
        eot_samples: EOT draws per image.
        seed: seeds a private generator (torch's global RNG is not touched); the control is
            drawn from it too, unless given.
        control: the control patch (default: ``patch.random_like(...)``).
        dist: in a data-parallel run, each process classifies every ``world``-th batch (all
            draw every batch's placements, so the draws do not depend on ``world``) and the
            counts are summed: the rates equal the single-process ones.
    """
    if images.shape[0] == 0:
        raise DataError("no held-out images to evaluate on; point data.eval at images")
    if eot_samples < 1:
        raise InputError(f"eot_samples must be >= 1, got {eot_samples}")
    labels = torch.as_tensor(labels)
    if labels.shape != (images.shape[0],) or labels.is_floating_point():
        raise InputError(
            f"labels must be (N,) integers for N = {images.shape[0]} images, got "
            f"{tuple(labels.shape)} {labels.dtype}; pass one class index per image"
        )
    classifier.eval()
    device = patch.pixels.device
    _check_outputs(classifier, images[:1].to(device), labels, target)
    g = torch.Generator().manual_seed(seed)
    if control is None:
        control = patch.random_like(generator=g)
    starts = range(0, len(images), batch_size)
    mine = {i for k, i in enumerate(starts) if k % dist.world == dist.rank}
    correct = torch.zeros(len(images), dtype=torch.bool)
    for i in mine:
        pred = classifier(images[i : i + batch_size].to(device)).argmax(1).cpu()
        correct[i : i + batch_size] = pred == labels[i : i + batch_size]
    correct = dist.sum(correct.long()).bool()  # each image is classified by one process
    eligible = correct if target is None else labels != target
    hits = torch.zeros(2, dtype=torch.long)
    size = tuple(images.shape[-2:])
    for _ in range(eot_samples):
        for i in starts:
            rows = min(batch_size, len(images) - i)
            params = patch.sample_params(rows, size, eot=True, generator=g)  # every process
            if i not in mine:
                continue
            x = images[i : i + batch_size].to(device)
            y = labels[i : i + batch_size]
            keep = eligible[i : i + batch_size]
            for row, p in enumerate((patch, control)):
                pred = classifier(p(x, params=params)[0]).argmax(1).cpu()
                hit = pred != y if target is None else pred == target
                hits[row] += int((hit & keep).sum())
    hits = dist.sum(hits)
    n = int(eligible.sum()) * eot_samples
    return EvalResult(
        clean_accuracy=float(correct.float().mean()),
        success_rate=float(hits[0]) / max(n, 1),
        control_success_rate=float(hits[1]) / max(n, 1),
        eligible=int(eligible.sum()),
        images=int(images.shape[0]),
        eot_samples=eot_samples,
        targeted=target is not None,
        target=target,
    )


def _check_outputs(
    classifier: nn.Module, probe: torch.Tensor, labels: torch.Tensor, target: int | None
) -> None:
    """Labels and target must index the classifier's outputs (one probe image): a label past
    them can never be predicted, so its images would count as hits."""
    outputs = int(classifier(probe).shape[-1])
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= outputs:
        raise InputError(
            f"labels lie in [{lo}, {hi}] but the classifier has {outputs} outputs; labels must "
            "be the classifier's output indices (map data labels by class name: "
            "trainer.logit_index[labels])"
        )
    if target is not None and not 0 <= int(target) < outputs:
        raise InputError(
            f"target {target} is not an output of the classifier ({outputs} outputs); pass a "
            "class index below that"
        )


def at_scale(patch: AdversarialPatch, scale: float) -> AdversarialPatch:
    """A copy of ``patch`` (pixels, mask, position, EOT) placed at one fixed ``scale``: the
    placed patch's longer side as a fraction of the image's shorter side."""
    fixed = AdversarialPatch(
        patch.size,
        shape=patch.shape,
        init=patch.pixels.detach()[0].cpu(),
        scale=scale,
        position=patch.position,
        eot=replace(patch.eot),
        dtype=patch.pixels.dtype,
    ).to(patch.pixels.device)
    fixed.mask.copy_(patch.mask)
    return fixed


def success_by_scale(
    classifier: nn.Module,
    patch: AdversarialPatch,
    images: torch.Tensor,
    labels: torch.Tensor,
    scales: Sequence[float] = SCALES,
    *,
    target: int | None = None,
    eot_samples: int = 4,
    seed: int = 0,
    batch_size: int = 64,
) -> list[EvalResult]:
    """:func:`evaluate_patch` once per scale, with the patch's scale fixed to each value
    (:func:`at_scale`; Brown et al.'s success-vs-scale curve). Every scale uses the same
    ``seed``: the same random-noise control pixels, and within a scale the same placement and
    EOT draws for patch and control. Arguments as :func:`evaluate_patch`; ``scales`` are
    fractions of the image side (> 0; a patch that cannot fit is an error naming the scale).
    """
    if len(scales) == 0:
        raise InputError("scales is empty; pass patch scales, e.g. (0.1, 0.2, 0.3)")
    return [
        evaluate_patch(
            classifier,
            at_scale(patch, float(s)),
            images,
            labels,
            target=target,
            eot_samples=eot_samples,
            seed=seed,
            batch_size=batch_size,
        )
        for s in scales
    ]
