"""Attention losses on maps from an ``AttentionStore``.

Map layouts (what ``AttentionStore.aggregate`` returns):

* cross-attention ``(B, h, w, K)``: for each of the ``h*w`` image positions (queries), the
  attention probabilities over the ``K`` text tokens (``K = 77``; each row sums to 1 over ``K``),
  averaged over heads, layers and steps;
* self-attention ``(B, h, w, h*w)``: rows sum to 1 over the ``h*w`` keys; one tensor, or a
  ``dict`` / ``list`` of per-layer tensors.

Token positions (``tokens``) index the ``K`` axis, e.g. from
``token_indices(tokenizer, prompt, word)``. Accepted forms: an int, a list/tuple of ints, a 1-D
integer tensor (the same positions for every image), or per image a list of such lists / a
``(B, n)`` integer tensor (a batch of different prompts).

The label map of image ``b`` is ``A_b(y, x) = mean_{k in tokens_b} maps[b, y, x, k]``, shape
``(h, w)``. Every loss here is minimised.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..errors import InputError
from ._reduce import check_reduction, reduce
from .image import downsample_mask

__all__ = [
    "REGION_MODES",
    "cross_attention_variance",
    "cross_attention_region",
    "self_attention_structure",
    "label_map",
    "CrossAttentionVariance",
    "CrossAttentionRegion",
    "SelfAttentionStructure",
    "Tokens",
    "SelfMaps",
]

#: Token positions: one list for the whole batch, or one list per image.
Tokens = int | Sequence[int] | torch.Tensor | Sequence[Sequence[int]] | Sequence[torch.Tensor]
#: Self-attention maps: one ``(B, h, w, h*w)`` tensor, or per-layer tensors.
SelfMaps = torch.Tensor | Mapping[str, torch.Tensor] | Sequence[torch.Tensor]

REGION_MODES = _MODES = ("repel", "attract")  #: :func:`cross_attention_region`'s modes
_TOKEN_FIX = "take positions from token_indices(tokenizer, prompt, word)"


def _check_cross_maps(maps: object, name: str = "maps") -> torch.Tensor:
    if not isinstance(maps, torch.Tensor):
        raise InputError(
            f"{name} must be a cross-attention tensor (B, h, w, K), got {type(maps).__name__}; "
            f"get it from AttentionStore.aggregate(kind='cross', resolution=(h, w))"
        )
    if maps.ndim != 4:
        hint = (
            ": a (B, h*w, K) map needs maps.unflatten(1, (h, w))"
            if maps.ndim == 3
            else ": use AttentionStore.aggregate(kind='cross', resolution=(h, w))"
        )
        raise InputError(f"{name} must be 4-D (B, h, w, K), got shape {tuple(maps.shape)}{hint}")
    if not maps.is_floating_point():
        raise InputError(f"{name} must be floating point, got {maps.dtype}")
    return maps


def _as_index_list(item: object, where: str) -> list[int]:
    if isinstance(item, torch.Tensor):
        if item.dtype == torch.bool or item.is_floating_point() or item.is_complex():
            raise InputError(
                f"token positions{where} must be an integer tensor, got {item.dtype}; {_TOKEN_FIX}"
            )
        if item.ndim > 1:
            raise InputError(f"token positions{where} must be 1-D, got shape {tuple(item.shape)}")
        return [int(i) for i in item.reshape(-1).tolist()]
    if isinstance(item, bool):
        raise InputError(f"token positions{where} must be ints, got a bool; {_TOKEN_FIX}")
    if isinstance(item, (list, tuple)):
        out = []
        for i in item:
            if isinstance(i, (bool, list, tuple)) or (isinstance(i, torch.Tensor) and i.ndim):
                raise InputError(
                    f"token positions{where} must be ints, got {type(i).__name__} {i!r}; "
                    f"{_TOKEN_FIX}"
                )
            try:
                out.append(operator.index(i))
            except TypeError:
                raise InputError(
                    f"token positions{where} must be ints, got {type(i).__name__} {i!r}; "
                    f"{_TOKEN_FIX}"
                ) from None
        return out
    try:
        return [operator.index(item)]
    except TypeError:
        raise InputError(
            f"tokens must be an int, a list of ints, a 1-D integer tensor, or one such list per "
            f"image; got {type(item).__name__}. {_TOKEN_FIX}"
        ) from None


def _per_image_tokens(tokens: Tokens, batch: int) -> tuple[list[list[int]], bool]:
    """Normalise ``tokens`` to one list of positions per image; also say if they are shared."""
    per_image = (
        isinstance(tokens, torch.Tensor)
        and tokens.ndim == 2
        or (
            isinstance(tokens, (list, tuple))
            and len(tokens) > 0
            and all(
                isinstance(t, (list, tuple)) or (isinstance(t, torch.Tensor) and t.ndim == 1)
                for t in tokens
            )
        )
    )
    if not per_image:
        shared = _as_index_list(tokens, "")
        return [shared] * batch, True
    lists = [_as_index_list(t, f" of image {b}") for b, t in enumerate(tokens)]
    if len(lists) != batch:
        raise InputError(
            f"tokens has {len(lists)} per-image lists but the maps have batch {batch}; pass one "
            f"list per image, or one flat list for all images"
        )
    return lists, False


def _token_weights(
    tokens: Tokens, batch: int, keys: int, *, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """``(B, K)`` averaging weights: ``1 / n_b`` at image ``b``'s ``n_b`` positions, else 0."""
    lists, shared = _per_image_tokens(tokens, batch)
    weights = torch.zeros(batch, keys, dtype=dtype)
    for b, idx in enumerate(lists):
        where = "" if shared else f" (image {b})"
        if not idx:
            raise InputError(
                f"no token positions given{where}: the word was not found in the prompt? "
                f"{_TOKEN_FIX}"
            )
        bad = [i for i in idx if not 0 <= i < keys]
        if bad:
            raise InputError(
                f"token position {bad[0]}{where} is out of range for maps with {keys} text "
                f"tokens (valid: 0..{keys - 1}); {_TOKEN_FIX}"
            )
        if len(set(idx)) != len(idx):
            dup = next(i for i in idx if idx.count(i) > 1)
            raise InputError(f"token position {dup} is given twice{where}; pass each position once")
        weights[b, idx] = 1.0 / len(idx)
    return weights.to(device)


