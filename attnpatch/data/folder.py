"""Data: image-folder / CSV data sets, resumable batches, a synthetic shapes set, prompts.

Every image this module returns is classifier-side: ``(3, H, W)`` float RGB in [0, 1] (a batch
is ``(B, 3, H, W)``), with an ``int`` label indexing ``dataset.classes``.

* :class:`ImageFolder` reads a folder with one subfolder per class, or a CSV of ``path,label``.
* :func:`batches` yields ``(iteration, images, labels)`` in an order that depends only on
  ``(seed, iteration)``, never on torch's global RNG, so a resumed run sees exactly the batches
  an uninterrupted one would.
* :class:`ShapesConfig` / :func:`shapes_dataset` generate the embedded demo's labelled images
  (coloured shapes on textured backgrounds; no downloads) and :func:`write_image_folder` writes
  any in-memory set out as an image folder.
* :func:`prompt_for` builds a diffusion prompt from a class name.

>>> train = shapes_dataset(ShapesConfig(train_per_class=2, heldout_per_class=1))
>>> train.classes
['circle', 'cross', 'square', 'star', 'triangle']
>>> it, images, labels = next(batches(train, 4, seed=0))
>>> it, tuple(images.shape), tuple(labels.shape)
(0, (4, 3, 32, 32), (4,))
>>> prompt_for("star")
'a photo of a star'
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import hashlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..errors import AttnPatchError
from ..images import check_image

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
    "write_image_folder",
    "prompt_for",
    "prompts_for",
    "DEFAULT_TEMPLATE",
]

#: File endings (lower case) :class:`ImageFolder` reads; other files are ignored.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")

#: Prompt template used when none is given.
DEFAULT_TEMPLATE = "a photo of a {label}"

Size = int | tuple[int, int]


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch ops on one CPU thread inside the block; the caller's count is restored.

    Used for the small synthetic-data and tiny-classifier work: results then do not depend on
    ``torch.get_num_threads()``, and small ops gain little from threads but lose a lot when
    other processes share the cores (measured on a 2-core machine under load: generating the
    default shapes set took 0.6 s on one thread, 4.7 s on two).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _as_hw(size: Size | None, name: str = "size") -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int) and not isinstance(size, bool):
        h = w = size
    elif isinstance(size, Sequence) and len(size) == 2:
        h, w = (int(s) for s in size)
    else:
        raise AttnPatchError(f"{name} must be an int or a (height, width) pair, got {size!r}")
    if h < 1 or w < 1:
        raise AttnPatchError(f"{name} must be positive, got {size!r}")
    return h, w


# --------------------------------------------------------------------------------------------
# Image folder / CSV
# --------------------------------------------------------------------------------------------


def _decode(path: str, size: tuple[int, int] | None, resize: str) -> torch.Tensor:
    """Read one file -> ``(3, H, W)`` uint8 RGB (EXIF orientation applied, alpha dropped)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im = im.convert("RGB")
            if size is not None and im.size != (size[1], size[0]):
                h, w = size
                if resize == "stretch":
                    box = (0.0, 0.0, float(im.width), float(im.height))
                else:  # "crop": the largest centred box with the target aspect ratio
                    scale = min(im.width / w, im.height / h)
                    bw, bh = w * scale, h * scale
                    left, top = (im.width - bw) / 2, (im.height - bh) / 2
                    box = (left, top, left + bw, top + bh)
                im = im.resize((w, h), Image.Resampling.BICUBIC, box=box)
            array = np.asarray(im, dtype=np.uint8).copy()
    except (OSError, SyntaxError, ValueError) as e:  # PIL raises these for bad files
        raise AttnPatchError(
            f"cannot read image {path!r} ({type(e).__name__}: {e}); delete the file, or re-save "
            "it as PNG/JPEG"
        ) from e
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class ImageFolder(Dataset):
    """Labelled images from a folder of class subfolders, or from a CSV of ``path,label``.

    Items are ``(image, label)``: ``image`` is ``(3, H, W)`` float RGB in [0, 1] (grayscale and
    palette images are converted to RGB, alpha is dropped, EXIF rotation applied), ``label`` an
    ``int`` indexing :attr:`classes`. A ``DataLoader`` over it yields ``(B, 3, H, W)`` images and
    ``(B,)`` int64 labels; :func:`batches` gives a seeded, resumable order.

    Args:
        source: a folder ``root/<class name>/**/<image>`` (class names sorted, files sorted,
            subfolders of a class folder searched recursively, hidden files and files not ending
            in :data:`IMAGE_EXTENSIONS` skipped), or a ``.csv`` file with rows ``path,label``.
            CSV paths are resolved against the CSV's folder; a first row ``path,label`` is a
            header (then the columns are found by name, others ignored). A label is a class
            name or an integer index.
        size: ``(height, width)`` or one int for both; every image is resized to it.
            ``None`` keeps native sizes (then batching needs equal sizes).
        resize: ``"crop"`` (default): scale so the image covers ``size`` and cut the centred
            part (aspect ratio kept, borders lost). ``"stretch"``: scale each axis to ``size``
            (nothing lost, shapes distorted). Both resample with PIL's antialiased bicubic
            filter (one resample, from the exact crop box; images already at ``size`` are not
            resampled at all).
        classes: the class names, in label order. Folders: only these subfolders are read
            (default: all, sorted). CSV: labels must be among them (names, or indices into
            them); default: the sorted distinct names, or ``"0" .. str(max)`` when every label
            is an integer.
        cache: keep decoded images in memory (as uint8, ``3 * H * W`` bytes each) so later
            epochs do not re-read the disk. ``None`` (default): cache when the whole set takes
            at most ``cache_bytes``; with ``size=None`` the native sizes count.
        cache_bytes: the ``cache=None`` limit, default 1 GiB.

    Bad input raises :class:`AttnPatchError` at construction, before any training: a missing
    source, no images, an empty class folder, a CSV row that is malformed, names a missing file
    or an unknown label (with the line number), or a file that is not an image (headers are
    opened for every file; pixel data is decoded on first access).

    >>> import tempfile
    >>> root = write_image_folder(
    ...     shapes_dataset(ShapesConfig(train_per_class=1)), tempfile.mkdtemp())
    >>> ds = ImageFolder(root, size=32)
    >>> len(ds), ds.classes[0], tuple(ds[0][0].shape), ds[0][1]
    (5, 'circle', (3, 32, 32), 0)
    """

    def __init__(
        self,
        source: str | os.PathLike,
        size: Size | None = None,
        *,
        resize: str = "crop",
        classes: Sequence[str] | None = None,
        cache: bool | None = None,
        cache_bytes: int = 1 << 30,
    ):
        self.source = Path(source)
        self.size = _as_hw(size)
        if resize not in ("crop", "stretch"):
            raise AttnPatchError(f"resize must be 'crop' or 'stretch', got {resize!r}")
        self.resize = resize
        if not self.source.exists():
            raise AttnPatchError(
                f"data source {str(self.source)!r} does not exist; pass a folder with one "
                "subfolder per class, or a CSV file of path,label rows"
            )
        if self.source.is_dir():
            samples, names = self._scan_folder(self.source, classes)
        elif self.source.suffix.lower() == ".csv":
            samples, names = self._read_csv(self.source, classes)
        else:
            raise AttnPatchError(
                f"data source {str(self.source)!r} is neither a folder nor a .csv file; pass a "
                "folder with one subfolder per class, or a CSV of path,label rows"
            )
        self.samples: list[tuple[str, int]] = samples
        self.classes: list[str] = names
        self._native_sizes = self._check_headers()
        if cache is None:
            if self.size is not None:
                total = len(self.samples) * 3 * self.size[0] * self.size[1]
            else:
                total = sum(3 * w * h for w, h in self._native_sizes)
            cache = total <= cache_bytes
        self.cache = bool(cache)
        self._cache: dict[int, torch.Tensor] = {}

    # -- construction helpers ---------------------------------------------------------------

    @staticmethod
    def _scan_folder(
        root: Path, classes: Sequence[str] | None
    ) -> tuple[list[tuple[str, int]], list[str]]:
        subdirs = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name[0] != ".")
        if classes is None:
            names = subdirs
        else:
            names = [str(c) for c in classes]
            missing = [c for c in names if c not in subdirs]
            if missing:
                raise AttnPatchError(
                    f"class folders {missing} not found in {str(root)!r} (it has {subdirs}); "
                    "create them or fix classes="
                )
        if not names:
            loose = [p.name for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS]
            hint = (
                f" It holds {len(loose)} images directly: move them into root/<class name>/."
                if loose
                else ""
            )
            raise AttnPatchError(
                f"empty data set: {str(root)!r} has no class subfolders.{hint} Expected "
                "root/<class name>/<image>, or pass a CSV of path,label rows"
            )
        samples: list[tuple[str, int]] = []
        for label, name in enumerate(names):
            files = sorted(
                p
                for p in (root / name).rglob("*")
                if p.is_file()
                and p.suffix.lower() in IMAGE_EXTENSIONS
                and not any(part.startswith(".") for part in p.relative_to(root).parts)
            )
            if not files:
                raise AttnPatchError(
                    f"empty data set for class {name!r}: {str(root / name)!r} holds no images "
                    f"(endings read: {', '.join(IMAGE_EXTENSIONS)}); add images or remove the "
                    "folder"
                )
            samples.extend((str(p), label) for p in files)
        return samples, names

    @staticmethod
    def _read_csv(
        path: Path, classes: Sequence[str] | None
    ) -> tuple[list[tuple[str, int]], list[str]]:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [(i + 1, row) for i, row in enumerate(csv.reader(f))]
        rows = [(n, [c.strip() for c in row]) for n, row in rows if any(c.strip() for c in row)]
        path_col, label_col = 0, 1
        if rows:
            header = [c.lower() for c in rows[0][1]]
            if "path" in header and "label" in header:
                path_col, label_col = header.index("path"), header.index("label")
                rows = rows[1:]
        if not rows:
            raise AttnPatchError(
                f"empty data set: {str(path)!r} has no path,label rows; add one row per image"
            )
        raw: list[tuple[int, str, str]] = []
        for n, row in rows:
            if len(row) <= max(path_col, label_col) or not row[path_col] or not row[label_col]:
                raise AttnPatchError(
                    f"{str(path)}:{n}: expected 'path,label', got {','.join(row)!r}; write one "
                    "image path and its label per row"
                )
            file = Path(row[path_col]).expanduser()
            if not file.is_absolute():
                file = path.parent / file
            if not file.is_file():
                raise AttnPatchError(
                    f"{str(path)}:{n}: image {str(file)!r} not found (relative paths are "
                    f"resolved against {str(path.parent)!r}); fix the path or remove the row"
                )
            raw.append((n, str(file), row[label_col]))

        def is_index(s: str) -> bool:
            return s.isdigit()

        if classes is None:
            if all(is_index(lab) for _, _, lab in raw):
                names = [str(i) for i in range(max(int(lab) for _, _, lab in raw) + 1)]
            else:
                names = sorted({lab for _, _, lab in raw})
        else:
            names = [str(c) for c in classes]
            if not names:
                raise AttnPatchError("classes= is empty; pass the class names in label order")
        lookup = {name: i for i, name in enumerate(names)}
        samples = []
        for n, file, lab in raw:
            if lab in lookup:
                label = lookup[lab]
            elif is_index(lab) and int(lab) < len(names):
                label = int(lab)
            else:
                shown = names if len(names) <= 20 else names[:20] + ["..."]
                raise AttnPatchError(
                    f"{str(path)}:{n}: unknown label {lab!r}; labels must be one of {shown} or "
                    f"an index below {len(names)}; fix the row or pass classes=[...]"
                )
            samples.append((file, label))
        return samples, names

    def _check_headers(self) -> list[tuple[int, int]]:
        """Open every file's header (cheap, no pixel decoding); list all bad files at once."""
        from PIL import Image

        sizes, bad = [], []
        for path, _ in self.samples:
            try:
                with Image.open(path) as im:
                    sizes.append(im.size)
            except (OSError, SyntaxError, ValueError) as e:
                bad.append(f"{path} ({type(e).__name__})")
        if bad:
            shown = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise AttnPatchError(
                f"{len(bad)} file(s) in {str(self.source)!r} are not readable images: {shown}. "
                "Delete them, or re-save them as PNG/JPEG"
            )
        return sizes

    # -- Dataset protocol ---------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.samples)

    def load_uint8(self, index: int) -> torch.Tensor:
        """Image ``index`` as ``(3, H, W)`` uint8 (from the cache when enabled)."""
        if index in self._cache:
            return self._cache[index]
        image = _decode(self.samples[index][0], self.size, self.resize)
        if self.cache:
            self._cache[index] = image
        return image

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if index < 0:
            index += len(self)
        return self.load_uint8(index).float() / 255.0, self.samples[index][1]

    def __repr__(self) -> str:
        return (
            f"ImageFolder({str(self.source)!r}, size={self.size}, resize={self.resize!r}, "
            f"{len(self)} images, {len(self.classes)} classes, cache={self.cache})"
        )


