"""Classifier losses on logits: cross-entropy and the Carlini-Wagner margin, (un)targeted.

Every loss is minimised:

============  =====================================  ===================================
kind          untargeted (push label ``y`` down)     targeted (pull label ``t`` up)
============  =====================================  ===================================
``"ce"``      ``-CE(z, y) = log softmax(z)_y``       ``CE(z, t) = -log softmax(z)_t``
``"cw"``      ``max(z_y - max_{j!=y} z_j, -kappa)``  ``max(max_{j!=t} z_j - z_t, -kappa)``
============  =====================================  ===================================

Untargeted ``"ce"`` (DiffAttack's choice) is unbounded below: once the image is misclassified
``log p_y`` keeps falling towards -inf, so in a weighted sum it can grow to dominate the other
terms and keep pushing pixels after the attack already succeeded. ``"cw"`` is the bounded
alternative: it stops at ``-kappa`` once the label's logit trails the best other logit by
``kappa`` (a confidence margin), and its gradient is then exactly 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ._reduce import check_reduction, reduce

__all__ = ["classifier_loss", "ClassifierLoss", "CLASSIFIER_LOSSES"]

#: The classifier loss kinds: cross-entropy, Carlini-Wagner margin.
CLASSIFIER_LOSSES = ("ce", "cw")
_KINDS = CLASSIFIER_LOSSES


def _check_options(kind: str, kappa: float) -> None:
    if kind not in _KINDS:
        raise InputError(
            f"kind must be 'ce' (cross-entropy) or 'cw' (Carlini-Wagner margin), got {kind!r}"
        )
    if not (kappa >= 0.0 and kappa < float("inf")):  # also rejects NaN
        raise InputError(f"kappa must be a finite number >= 0, got {kappa!r}")
    if kind == "ce" and kappa != 0.0:
        raise InputError(f"kappa={kappa} only applies to kind='cw'; pass kind='cw' or drop kappa")


def _labels_tensor(
    labels: torch.Tensor | int | Sequence[int], logits: torch.Tensor
) -> torch.Tensor:
    batch, classes = logits.shape
    if isinstance(labels, bool):
        raise InputError("labels must be class indices (ints), got a bool")
    if isinstance(labels, int):
        labels = torch.full((batch,), labels, dtype=torch.long)
    elif not isinstance(labels, torch.Tensor):
        try:
            labels = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError):
            raise InputError(
                f"labels must be a LongTensor (B,), a list of ints, or an int, got "
                f"{type(labels).__name__}"
            ) from None
    if labels.is_floating_point() or labels.dtype == torch.bool:
        hint = ""
        if labels.shape == logits.shape:
            hint = " They look like one-hot / probabilities: pass labels.argmax(dim=1)."
        raise InputError(f"labels must be integer class indices, got dtype {labels.dtype}.{hint}")
    if labels.ndim == 0:
        labels = labels.expand(batch)
    if labels.shape != (batch,):
        raise InputError(
            f"labels must have shape (B,) = ({batch},) to match logits {tuple(logits.shape)}, "
            f"got {tuple(labels.shape)}"
        )
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= classes:
        bad = lo if lo < 0 else hi
        raise InputError(
            f"label {bad} is out of range for {classes} classes (valid: 0..{classes - 1}); "
            f"check the dataset's label mapping against the classifier's"
        )
    return labels.to(device=logits.device, dtype=torch.long)


def classifier_loss(
    logits: torch.Tensor,
    labels: torch.Tensor | int | Sequence[int],
    *,
    targeted: bool = False,
    kind: str = "ce",
    kappa: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Adversarial classifier loss; minimising it fools the classifier.

    Args:
        logits: ``(B, C)`` raw classifier outputs (before softmax), ``C >= 2``.
        labels: ``(B,)`` integer class indices (a list of ints, or one int for the whole
            batch): the true labels (``targeted=False``) or the targets (``targeted=True``).
        targeted: ``False`` pushes the true label down; ``True`` pulls the target label up.
        kind: ``"ce"`` (cross-entropy) or ``"cw"`` (Carlini-Wagner logit margin).
        kappa: the ``"cw"`` confidence margin ``>= 0``; the loss stops improving at ``-kappa``.
        reduction: ``"mean"`` over the batch (default), ``"sum"``, ``"none"`` -> ``(B,)``.

    Returns:
        A scalar (or ``(B,)``). Ranges: untargeted ce ``(-inf, 0]``, targeted ce ``[0, inf)``,
        cw ``[-kappa, inf)``. See the module docstring for the formulas.

    >>> logits = torch.tensor([[2.0, 0.0, 1.0]])
    >>> classifier_loss(logits, torch.tensor([0]), kind="cw")  # z_0 - max(z_1, z_2)
    tensor(1.)
    >>> classifier_loss(logits, 2, targeted=True, kind="cw", kappa=0.5)  # max(2 - 1, -0.5)
    tensor(1.)
    """
    check_reduction(reduction)
    _check_options(kind, kappa)
    if not isinstance(logits, torch.Tensor):
        raise InputError(f"logits must be a torch.Tensor (B, C), got {type(logits).__name__}")
    if logits.ndim != 2:
        hint = " (add a batch dimension: logits.unsqueeze(0))" if logits.ndim == 1 else ""
        raise InputError(f"logits must be 2-D (B, C), got shape {tuple(logits.shape)}{hint}")
    if not logits.is_floating_point():
        raise InputError(f"logits must be floating point, got {logits.dtype}")
    if logits.shape[1] < 2:
        raise InputError(f"logits need at least 2 classes, got shape {tuple(logits.shape)}")
    y = _labels_tensor(labels, logits)

    if kind == "ce":
        ce = F.cross_entropy(logits, y, reduction="none")
        values = ce if targeted else -ce
    else:
        label_logit = logits.gather(1, y[:, None])[:, 0]
        others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
        best_other = others.amax(dim=1)
        margin = best_other - label_logit if targeted else label_logit - best_other
        values = margin.clamp_min(-kappa)
    return reduce(values, reduction)


class ClassifierLoss(nn.Module):
    """Module form of :func:`classifier_loss`: ``ClassifierLoss(kind="cw", kappa=5)(logits, y)``."""

    def __init__(
        self,
        targeted: bool = False,
        kind: str = "ce",
        kappa: float = 0.0,
        reduction: str = "mean",
    ):
        super().__init__()
        check_reduction(reduction)
        _check_options(kind, kappa)
        self.targeted = targeted
        self.kind = kind
        self.kappa = kappa
        self.reduction = reduction

    def forward(
        self, logits: torch.Tensor, labels: torch.Tensor | int | Sequence[int]
    ) -> torch.Tensor:
        return classifier_loss(
            logits,
            labels,
            targeted=self.targeted,
            kind=self.kind,
            kappa=self.kappa,
            reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return (
            f"targeted={self.targeted}, kind={self.kind!r}, kappa={self.kappa}, "
            f"reduction={self.reduction!r}"
        )