def label_map(maps: torch.Tensor, tokens: Tokens) -> torch.Tensor:
    """The label tokens' cross-attention map: ``(B, h, w, K)`` -> ``(B, h, w)``.

    ``A_b(y, x) = mean_{k in tokens_b} maps[b, y, x, k]``; values in [0, 1] when the rows of
    ``maps`` sum to 1.

    >>> maps = torch.softmax(torch.randn(2, 4, 4, 77), dim=-1)
    >>> label_map(maps, [1, 2]).shape
    torch.Size([2, 4, 4])
    """
    maps = _check_cross_maps(maps)
    weights = _token_weights(
        tokens, maps.shape[0], maps.shape[-1], device=maps.device, dtype=maps.dtype
    )
    # Multiply-and-sum rather than einsum: float64 matmuls are slow on CPU (gradcheck).
    return (maps * weights[:, None, None, :]).sum(dim=-1)


def cross_attention_variance(
    maps: torch.Tensor, tokens: Tokens, *, reduction: str = "mean"
) -> torch.Tensor:
    """DiffAttack's "deceive" loss: the spatial variance of the label tokens' attention map.

    Per image: ``Var(A_b) = mean_{y,x} (A_b(y, x) - mean(A_b))**2`` with ``A_b`` from
    :func:`label_map` (the population variance over the ``h*w`` positions: defined, and 0, even
    for a 1x1 map), then reduced over the batch. Minimising it spreads the label's attention
    evenly over the image, so the UNet no longer "sees" the object where it is.

    Args:
        maps: cross-attention ``(B, h, w, K)``, rows summing to 1 over ``K``.
        tokens: the label word's token positions (see the module docstring for the forms).
        reduction: ``"mean"`` over the batch (default), ``"sum"``, ``"none"`` -> ``(B,)``.

    Returns:
        A scalar in [0, 0.25] (or ``(B,)``), in practice far smaller (attention probabilities
        are mostly near 0): DiffAttack weighs this loss 10000.

    >>> maps = torch.full((1, 2, 2, 77), 1 / 77)
    >>> cross_attention_variance(maps, [5])
    tensor(0.)
    """
    check_reduction(reduction)
    amap = label_map(maps, tokens).flatten(1)  # (B, h*w)
    values = (amap - amap.mean(dim=1, keepdim=True)).square().mean(dim=1)
    return reduce(values, reduction)