class TensorImageDataset(Dataset):
    """An in-memory labelled image set.

    Args:
        images: ``(N, 3, H, W)`` float RGB in [0, 1].
        labels: ``(N,)`` integers in ``[0, len(classes))``.
        classes: class names in label order.

    Items are ``(image (3, H, W), int label)``; :meth:`get_batch` indexes many at once (the fast
    path :func:`batches` uses).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]):
        check_image(images)
        labels = torch.as_tensor(labels)
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise AttnPatchError(
                f"labels must be (N,) with N = {images.shape[0]} images, got {tuple(labels.shape)}"
            )
        if labels.is_floating_point():
            raise AttnPatchError("labels must be integers; pass labels.long()")
        self.classes = [str(c) for c in classes]
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(self.classes)):
            raise AttnPatchError(
                f"labels must lie in [0, {len(self.classes)}) for {len(self.classes)} classes, "
                f"got [{int(labels.min())}, {int(labels.max())}]"
            )
        self.images = images
        self.labels = labels.long()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    def get_batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, 3, H, W)`` images and ``(B,)`` labels for ``indices``."""
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return self.images[idx], self.labels[idx]

    def __repr__(self) -> str:
        return (
            f"TensorImageDataset({len(self)} images {tuple(self.images.shape[1:])}, "
            f"classes={self.classes})"
        )


