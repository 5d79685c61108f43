"""attnpatch._util: the one copy of each shared helper."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
from torch import nn

from attnpatch._util import as_pair, atomic_write, derive_seed, freeze, one_thread, seeded
from attnpatch.errors import InputError


def test_as_pair():
    assert as_pair(16) == (16, 16)
    assert as_pair((32, 24)) == (32, 24) and as_pair([3, 4]) == (3, 4)
    assert as_pair(0, minimum=0) == (0, 0)
    for bad in (0, -1, (3,), (1, 2, 3), (2.0, 2), True, "16", None, (True, 2)):
        with pytest.raises(InputError, match="image_size must be a positive int"):
            as_pair(bad, "image_size")


def test_atomic_write_replaces_whole_files_only(tmp_path):
    path = tmp_path / "sub" / "f.txt"
    with atomic_write(path) as tmp:
        tmp.write_text("one")
        assert not path.exists()  # nothing visible before the block succeeds
    assert path.read_text() == "one"
    with pytest.raises(RuntimeError), atomic_write(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "one"  # the old file survives
    assert os.listdir(path.parent) == ["f.txt"]  # and no temporary file is left behind


def test_one_thread_restores_the_count():
    before = torch.get_num_threads()
    with one_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_seeded_draws_repeat_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    with seeded(7):
        a = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), state)
    with seeded(7):
        assert torch.equal(torch.rand(3), a)
    torch.manual_seed(7)
    assert torch.equal(torch.rand(3), a)  # the same as torch.manual_seed(7) would give


def test_derive_seed_is_the_documented_hash():
    digest = hashlib.sha256(b"attnpatch-batches:3:5").digest()
    assert derive_seed("attnpatch-batches", 3, 5) == int.from_bytes(digest[:8], "little") >> 1
    assert derive_seed("a", 1) != derive_seed("b", 1) != derive_seed("a", 2)
    assert 0 <= derive_seed("x", 2**70) < 2**63


def test_freeze():
    net = nn.Linear(2, 2).train()
    net(torch.ones(1, 2)).sum().backward()
    assert freeze(net) is net
    assert not net.training and all(
        not p.requires_grad and p.grad is None for p in net.parameters()
    )