def cross_attention_region(
    maps: torch.Tensor,
    mask: torch.Tensor,
    tokens: Tokens,
    *,
    mode: str = "repel",
    reduction: str = "mean",
    eps: float = 1e-12,
) -> torch.Tensor:
    """Share of the label tokens' attention mass that falls on the patch.

    Per image: ``s_b = sum_{y,x} A_b(y, x) m_b(y, x) / sum_{y,x} A_b(y, x)`` in [0, 1], with
    ``A_b`` from :func:`label_map` and ``m_b`` the patch mask averaged down to the maps'
    resolution (:func:`~attnpatch.losses.image.downsample_mask`: the fraction of each map cell
    the patch covers). The loss is ``s_b`` for ``mode="repel"`` (keep the label's attention off
    the patch: an inconspicuous patch) and ``1 - s_b`` for ``mode="attract"`` (draw it onto the
    patch); both lie in [0, 1] and are minimised.

    Args:
        maps: cross-attention ``(B, h, w, K)``.
        mask: the patch mask ``(B, 1, H, W)`` or ``(B, H, W)`` in [0, 1], batch ``B`` or 1, at
            the resolution of the image that produced the maps: ``H = f*h`` and ``W = f*w`` for
            one integer ``f >= 1`` (else :class:`~attnpatch.errors.InputError`).
        tokens: the label word's token positions.
        mode: ``"repel"`` (default) or ``"attract"``.
        reduction: ``"mean"`` over the batch (default), ``"sum"``, ``"none"`` -> ``(B,)``.
        eps: lower bound of the denominator (an all-zero label map gives ``s_b = 0``).

    >>> maps = torch.zeros(1, 2, 2, 77); maps[..., 0] = 1; maps[0, 0, 0] = 0; maps[0, 0, 0, 5] = 1
    >>> mask = torch.zeros(1, 1, 16, 16); mask[..., :8, :8] = 1   # covers map cell (0, 0)
    >>> cross_attention_region(maps, mask, [5])
    tensor(1.)
    """
    check_reduction(reduction)
    if mode not in _MODES:
        raise InputError(
            f"mode must be 'repel' (attention off the patch) or 'attract' (onto it), got {mode!r}"
        )
    amap = label_map(maps, tokens)  # (B, h, w)
    batch, h, w = amap.shape
    weights = downsample_mask(mask, (h, w))[:, 0]  # (B or 1, h, w)
    if weights.shape[0] not in (1, batch):
        raise InputError(
            f"mask has batch {weights.shape[0]} but the maps have batch {batch}; pass one mask "
            f"per image or a single mask (batch 1) for all"
        )
    inside = (amap * weights.to(amap.dtype)).flatten(1).sum(dim=1)
    total = amap.flatten(1).sum(dim=1).clamp_min(eps)
    share = inside / total
    values = share if mode == "repel" else 1.0 - share
    return reduce(values, reduction)


def _as_pairs(maps: SelfMaps, reference: SelfMaps) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    if isinstance(maps, torch.Tensor):
        if not isinstance(reference, torch.Tensor):
            raise InputError(
                f"maps is one tensor but reference is a {type(reference).__name__}; compute the "
                f"reference with the same AttentionStore settings as the maps"
            )
        return [("maps", maps, reference)]
    if isinstance(maps, Mapping):
        if not isinstance(reference, Mapping):
            raise InputError(
                f"maps is a dict but reference is a {type(reference).__name__}; pass the "
                f"reference in the same structure (a dict with the same layer names)"
            )
        if set(maps) != set(reference):
            missing = sorted(set(maps) - set(reference))
            extra = sorted(set(reference) - set(maps))
            raise InputError(
                f"maps and reference have different layers: missing from reference {missing}, "
                f"only in reference {extra}; record both with the same layers and resolutions"
            )
        return [(str(k), maps[k], reference[k]) for k in maps]
    if isinstance(maps, (list, tuple)):
        if not isinstance(reference, (list, tuple)):
            raise InputError(
                f"maps is a list but reference is a {type(reference).__name__}; pass the "
                f"reference in the same structure (a list of the same length)"
            )
        if len(maps) != len(reference):
            raise InputError(
                f"maps has {len(maps)} layers but reference has {len(reference)}; record both "
                f"with the same layers and resolutions"
            )
        return [(f"[{i}]", m, r) for i, (m, r) in enumerate(zip(maps, reference))]
    raise InputError(
        f"self-attention maps must be a tensor (B, h, w, h*w) or a dict/list of them, got "
        f"{type(maps).__name__}"
    )


def _check_self_pair(name: str, a: object, r: object) -> None:
    for what, t in (("maps", a), ("reference", r)):
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{what} {name} must be a tensor, got {type(t).__name__}")
        if t.ndim != 4 or t.shape[-1] != t.shape[1] * t.shape[2]:
            raise InputError(
                f"{what} {name} must be self-attention (B, h, w, h*w), got shape "
                f"{tuple(t.shape)}; use AttentionStore.aggregate(kind='self', ...)"
            )
        if not t.is_floating_point():
            raise InputError(f"{what} {name} must be floating point, got {t.dtype}")
    assert isinstance(a, torch.Tensor) and isinstance(r, torch.Tensor)
    if r.shape[1:] != a.shape[1:] or r.shape[0] not in (1, a.shape[0]):
        raise InputError(
            f"reference {name} has shape {tuple(r.shape)} but maps {name} has "
            f"{tuple(a.shape)}; the reference must come from the same layers at the same "
            f"resolution (batch B or 1)"
        )


