"""Labelled image sets: a folder of class subfolders or a CSV of ``path,label``, in memory.

Every image these data sets return is classifier-side: ``(3, H, W)`` float RGB in [0, 1] (a batch
is ``(B, 3, H, W)``), with an ``int`` label indexing ``dataset.classes``.

* :class:`ImageFolder` reads a folder with one subfolder per class, or a CSV of ``path,label``.
* :class:`TensorImageDataset` holds an in-memory set (e.g. :func:`attnpatch.data.shapes_dataset`).
* :func:`write_image_folder` writes any labelled set out as an image folder.

>>> ds = TensorImageDataset(torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 0, 1]), ["cat", "dog"])
>>> len(ds), tuple(ds[1][0].shape), ds[1][1]
(4, (3, 8, 8), 1)
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .._util import as_pair
from ..errors import DataError, InputError, RunFolderError
from ..images import check_image, decode_image, read_image, to_pil, verify_image

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFolder",
    "TensorImageDataset",
    "read_image",
    "write_image_folder",
]

#: File endings (lower case) :class:`ImageFolder` reads; other files are ignored.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")

Size = int | tuple[int, int]


class ImageFolder(Dataset):
    """Labelled images from a folder of class subfolders, or from a CSV of ``path,label``.

    Items are ``(image, label)``: ``image`` is ``(3, H, W)`` float RGB in [0, 1] (grayscale and
    palette images are converted to RGB, alpha is dropped, EXIF rotation applied), ``label`` an
    ``int`` indexing :attr:`classes`. A ``DataLoader`` over it yields ``(B, 3, H, W)`` images and
    ``(B,)`` int64 labels; :func:`~attnpatch.data.batches` gives a seeded, resumable order.

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

    Bad input raises :class:`~attnpatch.errors.DataError` at construction, before any training: a missing
    source, no images, an empty class folder, a CSV row that is malformed, names a missing file
    or an unknown label (with the line number), or a file that is not an image, is truncated
    or is a decompression bomb (every file is read to its end: a PNG's chunks checked, a JPEG
    decoded at 1/8 scale; full pixel data is decoded on first access).

    >>> import tempfile
    >>> from attnpatch.data import ShapesConfig, shapes_dataset
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
        self.source = Path(source).expanduser()
        self.size = None if size is None else as_pair(size, "size")
        if resize not in ("crop", "stretch"):
            raise InputError(f"resize must be 'crop' or 'stretch', got {resize!r}")
        self.resize = resize
        if not self.source.exists():
            raise DataError(
                f"data source {str(self.source)!r} does not exist; pass a folder with one "
                "subfolder per class, or a CSV file of path,label rows"
            )
        if self.source.is_dir():
            samples, names = self._scan_folder(self.source, classes)
        elif self.source.suffix.lower() == ".csv":
            samples, names = self._read_csv(self.source, classes)
        else:
            raise DataError(
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
                raise DataError(
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
            raise DataError(
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
                raise DataError(
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
            raise DataError(
                f"empty data set: {str(path)!r} has no path,label rows; add one row per image"
            )
        raw: list[tuple[int, str, str]] = []
        for n, row in rows:
            if len(row) <= max(path_col, label_col) or not row[path_col] or not row[label_col]:
                raise DataError(
                    f"{str(path)}:{n}: expected 'path,label', got {','.join(row)!r}; write one "
                    "image path and its label per row"
                )
            file = Path(row[path_col]).expanduser()
            if not file.is_absolute():
                file = path.parent / file
            if not file.is_file():
                raise DataError(
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
                raise InputError("classes= is empty; pass the class names in label order")
        lookup = {name: i for i, name in enumerate(names)}
        samples = []
        for n, file, lab in raw:
            if lab in lookup:
                label = lookup[lab]
            elif is_index(lab) and int(lab) < len(names):
                label = int(lab)
            else:
                shown = names if len(names) <= 20 else names[:20] + ["..."]
                raise DataError(
                    f"{str(path)}:{n}: unknown label {lab!r}; labels must be one of {shown} or "
                    f"an index below {len(names)}; fix the row or pass classes=[...]"
                )
            samples.append((file, label))
        return samples, names

    def _check_headers(self) -> list[tuple[int, int]]:
        """Read every file to its end (:func:`~attnpatch.images.verify_image`: a truncated PNG
        or JPEG is found here, not hours into a run); list all bad files at once."""
        sizes, bad = [], []
        for path, _ in self.samples:
            try:
                sizes.append(verify_image(path))
            except DataError as e:
                bad.append(f"{path} ({e.reason})")
        if bad:
            shown = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise DataError(
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
        image = decode_image(self.samples[index][0], self.size, self.resize)
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
    path :func:`~attnpatch.data.batches` uses).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]):
        check_image(images)
        labels = torch.as_tensor(labels)
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise InputError(
                f"labels must be (N,) with N = {images.shape[0]} images, got {tuple(labels.shape)}"
            )
        if labels.is_floating_point():
            raise InputError("labels must be integers; pass labels.long()")
        self.classes = [str(c) for c in classes]
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(self.classes)):
            raise InputError(
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


def write_image_folder(
    dataset: Dataset, folder: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Write a labelled set as PNGs ``folder/<class>/<index:06d>.png``; return the folder.

    ``dataset`` needs ``.classes`` and items ``(image (3, H, W) in [0, 1], label)``. Pixels are
    rounded to 8 bits; images of :func:`~attnpatch.data.shapes_dataset` are already 8-bit, so
    ``ImageFolder(folder, classes=dataset.classes)`` reads back the same tensors in the same
    order. Refuses a non-empty folder unless ``overwrite=True``.
    """
    folder = Path(folder)
    classes = getattr(dataset, "classes", None)
    if classes is None:
        raise InputError("dataset has no .classes; give it a list of class names")
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise RunFolderError(
            f"{str(folder)!r} is not empty; pass an empty or new folder, or overwrite=True"
        )
    for name in classes:
        (folder / name).mkdir(parents=True, exist_ok=True)
    for i in range(len(dataset)):
        image, label = dataset[i]
        check_image(image[None], name=f"image {i}")
        to_pil(image).save(folder / classes[int(label)] / f"{i:06d}.png")
    return folder
