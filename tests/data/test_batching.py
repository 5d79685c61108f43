"""The resumable batch order (attnpatch/data/batching.py)."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch

from attnpatch.data import TensorImageDataset, batch_indices, batches
from attnpatch.errors import InputError


def _labelled(n: int) -> TensorImageDataset:
    images = torch.rand(n, 3, 2, 2, generator=torch.Generator().manual_seed(n))
    return TensorImageDataset(images, torch.arange(n) % 3, ["a", "b", "c"])


class _ItemOnly(torch.utils.data.Dataset):
    """Items are their own index encoded in the pixels: no get_batch fast path."""

    classes = ["x"]

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.full((3, 2, 2), i / 100), 0


def _ids(images: torch.Tensor) -> list[int]:
    return (images[:, 0, 0, 0] * 100).round().long().tolist()


@pytest.mark.parametrize("n,bs,drop_last", [(10, 3, False), (10, 3, True), (7, 1, False)])
def test_batches_resume_equals_tail_of_full_run(n, bs, drop_last):
    ds = _ItemOnly(n)
    total = 4 * math.ceil(n / bs) + 1  # several epochs
    full = [(i, _ids(x)) for i, x, _ in batches(ds, bs, seed=3, stop=total, drop_last=drop_last)]
    assert [i for i, _ in full] == list(range(total))
    for start in (1, total // 2, total - 1):
        tail = [
            (i, _ids(x))
            for i, x, _ in batches(ds, bs, seed=3, start=start, stop=total, drop_last=drop_last)
        ]
        assert tail == full[start:]
    # batch_indices is the same pure function.
    for i, ids in full:
        assert batch_indices(n, bs, i, seed=3, drop_last=drop_last) == ids


def test_each_epoch_is_a_fresh_permutation():
    n, bs = 9, 2
    ds = _ItemOnly(n)
    per_epoch = math.ceil(n / bs)
    got = [_ids(x) for _, x, _ in batches(ds, bs, seed=0, stop=3 * per_epoch)]
    epochs = [sum(got[e * per_epoch : (e + 1) * per_epoch], []) for e in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(n))
    assert len({tuple(o) for o in epochs}) == 3  # different orders
    assert epochs[0] != [
        i for x in batches(ds, bs, seed=1, stop=per_epoch) for i in _ids(x[1])
    ]  # seed matters
    plain = [
        i for _, x, _ in batches(ds, bs, seed=0, stop=per_epoch, shuffle=False) for i in _ids(x)
    ]
    assert plain == list(range(n))


def test_batches_never_touch_the_global_rng():
    ds = _labelled(10)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = [y.tolist() for _, _, y in batches(ds, 4, seed=5, stop=7)]
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(999)
    b = [y.tolist() for _, _, y in batches(ds, 4, seed=5, stop=7)]
    assert a == b


def test_get_batch_fast_path_and_worker_path_match_item_path():
    ds = _labelled(11)

    class Plain(torch.utils.data.Dataset):
        def __len__(self):
            return len(ds)

        def __getitem__(self, i):
            return ds[i]

    fast = list(batches(ds, 4, seed=2, stop=5))
    slow = list(batches(Plain(), 4, seed=2, stop=5))
    for (i, x, y), (j, u, v) in zip(fast, slow):
        assert i == j and torch.equal(x, u) and torch.equal(y, v)
        assert x.shape[1:] == (3, 2, 2) and y.dtype == torch.int64
    state = torch.get_rng_state()
    workers = list(batches(Plain(), 4, seed=2, stop=5, num_workers=1))
    assert torch.equal(torch.get_rng_state(), state)
    for (_, x, y), (_, u, v) in zip(fast, workers):
        assert torch.equal(x, u) and torch.equal(y, v)


def test_batches_infinite_and_errors():
    ds = _labelled(3)
    it = batches(ds, 2, seed=0)
    assert [next(it)[0] for _ in range(10)] == list(range(10))
    with pytest.raises(InputError, match="batch_size"):
        next(batches(ds, 0, seed=0))
    with pytest.raises(InputError, match="empty data set"):
        next(batches(_ItemOnly(0), 1, seed=0))
    with pytest.raises(InputError, match="drop_last"):
        next(batches(ds, 4, seed=0, drop_last=True))
    with pytest.raises(InputError, match="start"):
        next(batches(ds, 1, seed=0, start=-1))

    class Ragged(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return torch.zeros(3, 4 + i, 4), 0

    with pytest.raises(InputError, match="different sizes.*size="):
        next(batches(Ragged(), 2, seed=0))


def test_epoch_order_is_randperm_seeded_by_the_tagged_hash():
    """The order's definition, pinned: changing the seed derivation changes every order."""
    for seed, epoch in [(0, 0), (3, 1), (12345, 7)]:
        digest = hashlib.sha256(f"attnpatch-batches:{seed}:{epoch}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        expected = torch.randperm(10, generator=g).tolist()
        got = sum((batch_indices(10, 5, 2 * epoch + k, seed=seed) for k in range(2)), [])
        assert got == expected


def test_docstring_examples_run():
    import doctest

    import attnpatch.data.batching

    result = doctest.testmod(attnpatch.data.batching)
    assert result.attempted > 0 and result.failed == 0
