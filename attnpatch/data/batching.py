"""A resumable batch order: batch ``i`` depends only on ``(seed, i)`` and the set's length.

:func:`batches` yields ``(iteration, images, labels)`` (``(B, 3, H, W)`` float in [0, 1] and
``(B,)`` int64) in an order that never uses torch's global RNG, so a resumed run sees exactly the
batches an uninterrupted one would; :func:`batch_indices` is the same order as a pure function.

>>> from attnpatch.data import TensorImageDataset
>>> ds = TensorImageDataset(torch.rand(5, 3, 4, 4), torch.arange(5), list("abcde"))
>>> it, images, labels = next(batches(ds, 4, seed=0))
>>> it, tuple(images.shape), tuple(labels.shape)
(0, (4, 3, 4, 4), (4,))
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset

from .._util import derive_seed
from ..errors import InputError

__all__ = ["batches", "batch_indices", "batches_per_epoch"]

#: The :func:`attnpatch._util.derive_seed` tag of the epoch permutations (part of every order).
_SEED_TAG = "attnpatch-batches"


def batches_per_epoch(n: int, batch_size: int, drop_last: bool = False) -> int:
    """How many batches one pass over ``n`` items gives."""
    return n // batch_size if drop_last else -(-n // batch_size)


def _check_batching(n: int, batch_size: int, drop_last: bool) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if n == 0:
        raise InputError("empty data set: it has no images; add images or fix its source")
    if batches_per_epoch(n, batch_size, drop_last) == 0:
        raise InputError(
            f"drop_last=True with {n} images and batch_size={batch_size} gives no batch at all; "
            "lower batch_size or pass drop_last=False"
        )


@functools.lru_cache(maxsize=2)
def _epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    """The visiting order of one epoch, ``(n,)`` int64; cached, since consecutive batches share
    it. Private: callers only ever receive ``.tolist()`` slices of it."""
    if not shuffle:
        return torch.arange(n)
    g = torch.Generator().manual_seed(derive_seed(_SEED_TAG, seed, epoch))
    return torch.randperm(n, generator=g)


def batch_indices(
    n: int,
    batch_size: int,
    iteration: int,
    *,
    seed: int,
    shuffle: bool = True,
    drop_last: bool = False,
) -> list[int]:
    """The data-set indices of batch ``iteration`` (a pure function of its arguments).

    Epoch ``e = iteration // batches_per_epoch(n, batch_size, drop_last)`` visits the items in
    ``torch.randperm(n)`` order drawn from a private generator seeded by a hash of
    ``(seed, e)`` (identity order with ``shuffle=False``); batch ``iteration`` is slice
    ``iteration % batches_per_epoch`` of it. The last batch of an epoch is smaller when
    ``batch_size`` does not divide ``n`` (dropped with ``drop_last=True``). torch's global RNG
    is never touched. Orders are reproducible for a given torch version (``randperm``'s).

    >>> batch_indices(5, 2, 2, seed=0, shuffle=False), batch_indices(5, 2, 3, seed=0, shuffle=False)
    ([4], [0, 1])
    """
    _check_batching(n, batch_size, drop_last)
    return _batch_indices(n, batch_size, iteration, seed, shuffle, drop_last)


def _batch_indices(
    n: int, batch_size: int, iteration: int, seed: int, shuffle: bool, drop_last: bool
) -> list[int]:
    per_epoch = batches_per_epoch(n, batch_size, drop_last)
    epoch, k = divmod(int(iteration), per_epoch)
    order = _epoch_order(n, int(seed), epoch, bool(shuffle))
    return order[k * batch_size : (k + 1) * batch_size].tolist()


def batches(
    dataset: Dataset,
    batch_size: int,
    *,
    seed: int,
    start: int = 0,
    stop: int | None = None,
    shuffle: bool = True,
    drop_last: bool = False,
    num_workers: int = 0,
    device: torch.device | str | None = None,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield ``(iteration, images, labels)`` for ``iteration = start, start + 1, ... < stop``.

    ``images`` is ``(B, 3, H, W)`` float in [0, 1], ``labels`` ``(B,)`` int64. Batch ``i``
    depends only on ``(seed, i)`` (and the data set's length): see :func:`batch_indices`. So a
    run resumed with ``start=i`` gets exactly the batches ``i, i+1, ...`` of an uninterrupted
    run, and torch's global RNG (which the training loop checkpoints) is never used.
    ``stop=None`` iterates forever (epochs follow each other, each with its own permutation).

    Data sets with a ``get_batch(indices)`` method (:class:`~attnpatch.data.TensorImageDataset`) are indexed in
    one call; others item by item (``num_workers > 0`` reads them in a ``DataLoader`` with that
    many worker processes, in the same order). ``device`` moves each batch there.

    >>> from attnpatch.data import TensorImageDataset
    >>> ds = TensorImageDataset(torch.rand(5, 3, 4, 4), torch.arange(5), list("abcde"))
    >>> full = [labels.tolist() for _, _, labels in batches(ds, 2, seed=1, stop=6)]
    >>> tail = [labels.tolist() for _, _, labels in batches(ds, 2, seed=1, start=4, stop=6)]
    >>> tail == full[4:]
    True
    """
    n = len(dataset)
    _check_batching(n, batch_size, drop_last)
    if start < 0 or (stop is not None and stop < start):
        raise InputError(f"need 0 <= start <= stop, got start={start}, stop={stop}")

    def index_lists() -> Iterator[list[int]]:
        i = start
        while stop is None or i < stop:
            yield _batch_indices(n, batch_size, i, seed, shuffle, drop_last)
            i += 1

    if num_workers > 0:
        from torch.utils.data import DataLoader

        # A private generator: DataLoader would otherwise draw its base seed from the global RNG.
        loader = DataLoader(
            dataset,
            batch_sampler=list(index_lists()) if stop is not None else _IterableLists(index_lists),
            num_workers=num_workers,
            generator=torch.Generator().manual_seed(derive_seed(_SEED_TAG, seed, -1)),
            collate_fn=_collate,
        )
        source: Iterator[tuple[torch.Tensor, torch.Tensor]] = iter(loader)
    else:
        get_batch = getattr(dataset, "get_batch", None)
        if get_batch is not None:
            source = (get_batch(idx) for idx in index_lists())
        else:
            source = (_collate([dataset[j] for j in idx]) for idx in index_lists())
    for i, (images, labels) in enumerate(source, start=start):
        if device is not None:
            images, labels = images.to(device), labels.to(device)
        yield i, images, labels


class _IterableLists:
    """An endless batch sampler for DataLoader (it only needs ``__iter__``)."""

    def __init__(self, factory):
        self.factory = factory

    def __iter__(self):
        return self.factory()


def _collate(items: list[tuple[torch.Tensor, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    shapes = {tuple(image.shape) for image, _ in items}
    if len(shapes) > 1:
        raise InputError(
            f"cannot batch images of different sizes {sorted(shapes)}; build the data set with "
            "size=(H, W) so every image is resized"
        )
    images = torch.stack([image for image, _ in items])
    labels = torch.as_tensor([int(label) for _, label in items], dtype=torch.long)
    return images, labels
