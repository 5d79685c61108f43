"""The patch layer: a trainable patch, its placement on images, and EOT.

* :class:`AdversarialPatch` — pixels ``(1, 3, h, w)`` in [0, 1], mask, save / load
  (:mod:`attnpatch.patch.patch`).
* :func:`apply_patch`, :class:`PatchParams`, :func:`sample_boxes` — differentiable placement
  (:mod:`attnpatch.patch.placement`).
* :class:`EOT` — the distribution of physical-world transforms; :class:`EOTDraw` one draw
  (:mod:`attnpatch.patch.eot`).
"""

from .eot import EOT, EOTDraw, eot_matrix, photometric
from .patch import MASK_SHAPES, AdversarialPatch, patch_mask
from .placement import POSITIONS, PatchParams, apply_patch, patch_matrix, sample_boxes

__all__ = [
    "AdversarialPatch",
    "PatchParams",
    "apply_patch",
    "patch_mask",
    "patch_matrix",
    "sample_boxes",
    "MASK_SHAPES",
    "POSITIONS",
    "EOT",
    "EOTDraw",
    "eot_matrix",
    "photometric",
]