def self_attention_structure(
    maps: SelfMaps, reference: SelfMaps, *, reduction: str = "mean"
) -> torch.Tensor:
    """MSE between the adversarial image's self-attention maps and the clean image's.

    Per image ``b`` and layer ``l`` (a tensor is one layer):
    ``MSE_bl = mean_{y,x,j} (S_l[b, y, x, j] - R_l[b, y, x, j])**2``; the loss of image ``b`` is
    the mean over the ``L`` layers (each layer counts equally, whatever its resolution), reduced
    over the batch. Keeping it small preserves the image's structure (DiffAttack).

    Args:
        maps: the adversarial image's self-attention: ``(B, h, w, h*w)``, or a dict / list of
            per-layer tensors (resolutions may differ between layers).
        reference: the clean image's maps in the same structure (same keys / length, same
            shapes; batch ``B`` or 1). Treated as a constant: it is detached, so a reference
            computed once under ``torch.no_grad()`` can be reused every iteration.
        reduction: ``"mean"`` over the batch (default), ``"sum"``, ``"none"`` -> ``(B,)``.

    >>> ref = torch.softmax(torch.randn(1, 2, 2, 4), dim=-1)
    >>> self_attention_structure({"up": ref + 0.1}, {"up": ref})
    tensor(0.0100)
    """
    check_reduction(reduction)
    pairs = _as_pairs(maps, reference)
    if not pairs:
        raise InputError(
            "no self-attention maps given (empty dict/list); record self-attention layers"
        )
    per_layer = []
    for name, a, r in pairs:
        _check_self_pair(name, a, r)
        diff = a - r.detach().to(device=a.device, dtype=a.dtype)
        per_layer.append(diff.square().flatten(1).mean(dim=1))
    values = torch.stack(per_layer, dim=0).mean(dim=0)
    return reduce(values, reduction)


class CrossAttentionVariance(nn.Module):
    """Module form of :func:`cross_attention_variance`.

    >>> CrossAttentionVariance()(torch.full((1, 2, 2, 77), 1 / 77), [5])
    tensor(0.)
    """

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        check_reduction(reduction)
        self.reduction = reduction

    def forward(self, maps: torch.Tensor, tokens: Tokens) -> torch.Tensor:
        return cross_attention_variance(maps, tokens, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class CrossAttentionRegion(nn.Module):
    """Module form of :func:`cross_attention_region`.

    ``CrossAttentionRegion("attract")(maps, mask, tokens)``; ``mode`` and ``reduction`` are fixed
    at construction.
    """

    def __init__(self, mode: str = "repel", reduction: str = "mean"):
        super().__init__()
        check_reduction(reduction)
        if mode not in _MODES:
            raise InputError(
                f"mode must be 'repel' (attention off the patch) or 'attract' (onto it), got "
                f"{mode!r}"
            )
        self.mode = mode
        self.reduction = reduction

    def forward(self, maps: torch.Tensor, mask: torch.Tensor, tokens: Tokens) -> torch.Tensor:
        return cross_attention_region(maps, mask, tokens, mode=self.mode, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, reduction={self.reduction!r}"


class SelfAttentionStructure(nn.Module):
    """Module form of :func:`self_attention_structure`, optionally holding the reference.

    ``SelfAttentionStructure(reference=clean_maps)(adv_maps)`` compares with the stored
    (detached) reference; ``loss(adv_maps, other_reference)`` overrides it for one call. The
    stored reference is a plain attribute, not a buffer: ``.to(device)`` does not move it (the
    loss moves it to the maps' device on each call).
    """

    def __init__(self, reference: SelfMaps | None = None, reduction: str = "mean"):
        super().__init__()
        check_reduction(reduction)
        self.reduction = reduction
        self.reference: SelfMaps | None = None
        if reference is not None:
            self.set_reference(reference)

    def set_reference(self, reference: SelfMaps) -> None:
        """Store ``reference`` (detached) for later calls."""
        if isinstance(reference, torch.Tensor):
            self.reference = reference.detach()
        elif isinstance(reference, Mapping):
            self.reference = {k: v.detach() for k, v in reference.items()}
        elif isinstance(reference, (list, tuple)):
            self.reference = [v.detach() for v in reference]
        else:
            raise InputError(
                f"reference must be a tensor (B, h, w, h*w) or a dict/list of them, got "
                f"{type(reference).__name__}"
            )

    def forward(self, maps: SelfMaps, reference: SelfMaps | None = None) -> torch.Tensor:
        ref = reference if reference is not None else self.reference
        if ref is None:
            raise InputError(
                "no reference maps: pass SelfAttentionStructure(reference=clean_maps) or call "
                "loss(maps, reference)"
            )
        return self_attention_structure(maps, ref, reduction=self.reduction)

    def extra_repr(self) -> str:
        ref = "set" if self.reference is not None else None
        return f"reduction={self.reduction!r}, reference={ref}"
