"""The data layer: labelled image sets, a resumable batch order, the synthetic shapes world.

Every image is classifier-side: ``(3, H, W)`` float RGB in [0, 1] (a batch is ``(B, 3, H, W)``),
with an ``int`` label indexing ``dataset.classes``.

* :class:`ImageFolder` reads a folder with one subfolder per class, or a CSV of ``path,label``;
  :class:`TensorImageDataset` is an in-memory set; :func:`write_image_folder` writes any set
  out as an image folder; :func:`read_image` reads one file (:mod:`attnpatch.data.folder`).
* :func:`batches` yields ``(iteration, images, labels)`` in an order that depends only on
  ``(seed, iteration)``, never on torch's global RNG, so a resumed run sees exactly the batches
  an uninterrupted one would (:mod:`attnpatch.data.batching`).
* :class:`ShapesConfig` / :func:`shapes_dataset` generate the embedded demo's labelled images
  (coloured shapes on textured backgrounds; no downloads) (:mod:`attnpatch.data.shapes`);
  :func:`shape_captions` describes them for text-to-image training (:mod:`.captions`).
* :func:`fingerprint` records a set's files (or pixels) so a resumed run sees a change
  (:mod:`attnpatch.data.fingerprint`).

>>> train = shapes_dataset(ShapesConfig(train_per_class=2, heldout_per_class=1))
>>> train.classes
['circle', 'cross', 'square', 'star', 'triangle']
>>> it, images, labels = next(batches(train, 4, seed=0))
>>> it, tuple(images.shape), tuple(labels.shape)
(0, (4, 3, 32, 32), (4,))
"""

from .batching import batch_indices, batches, batches_per_epoch
from .captions import COLOUR_WORDS, colour_names, shape_captions
from .fingerprint import describe_change, fingerprint
from .folder import (
    IMAGE_EXTENSIONS,
    ImageFolder,
    TensorImageDataset,
    read_image,
    write_image_folder,
)
from .shapes import SHAPE_CLASSES, SHAPES, ShapesConfig, render_shapes, shapes_dataset

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFolder",
    "TensorImageDataset",
    "batches",
    "batch_indices",
    "batches_per_epoch",
    "SHAPE_CLASSES",
    "SHAPES",
    "ShapesConfig",
    "shapes_dataset",
    "render_shapes",
    "COLOUR_WORDS",
    "colour_names",
    "shape_captions",
    "write_image_folder",
    "read_image",
    "fingerprint",
    "describe_change",
]
