"""Small helpers every layer shares (one copy each): sizes, atomic writes, threads, seeds.

Private to the package: users never need them; modules of every layer may import them.
"""

from __future__ import annotations

import contextlib
import hashlib
import numbers
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import InputError

__all__ = [
    "as_pair",
    "atomic_write",
    "umask",
    "num_threads",
    "one_thread",
    "seeded",
    "derive_seed",
    "freeze",
    "deprecated",
    "REMOVAL_VERSION",
]


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def as_pair(value: Any, name: str = "size", *, minimum: int = 1) -> tuple[int, int]:
    """``16 -> (16, 16)``; an ``(h, w)`` pair of ints is returned as a tuple.

    Raises :class:`~attnpatch.errors.InputError` naming ``name`` for anything else, and for values below
    ``minimum`` (default 1: sizes are positive).

    >>> as_pair(16), as_pair((32, 24), "latent size")
    ((16, 16), (32, 24))
    """
    if _is_int(value):
        pair: tuple = (value, value)
    else:
        try:
            pair = tuple(value)
        except TypeError:
            pair = ()
    if len(pair) != 2 or not all(_is_int(v) for v in pair) or min(pair) < minimum:
        what = "positive int" if minimum == 1 else f"int >= {minimum}"
        raise InputError(
            f"{name} must be a {what} or a (height, width) pair of {what}s, got {value!r}; "
            f"pass e.g. {name.replace(' ', '_')}=64 or (64, 48)"
        )
    return int(pair[0]), int(pair[1])


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Write ``path`` all at once: yields a temporary path in the same folder to write to; on
    success it gets the permissions a new file gets (``0o666`` less the umask), is flushed to
    disk (fsync) and renamed over ``path``, so a reader (or a run
    killed at any moment) sees the old file or the new one, never half of one. On an error the
    temporary file is removed and ``path`` is untouched.

    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
    >>> with atomic_write(target) as tmp:
    ...     _ = tmp.write_text("hello")
    >>> target.read_text()
    'hello'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes it 0600: follow the umask instead
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def umask() -> int:
    """The process's umask (the permission bits new files do not get), read without changing
    it where the OS allows (Linux: ``/proc/self/status``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no getter elsewhere: set and restore at once
    os.umask(mask)
    return mask


@contextlib.contextmanager
def num_threads(n: int) -> Iterator[None]:
    """Run torch ops on ``n`` CPU threads inside the block (``0``: leave the count as it is);
    the caller's count is restored. CPU float reductions are split by thread, so results are
    bit-identical only between runs on the same count."""
    threads = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def one_thread() -> contextlib.AbstractContextManager[None]:
    """``num_threads(1)``: for the small, deterministic work on synthetic data (rendering
    shapes, training the tiny models), whose results then do not depend on the machine."""
    return num_threads(1)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """``torch.manual_seed(seed)`` inside the block; torch's global CPU RNG state is restored
    afterwards (``torch.random.fork_rng``), so building seeded weights disturbs no caller."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def derive_seed(tag: str, *values: int) -> int:
    """A 63-bit seed (valid for ``manual_seed``) from a tag and integers, by SHA-256.

    Streams derived with different tags or values are independent of each other and of
    torch's global generator.

    >>> derive_seed("attnpatch-batches", 0, 1) == derive_seed("attnpatch-batches", 0, 1)
    True
    """
    text = ":".join([tag, *(str(int(v)) for v in values)])
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode, ``requires_grad=False`` on every weight, and no gradient left over."""
    module.zero_grad(set_to_none=True)
    return module.eval().requires_grad_(False)


#: The release that removes what is deprecated now.
REMOVAL_VERSION = "0.3.0"


def deprecated(old: str, new: str, *, removal: str = REMOVAL_VERSION, stacklevel: int = 3) -> None:
    """Warn (``FutureWarning``, shown to users by default) that ``old`` is deprecated in favour
    of ``new`` and goes away in attnpatch ``removal``.

    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as w:
    ...     warnings.simplefilter("always")
    ...     deprecated("f(checkpoint=True)", "f(memory='balanced')")
    >>> str(w[0].message)
    "f(checkpoint=True) is deprecated and will be removed in attnpatch 0.3.0; use f(memory='balanced')"
    """
    warnings.warn(
        f"{old} is deprecated and will be removed in attnpatch {removal}; use {new}",
        FutureWarning,
        stacklevel=stacklevel,
    )
