"""Image folders, CSVs and in-memory sets (attnpatch/data/folder.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from attnpatch.data import (
    ImageFolder,
    ShapesConfig,
    TensorImageDataset,
    read_image,
    shapes_dataset,
    write_image_folder,
)
from attnpatch.data import folder as data
from attnpatch.errors import DataError, ImageLayoutError, InputError, RunFolderError


def _write_png(path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture
def folder(tmp_path):
    """root/<class>/<i>.png with random 8x8 RGB pixels; returns (root, {path: (pixels, cls)})."""
    rng = np.random.default_rng(0)
    truth = {}
    for cls in ("dog", "cat", "bird"):  # written unsorted on purpose
        for i in range(3 if cls != "bird" else 2):
            pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            path = tmp_path / "root" / cls / f"{i}.png"
            _write_png(path, pixels)
            truth[str(path)] = (pixels, cls)
    (tmp_path / "root" / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "root" / ".hidden").mkdir()
    return tmp_path / "root", truth


# --------------------------------------------------------------------------- image folder / CSV


def test_folder_round_trip_pixels_labels_and_sorted_classes(folder):
    root, truth = folder
    ds = ImageFolder(root, size=8)
    assert ds.classes == ["bird", "cat", "dog"]
    assert len(ds) == len(truth) == 8
    for i, (path, label) in enumerate(ds.samples):
        image, lab = ds[i]
        pixels, cls = truth[path]
        assert lab == label == ds.classes.index(cls)
        assert image.dtype == torch.float32 and tuple(image.shape) == (3, 8, 8)
        expected = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
        torch.testing.assert_close(image, expected, rtol=0, atol=0)
    # Files sorted within a class: labels are non-decreasing in sample order.
    assert [lab for _, lab in ds.samples] == sorted(lab for _, lab in ds.samples)


def test_folder_classes_argument_selects_and_orders(folder):
    root, _ = folder
    ds = ImageFolder(root, size=8, classes=["dog", "bird"])
    assert ds.classes == ["dog", "bird"]
    assert sorted({lab for _, lab in ds.samples}) == [0, 1]
    assert len(ds) == 5
    with pytest.raises(DataError, match="horse"):
        ImageFolder(root, size=8, classes=["dog", "horse"])


def test_dataloader_batches_are_bchw_in_unit_range(folder):
    root, _ = folder
    images, labels = next(iter(DataLoader(ImageFolder(root, size=(6, 4)), batch_size=4)))
    assert tuple(images.shape) == (4, 3, 6, 4) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and tuple(labels.shape) == (4,)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0


def test_csv_round_trip_names_indices_relative_paths(folder, tmp_path):
    root, truth = folder
    paths = sorted(truth)
    csv_dir = tmp_path / "lists"
    csv_dir.mkdir()
    # Relative to the CSV's folder, absolute, names and an index, a header with an extra column.
    lines = ["id,path,label"]
    expected = []
    for k, p in enumerate(paths):
        cls = truth[p][1]
        rel = "../root/" + "/".join(p.split("/")[-2:])
        lines.append(f"{k},{rel if k % 2 else p},{cls}")
        expected.append((p, cls))
    (csv_dir / "train.csv").write_text("\n".join(lines) + "\n")
    ds = ImageFolder(csv_dir / "train.csv", size=8)
    assert ds.classes == ["bird", "cat", "dog"]
    for i, (p, cls) in enumerate(expected):
        image, label = ds[i]
        assert ds.classes[label] == cls
        ref = torch.from_numpy(truth[p][0]).permute(2, 0, 1).float() / 255
        torch.testing.assert_close(image, ref, rtol=0, atol=0)

    # No header, integer labels: classes become "0".."max"; names + indices with classes=.
    (csv_dir / "idx.csv").write_text(f"{paths[0]},2\n{paths[1]},0\n")
    ds = ImageFolder(csv_dir / "idx.csv", size=8)
    assert ds.classes == ["0", "1", "2"] and [lab for _, lab in ds.samples] == [2, 0]
    (csv_dir / "mixed.csv").write_text(f"{paths[0]},cat\n{paths[1]},2\n")
    ds = ImageFolder(csv_dir / "mixed.csv", size=8, classes=["bird", "cat", "dog"])
    assert [lab for _, lab in ds.samples] == [1, 2]


def test_resize_policies_crop_keeps_centre_stretch_keeps_everything(tmp_path):
    # 12 wide x 4 high: red | green | blue blocks of 4x4.
    array = np.zeros((4, 12, 3), dtype=np.uint8)
    array[:, :4, 0] = array[:, 4:8, 1] = array[:, 8:, 2] = 255
    _write_png(tmp_path / "r" / "a" / "x.png", array)
    crop = ImageFolder(tmp_path / "r", size=4)[0][0]
    green = torch.zeros(3, 4, 4)
    green[1] = 1
    torch.testing.assert_close(crop, green, rtol=0, atol=0)  # exact: box is 4x4, scale 1
    stretch = ImageFolder(tmp_path / "r", size=4, resize="stretch")[0][0]
    assert (stretch[0, :, 0] > 0.8).all() and (stretch[2, :, -1] > 0.8).all()
    assert (stretch[1, :, 1:3] > 0.5).all()


def test_grayscale_and_rgba_become_rgb(tmp_path):
    gray = np.arange(16, dtype=np.uint8).reshape(4, 4) * 10
    _write_png(tmp_path / "r" / "g" / "gray.png", gray)
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 7
    _write_png(tmp_path / "r" / "g" / "rgba.png", rgba)
    ds = ImageFolder(tmp_path / "r", size=4)
    g, a = ds[0][0], ds[1][0]
    for c in range(3):
        torch.testing.assert_close(g[c], torch.from_numpy(gray).float() / 255, rtol=0, atol=0)
    torch.testing.assert_close(a[0], torch.full((4, 4), 200 / 255), rtol=0, atol=0)
    assert a.shape[0] == 3 and float(a[1:].abs().max()) == 0.0


def test_cache_avoids_decoding_twice(folder, monkeypatch):
    root, _ = folder
    calls = []
    real = data.decode_image
    monkeypatch.setattr(data, "decode_image", lambda *a: calls.append(a[0]) or real(*a))
    cached = ImageFolder(root, size=8)  # 8 images * 192 bytes: under the default limit
    assert cached.cache
    first = [cached[i][0] for i in range(len(cached))]
    again = [cached[i][0] for i in range(len(cached))]
    assert len(calls) == len(cached)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    calls.clear()
    uncached = ImageFolder(root, size=8, cache_bytes=100)  # too big for the limit
    assert not uncached.cache
    for _ in range(2):
        for i in range(len(uncached)):
            uncached[i]
    assert len(calls) == 2 * len(uncached)


def test_bad_sources_raise_naming_the_problem(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ImageFolder(tmp_path / "nope", size=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty data set.*no class subfolders"):
        ImageFolder(tmp_path / "empty", size=8)
    _write_png(tmp_path / "loose" / "a.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(DataError, match="directly: move them"):
        ImageFolder(tmp_path / "loose", size=8)
    (tmp_path / "noimg" / "cat").mkdir(parents=True)
    (tmp_path / "noimg" / "cat" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="class 'cat'.*holds no images"):
        ImageFolder(tmp_path / "noimg", size=8)
    (tmp_path / "bad" / "cat").mkdir(parents=True)
    (tmp_path / "bad" / "cat" / "broken.png").write_bytes(b"definitely not a png")
    with pytest.raises(DataError, match=r"broken\.png.*re-save"):
        ImageFolder(tmp_path / "bad", size=8)
    with pytest.raises(InputError, match="'crop' or 'stretch'"):
        ImageFolder(tmp_path / "loose", size=8, resize="pad")


def test_truncated_file_fails_up_front_naming_it(tmp_path, raises):
    path = tmp_path / "r" / "a" / "t.png"
    _write_png(path, np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:200])  # header intact, pixel data cut
    with raises(DataError, "t.png", "not readable"):  # was: at the first decode, mid-run
        ImageFolder(tmp_path / "r", size=8)
    with raises(DataError, "t.png", "re-save"):
        read_image(path)


def test_csv_errors_name_file_and_line(folder, tmp_path):
    root, truth = folder
    p = sorted(truth)[0]
    bad = tmp_path / "bad.csv"
    bad.write_text(f"path,label\n{p},cat\n{p},horse\n")
    with pytest.raises(DataError, match=r"bad\.csv:3: unknown label 'horse'"):
        ImageFolder(bad, size=8, classes=["cat", "dog"])
    bad.write_text(f"path,label\n{p},cat\nmissing.png,cat\n")
    with pytest.raises(DataError, match=r"bad\.csv:3: image .*missing\.png.* not found"):
        ImageFolder(bad, size=8)
    bad.write_text(f"path,label\n{p}\n")
    with pytest.raises(DataError, match=r"bad\.csv:2: expected 'path,label'"):
        ImageFolder(bad, size=8)
    bad.write_text("path,label\n")
    with pytest.raises(DataError, match="empty data set"):
        ImageFolder(bad, size=8)
    bad.write_text(f"{p},5\n")
    with pytest.raises(DataError, match="index below 2"):
        ImageFolder(bad, size=8, classes=["cat", "dog"])


# --------------------------------------------------------------------------- in-memory sets and writing


def test_write_image_folder_reads_back_identical(tmp_path):
    ds = shapes_dataset(ShapesConfig(train_per_class=3, size=16))
    root = write_image_folder(ds, tmp_path / "shapes")
    back = ImageFolder(root, size=16, classes=ds.classes)
    assert back.classes == ds.classes and len(back) == len(ds)
    # Files are named by index, so sorted order per class is dataset order per class.
    for c in range(len(ds.classes)):
        mine = ds.images[ds.labels == c]
        theirs = torch.stack([back[i][0] for i, (_, lab) in enumerate(back.samples) if lab == c])
        torch.testing.assert_close(theirs, mine, rtol=0, atol=0)
    with pytest.raises(RunFolderError, match="not empty"):
        write_image_folder(ds, root)


def test_tensor_dataset_validation():
    with pytest.raises(ImageLayoutError, match="channels-last"):
        TensorImageDataset(torch.rand(2, 8, 8, 3), torch.zeros(2, dtype=torch.long), ["a"])
    with pytest.raises(InputError, match=r"labels must lie in \[0, 1\)"):
        TensorImageDataset(torch.rand(2, 3, 4, 4), torch.tensor([0, 1]), ["a"])
    with pytest.raises(InputError, match="integers"):
        TensorImageDataset(torch.rand(2, 3, 4, 4), torch.tensor([0.0, 0.0]), ["a"])


def test_bad_sizes_raise(folder):
    root, _ = folder
    for size in (0, (8, -1), (8, 8, 8), "big"):
        with pytest.raises(InputError, match="size must be a positive int"):
            ImageFolder(root, size=size)
    assert ImageFolder(root, size=None).size is None  # None keeps the native sizes
    assert ImageFolder(root, size=(6, 4)).size == (6, 4)


def test_docstring_examples_run():
    import doctest

    import attnpatch.data.folder

    result = doctest.testmod(attnpatch.data.folder)
    assert result.attempted > 0 and result.failed == 0
