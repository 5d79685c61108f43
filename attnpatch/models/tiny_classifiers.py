"""The architectures of the ``"tiny-b"`` and ``"tiny-c"`` classifiers (and their common base).

Three small networks classify the synthetic shapes, each of a different design, so that a patch
trained against one can be tested for *transfer* to the others offline:

* ``"tiny"`` — :class:`~attnpatch.models.shapes_classifier.TinyClassifier`: three conv blocks
  with BatchNorm and max-pooling, global average pooling.
* ``"tiny-b"`` — :class:`TinyResNet`: a stride-2 stem and three residual blocks with
  GroupNorm (one channel per group at the stem's width, no BatchNorm), global average pooling.
* ``"tiny-c"`` — :class:`TinyStridedCNN`: two wide strided convolutions (5x5 then 3x3, no
  normalisation, no pooling layers) read out by a global *max* over positions.

Every one takes ``(B, 3, H, W)`` RGB in [0, 1], normalises it itself (per-channel mean 0.5,
std 0.25: :class:`ShapesNet`) and returns logits ``(B, num_classes)``; each accepts any
``H, W >= 8`` (the readouts pool over positions). Training and the cache live in
:mod:`attnpatch.models.shapes_classifier`.

>>> import torch
>>> TinyResNet(5)(torch.rand(2, 3, 32, 32)).shape, TinyStridedCNN(5)(torch.rand(2, 3, 32, 32)).shape
(torch.Size([2, 5]), torch.Size([2, 5]))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ShapesNet", "TinyResNet", "TinyStridedCNN"]


class ShapesNet(nn.Module):
    """Base of the tiny shapes classifiers: ``num_classes`` and the input normalisation.

    :meth:`normalise` maps ``(B, 3, H, W)`` in [0, 1] to ``(x - 0.5) / 0.25`` per channel
    (buffers ``mean`` and ``std``, so they travel with the weights file).
    """

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer("mean", torch.full((1, 3, 1, 1), 0.5))
        self.register_buffer("std", torch.full((1, 3, 1, 1), 0.25))

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std


class _ResidualBlock(nn.Module):
    """conv3x3(stride) -> GN -> ReLU -> conv3x3 -> GN, plus the (1x1, strided) shortcut; ReLU."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(groups, cout)
        same = cin == cout and stride == 1
        self.shortcut = nn.Identity() if same else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(y)) + self.shortcut(x))


class TinyResNet(ShapesNet):
    """``"tiny-b"``: a small residual net with GroupNorm, ``(B, 3, H, W)`` in [0, 1] -> logits.

    Stem conv3x3 stride 2 (``width`` channels) -> residual blocks at ``width`` (stride 1),
    ``2 width`` and ``4 width`` (stride 2 each) -> mean over positions -> linear. GroupNorm
    with ``width`` groups (one channel per group at the stem: per-image, per-channel
    normalisation, so no batch statistics anywhere). About 20k weights at ``width=8``.
    """

    def __init__(self, num_classes: int = 5, width: int = 8):
        super().__init__(num_classes)
        g = width
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.GroupNorm(g, width), nn.ReLU()
        )
        self.blocks = nn.Sequential(
            _ResidualBlock(width, width, 1, g),
            _ResidualBlock(width, 2 * width, 2, g),
            _ResidualBlock(2 * width, 4 * width, 2, g),
        )
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(self.normalise(images)))
        return self.head(x.mean(dim=(2, 3)))


class TinyStridedCNN(ShapesNet):
    """``"tiny-c"``: a wide, shallow CNN of strided convolutions, ``(B, 3, H, W)`` in [0, 1]
    -> logits.

    conv5x5 stride 2 (``width`` channels) -> ReLU -> conv3x3 stride 2 (``2 width``) -> ReLU ->
    max over positions -> linear. No normalisation layers and no pooling layers: the two
    strides do all the downsampling and the global max reads out where a feature fires most.
    About 21k weights at ``width=32``.
    """

    def __init__(self, num_classes: int = 5, width: int = 32):
        super().__init__(num_classes)
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 5, 2, 2),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, 2, 1),
            nn.ReLU(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.features(self.normalise(images))
        return self.head(x.amax(dim=(2, 3)))