# --------------------------------------------------------------------------------------------
# Resumable batch order
# --------------------------------------------------------------------------------------------


def batches_per_epoch(n: int, batch_size: int, drop_last: bool = False) -> int:
    """How many batches one pass over ``n`` items gives."""
    return n // batch_size if drop_last else -(-n // batch_size)


def _epoch_seed(seed: int, epoch: int) -> int:
    digest = hashlib.sha256(f"attnpatch-batches:{int(seed)}:{int(epoch)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # 63 bits: a valid manual_seed


def _check_batching(n: int, batch_size: int, drop_last: bool) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise AttnPatchError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if n == 0:
        raise AttnPatchError("empty data set: it has no images; add images or fix its source")
    if batches_per_epoch(n, batch_size, drop_last) == 0:
        raise AttnPatchError(
            f"drop_last=True with {n} images and batch_size={batch_size} gives no batch at all; "
            "lower batch_size or pass drop_last=False"
        )


@functools.lru_cache(maxsize=2)
def _epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    """The visiting order of one epoch, ``(n,)`` int64; cached, since consecutive batches share
    it. Private: callers only ever receive ``.tolist()`` slices of it."""
    if not shuffle:
        return torch.arange(n)
    g = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
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

    Data sets with a ``get_batch(indices)`` method (:class:`TensorImageDataset`) are indexed in
    one call; others item by item (``num_workers > 0`` reads them in a ``DataLoader`` with that
    many worker processes, in the same order). ``device`` moves each batch there.

    >>> ds = TensorImageDataset(torch.rand(5, 3, 4, 4), torch.arange(5), list("abcde"))
    >>> full = [labels.tolist() for _, _, labels in batches(ds, 2, seed=1, stop=6)]
    >>> tail = [labels.tolist() for _, _, labels in batches(ds, 2, seed=1, start=4, stop=6)]
    >>> tail == full[4:]
    True
    """
    n = len(dataset)
    _check_batching(n, batch_size, drop_last)
    if start < 0 or (stop is not None and stop < start):
        raise AttnPatchError(f"need 0 <= start <= stop, got start={start}, stop={stop}")

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
            generator=torch.Generator().manual_seed(_epoch_seed(seed, -1)),
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
        raise AttnPatchError(
            f"cannot batch images of different sizes {sorted(shapes)}; build the data set with "
            "size=(H, W) so every image is resized"
        )
    images = torch.stack([image for image, _ in items])
    labels = torch.as_tensor([int(label) for _, label in items], dtype=torch.long)
    return images, labels


# --------------------------------------------------------------------------------------------
# Synthetic shapes
# --------------------------------------------------------------------------------------------

#: The default demo classes: each is one token of the tiny tokenizer (``testing.VOCAB_WORDS``).
SHAPE_CLASSES = ("circle", "cross", "square", "star", "triangle")


def _inside_circle(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return u * u + v * v <= 0.85**2


def _inside_ring(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    r2 = u * u + v * v
    return (r2 <= 0.95**2) & (r2 >= 0.55**2)


def _inside_square(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.maximum(u.abs(), v.abs()) <= 0.72


def _inside_diamond(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return u.abs() + v.abs() <= 0.95


def _inside_cross(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    a, b = u.abs(), v.abs()
    return ((a <= 0.28) & (b <= 0.95)) | ((b <= 0.28) & (a <= 0.95))


def _inside_triangle(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # Equilateral, circumradius 1, one vertex up (v grows downwards in image rows), so the
    # edge normals (cos a, sin a) point down (a = pi/2) and up-left / up-right.
    inside = torch.ones_like(u, dtype=torch.bool)
    for k in range(3):
        angle = math.pi / 2 + 2 * math.pi * k / 3  # outward normals of the three edges
        inside &= u * math.cos(angle) + v * math.sin(angle) <= 0.5
    return inside


def _inside_star(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # Five-pointed star: outer radius 1, inner radius 0.45, a point facing up.
    outer, inner, sector = 1.0, 0.45, 2 * math.pi / 5
    phi = torch.atan2(u, -v)  # 0 = up
    gamma = (phi.remainder(sector) - sector / 2).abs()  # 0 = inner vertex direction
    gamma = sector / 2 - gamma  # 0 = outer vertex direction
    rho = torch.sqrt(u * u + v * v)
    px, py = rho * torch.cos(gamma), rho * torch.sin(gamma)
    ax, ay = outer, 0.0
    bx, by = inner * math.cos(sector / 2), inner * math.sin(sector / 2)
    # Inside iff P is on the origin's side of the edge A -> B.
    cross_p = (bx - ax) * (py - ay) - (by - ay) * (px - ax)
    cross_o = (bx - ax) * (0 - ay) - (by - ay) * (0 - ax)
    return cross_p * cross_o >= 0


#: Shape renderers: name -> inside test on unit-scale coordinates ``(u, v)`` (v points down).
SHAPES = {
    "circle": _inside_circle,
    "cross": _inside_cross,
    "diamond": _inside_diamond,
    "ring": _inside_ring,
    "square": _inside_square,
    "star": _inside_star,
    "triangle": _inside_triangle,
}


@dataclass(frozen=True)
class ShapesConfig:
    """What :func:`shapes_dataset` generates; the whole set is a function of these fields.

    Attributes:
        classes: shape names from :data:`SHAPES`, in label order (default
            :data:`SHAPE_CLASSES`, sorted like an image folder's classes).
        size: image side in pixels (default 32: the demo runs on a CPU).
        train_per_class: training images per class.
        heldout_per_class: held-out images per class (drawn from a separate random stream).
        seed: the generator seed.
        rotation: maximum shape rotation in degrees, either way (default 20: small enough
            that a square never becomes a diamond or a cross an X).
    """

    classes: tuple[str, ...] = SHAPE_CLASSES
    size: int = 32
    train_per_class: int = 400
    heldout_per_class: int = 50
    seed: int = 0
    rotation: float = 20.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        unknown = [c for c in self.classes if c not in SHAPES]
        if unknown:
            raise AttnPatchError(f"unknown shape classes {unknown}; choose from {sorted(SHAPES)}")
        if len(set(self.classes)) != len(self.classes) or not self.classes:
            raise AttnPatchError(f"classes must be distinct and non-empty, got {self.classes}")
        if self.size < 8:
            raise AttnPatchError(f"size must be >= 8 pixels, got {self.size}")
        if self.train_per_class < 0 or self.heldout_per_class < 0:
            raise AttnPatchError("train_per_class and heldout_per_class must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (used in cache keys and run configs)."""
        d = dataclasses.asdict(self)
        d["classes"] = list(self.classes)
        return d

    def key(self) -> str:
        """A stable hex digest of the fields."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``(N,)`` hue/saturation/value in [0, 1] -> ``(N, 3)`` RGB in [0, 1]."""
    k = torch.stack([torch.full_like(h, c) for c in (5.0, 3.0, 1.0)], dim=1)
    k = (k + h[:, None] * 6.0) % 6.0
    f = torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)
    return v[:, None] - v[:, None] * s[:, None] * f


def render_shapes(
    labels: torch.Tensor,
    classes: Sequence[str],
    size: int = 32,
    *,
    generator: torch.Generator,
    rotation: float = 20.0,
    supersample: int = 4,
    return_masks: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Draw one shape per label on a textured background.

    Args:
        labels: ``(N,)`` indices into ``classes`` (names from :data:`SHAPES`).
        size: output side ``S``.
        generator: the only source of randomness (torch's global RNG is not used).
        rotation: maximum rotation of a shape in degrees.
        supersample: the shape's edge is antialiased by rendering its mask at this factor.

    Returns:
        ``(N, 3, S, S)`` float RGB in [0, 1], quantised to multiples of 1/255 (so a PNG copy
        reads back bit-identical). With ``return_masks=True`` also the shapes' coverage
        ``(N, 1, S, S)`` in [0, 1] (1 inside the shape, fractional on its antialiased edge).

    Nuisance factors, all random per image: shape position (fully inside the image), radius
    (0.22-0.36 of ``S``), rotation, fill colour (any hue), background (two colours blended by a
    mix of stripes of random frequency/orientation and smooth noise), pixel noise (std 0.03).
    Contrast is the only rule: fill and background colours take their HSV value (their largest
    RGB channel) from opposite bands (dark 0.10-0.40 vs bright 0.65-0.95, either way round), so
    in some channel the shape differs from every background pixel by at least 0.25 (before
    noise): it is always visible, and only its outline tells the classes apart.
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    n, s, g = labels.shape[0], int(size), generator
    tests = [SHAPES[c] for c in classes]

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g)

    # Shape geometry, in pixels.
    radius = s * (0.22 + 0.14 * rand(n))
    margin = radius + 1.0
    cx = margin + (s - 2 * margin) * rand(n)
    cy = margin + (s - 2 * margin) * rand(n)
    theta = (2 * rand(n) - 1) * math.radians(rotation)
    # Colours: fill and background in opposite brightness bands.
    fill_dark = rand(n) < 0.5
    band = lambda dark: torch.where(dark, 0.10 + 0.30 * rand(n), 0.65 + 0.30 * rand(n))  # noqa: E731
    fill = _hsv_to_rgb(rand(n), 0.4 + 0.6 * rand(n), band(fill_dark))
    bg1 = _hsv_to_rgb(rand(n), 0.2 + 0.7 * rand(n), band(~fill_dark))
    bg2 = _hsv_to_rgb(rand(n), 0.2 + 0.7 * rand(n), band(~fill_dark))
    # Background texture t in [0, 1]: stripes mixed with smooth noise.
    ys, xs = torch.meshgrid(torch.arange(s) + 0.5, torch.arange(s) + 0.5, indexing="ij")
    freq = (1.0 + 4.0 * rand(n)) * 2 * math.pi / s
    angle = math.pi * rand(n)
    phase = 2 * math.pi * rand(n)
    proj = xs[None] * torch.cos(angle)[:, None, None] + ys[None] * torch.sin(angle)[:, None, None]
    stripes = 0.5 + 0.5 * torch.sin(freq[:, None, None] * proj + phase[:, None, None])
    smooth = F.interpolate(rand(n, 1, 5, 5), size=(s, s), mode="bicubic", align_corners=False)
    mix = rand(n)[:, None, None]
    texture = (mix * stripes + (1 - mix) * smooth[:, 0]).clamp(0, 1)
    background = bg1[:, :, None, None] + (bg2 - bg1)[:, :, None, None] * texture[:, None]
    # Antialiased coverage of the shape.
    k = int(supersample)
    sub = (torch.arange(s * k) + 0.5) / k
    sy, sx = torch.meshgrid(sub, sub, indexing="ij")
    alpha = torch.zeros(n, 1, s, s)
    for c, inside in enumerate(tests):
        sel = (labels == c).nonzero().flatten()
        if sel.numel() == 0:
            continue
        dx = (sx[None] - cx[sel, None, None]) / radius[sel, None, None]
        dy = (sy[None] - cy[sel, None, None]) / radius[sel, None, None]
        cos, sin = torch.cos(theta[sel])[:, None, None], torch.sin(theta[sel])[:, None, None]
        u, v = cos * dx + sin * dy, -sin * dx + cos * dy
        mask = inside(u, v).float()[:, None]
        alpha[sel] = F.avg_pool2d(mask, k) if k > 1 else mask
    image = alpha * fill[:, :, None, None] + (1 - alpha) * background
    image = image + 0.03 * torch.randn(n, 3, s, s, generator=g)
    image = (image.clamp(0, 1) * 255).round() / 255
    return (image, alpha) if return_masks else image


def shapes_dataset(config: ShapesConfig | None = None, split: str = "train") -> TensorImageDataset:
    """The synthetic shapes set of ``config`` (default :class:`ShapesConfig`): a split of it.

    ``split`` is ``"train"`` (``train_per_class`` images per class) or ``"heldout"``
    (``heldout_per_class``); the two come from separate generators seeded by
    ``(config.seed, split)``, so they share no image. Labels cycle through the classes
    (``0, 1, ..., C-1, 0, 1, ...``). Deterministic: the same config gives the same tensors.
    Rendered on one CPU thread (see ``_one_thread``); the default 2000 training images take
    about 0.2-0.6 s on a 2-core CPU.
    """
    config = config or ShapesConfig()
    if split not in ("train", "heldout"):
        raise AttnPatchError(f"split must be 'train' or 'heldout', got {split!r}")
    per_class = config.train_per_class if split == "train" else config.heldout_per_class
    c = len(config.classes)
    labels = torch.arange(per_class * c) % c
    g = torch.Generator().manual_seed(_epoch_seed(config.seed, 0 if split == "train" else 1))
    images = torch.empty(0, 3, config.size, config.size)
    with _one_thread():
        chunks = [
            render_shapes(
                labels[i : i + 256],
                config.classes,
                config.size,
                generator=g,
                rotation=config.rotation,
            )
            for i in range(0, len(labels), 256)
        ]
    if chunks:
        images = torch.cat(chunks)
    return TensorImageDataset(images, labels, config.classes)


def write_image_folder(
    dataset: Dataset, folder: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Write a labelled set as PNGs ``folder/<class>/<index:06d>.png``; return the folder.

    ``dataset`` needs ``.classes`` and items ``(image (3, H, W) in [0, 1], label)``. Pixels are
    rounded to 8 bits; images of :func:`shapes_dataset` are already 8-bit, so
    ``ImageFolder(folder, classes=dataset.classes)`` reads back the same tensors in the same
    order. Refuses a non-empty folder unless ``overwrite=True``.
    """
    from PIL import Image

    folder = Path(folder)
    classes = getattr(dataset, "classes", None)
    if classes is None:
        raise AttnPatchError("dataset has no .classes; give it a list of class names")
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise AttnPatchError(
            f"{str(folder)!r} is not empty; pass an empty or new folder, or overwrite=True"
        )
    for name in classes:
        (folder / name).mkdir(parents=True, exist_ok=True)
    for i in range(len(dataset)):
        image, label = dataset[i]
        check_image(image[None], name=f"image {i}")
        array = (image.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
        Image.fromarray(array.permute(1, 2, 0).numpy()).save(
            folder / classes[int(label)] / f"{i:06d}.png"
        )
    return folder


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def prompt_for(label_name: str, template: str = DEFAULT_TEMPLATE) -> str:
    """The diffusion prompt for a class: ``template`` with ``{label}`` replaced.

    The name is inserted verbatim (the attention losses look for its tokens in the prompt), so
    folder names such as ``golden_retriever`` should be renamed, or given as CSV labels, in the
    words the text encoder should read.

    >>> prompt_for("circle"), prompt_for("cat", "a close up view of a {label}")
    ('a photo of a circle', 'a close up view of a cat')
    """
    if "{label}" not in template:
        raise AttnPatchError(
            f"prompt template {template!r} has no '{{label}}' placeholder; write e.g. "
            "'a photo of a {label}'"
        )
    if not str(label_name).strip():
        raise AttnPatchError("label name is empty; give each class a name (its words)")
    return template.replace("{label}", str(label_name))


def prompts_for(
    labels: torch.Tensor | Sequence[int], classes: Sequence[str], template: str = DEFAULT_TEMPLATE
) -> list[str]:
    """One prompt per label of a batch: ``(B,)`` indices into ``classes`` -> ``B`` strings.

    >>> prompts_for(torch.tensor([1, 0]), ["circle", "star"])
    ['a photo of a star', 'a photo of a circle']
    """
    out = []
    for label in torch.as_tensor(labels).flatten().tolist():
        if not 0 <= label < len(classes):
            raise AttnPatchError(f"label {label} is outside [0, {len(classes)}) for {classes}")
        out.append(prompt_for(classes[label], template))
    return out
