"""Loss modules: each a pure function plus a thin ``nn.Module``; every loss is minimised.

docs/losses.md gives each formula, what it compares, where it applies and a starting weight.

>>> import torch
>>> from attnpatch.losses import LossTerms, classifier_loss, total_variation
>>> logits, patch = torch.randn(2, 10), torch.rand(3, 8, 8)
>>> terms = LossTerms({"classifier": 10.0, "tv": 2.5})
>>> _ = terms.add("classifier", lambda: classifier_loss(logits, torch.tensor([3, 7])))
>>> _ = terms.add("tv", lambda: total_variation(patch))
>>> sorted(terms.as_dict())
['classifier', 'total', 'tv']
"""

from __future__ import annotations

from .attention import (
    REGION_MODES,
    CrossAttentionRegion,
    CrossAttentionVariance,
    SelfAttentionStructure,
    cross_attention_region,
    cross_attention_variance,
    label_map,
    self_attention_structure,
)
from .classifier import CLASSIFIER_LOSSES, ClassifierLoss, classifier_loss
from .image import (
    PRINTABLE_LEVELS,
    L2Norm,
    NonPrintabilityScore,
    TotalVariation,
    downsample_mask,
    l2_norm,
    non_printability_score,
    printable_palette,
    total_variation,
)
from .shares import GradientShares, term_gradients, update_shares
from .terms import LossTerms

__all__ = [
    "classifier_loss",
    "ClassifierLoss",
    "cross_attention_variance",
    "CrossAttentionVariance",
    "cross_attention_region",
    "CrossAttentionRegion",
    "self_attention_structure",
    "SelfAttentionStructure",
    "label_map",
    "l2_norm",
    "L2Norm",
    "total_variation",
    "TotalVariation",
    "non_printability_score",
    "NonPrintabilityScore",
    "printable_palette",
    "PRINTABLE_LEVELS",
    "downsample_mask",
    "LossTerms",
    "GradientShares",
    "term_gradients",
    "update_shares",
    "CLASSIFIER_LOSSES",
    "REGION_MODES",
]
