"""Tests for attnpatch.data: image folders, CSVs, resumable batches, synthetic shapes, prompts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from attnpatch.data import (
    SHAPE_CLASSES,
    SHAPES,
    ImageFolder,
    ShapesConfig,
    TensorImageDataset,
    batch_indices,
    batches,
    prompt_for,
    prompts_for,
    shapes_dataset,
    write_image_folder,
)
from attnpatch.data import folder as data
from attnpatch.errors import AttnPatchError


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
    with pytest.raises(AttnPatchError, match="horse"):
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
    real = data._decode
    monkeypatch.setattr(data, "_decode", lambda *a: calls.append(a[0]) or real(*a))
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
    with pytest.raises(AttnPatchError, match="does not exist"):
        ImageFolder(tmp_path / "nope", size=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AttnPatchError, match="empty data set.*no class subfolders"):
        ImageFolder(tmp_path / "empty", size=8)
    _write_png(tmp_path / "loose" / "a.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(AttnPatchError, match="directly: move them"):
        ImageFolder(tmp_path / "loose", size=8)
    (tmp_path / "noimg" / "cat").mkdir(parents=True)
    (tmp_path / "noimg" / "cat" / "readme.txt").write_text("x")
    with pytest.raises(AttnPatchError, match="class 'cat'.*holds no images"):
        ImageFolder(tmp_path / "noimg", size=8)
    (tmp_path / "bad" / "cat").mkdir(parents=True)
    (tmp_path / "bad" / "cat" / "broken.png").write_bytes(b"definitely not a png")
    with pytest.raises(AttnPatchError, match=r"broken\.png.*re-save"):
        ImageFolder(tmp_path / "bad", size=8)
    with pytest.raises(AttnPatchError, match="'crop' or 'stretch'"):
        ImageFolder(tmp_path / "loose", size=8, resize="pad")


def test_truncated_file_fails_on_decode_naming_it(tmp_path):
    path = tmp_path / "r" / "a" / "t.png"
    _write_png(path, np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:200])  # header intact, pixel data cut
    ds = ImageFolder(tmp_path / "r", size=8)
    with pytest.raises(AttnPatchError, match=r"t\.png"):
        ds[0]


def test_csv_errors_name_file_and_line(folder, tmp_path):
    root, truth = folder
    p = sorted(truth)[0]
    bad = tmp_path / "bad.csv"
    bad.write_text(f"path,label\n{p},cat\n{p},horse\n")
    with pytest.raises(AttnPatchError, match=r"bad\.csv:3: unknown label 'horse'"):
        ImageFolder(bad, size=8, classes=["cat", "dog"])
    bad.write_text(f"path,label\n{p},cat\nmissing.png,cat\n")
    with pytest.raises(AttnPatchError, match=r"bad\.csv:3: image .*missing\.png.* not found"):
        ImageFolder(bad, size=8)
    bad.write_text(f"path,label\n{p}\n")
    with pytest.raises(AttnPatchError, match=r"bad\.csv:2: expected 'path,label'"):
        ImageFolder(bad, size=8)
    bad.write_text("path,label\n")
    with pytest.raises(AttnPatchError, match="empty data set"):
        ImageFolder(bad, size=8)
    bad.write_text(f"{p},5\n")
    with pytest.raises(AttnPatchError, match="index below 2"):
        ImageFolder(bad, size=8, classes=["cat", "dog"])


# --------------------------------------------------------------------------- batches


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
    with pytest.raises(AttnPatchError, match="batch_size"):
        next(batches(ds, 0, seed=0))
    with pytest.raises(AttnPatchError, match="empty data set"):
        next(batches(_ItemOnly(0), 1, seed=0))
    with pytest.raises(AttnPatchError, match="drop_last"):
        next(batches(ds, 4, seed=0, drop_last=True))
    with pytest.raises(AttnPatchError, match="start"):
        next(batches(ds, 1, seed=0, start=-1))

    class Ragged(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return torch.zeros(3, 4 + i, 4), 0

    with pytest.raises(AttnPatchError, match="different sizes.*size="):
        next(batches(Ragged(), 2, seed=0))


# --------------------------------------------------------------------------- synthetic shapes


def _grid_area(name: str, steps: int = 801) -> float:
    t = torch.linspace(-1.2, 1.2, steps, dtype=torch.float64)
    v, u = torch.meshgrid(t, t, indexing="ij")
    cell = (2.4 / (steps - 1)) ** 2
    return float(SHAPES[name](u, v).double().sum()) * cell


@pytest.mark.parametrize(
    "name,area",
    [
        ("circle", math.pi * 0.85**2),
        ("ring", math.pi * (0.95**2 - 0.55**2)),
        ("square", 1.44**2),
        ("diamond", 2 * 0.95**2),
        ("cross", 2 * 0.56 * 1.9 - 0.56**2),
        ("triangle", 3 * math.sqrt(3) / 4),  # equilateral, circumradius 1
        ("star", 5 * 1.0 * 0.45 * math.sin(math.pi / 5)),  # 10 triangles O-outer-inner
    ],
)
def test_shape_areas_match_formulas(name, area):
    assert _grid_area(name) == pytest.approx(area, rel=0.01)


def test_triangle_and_star_point_up():
    pts_u = torch.tensor([0.0, 0.0])
    pts_v = torch.tensor([-0.9, 0.9])  # v grows downwards: first point is near the top
    assert SHAPES["triangle"](pts_u, pts_v).tolist() == [True, False]
    assert SHAPES["star"](pts_u, pts_v).tolist() == [True, False]


def test_shapes_dataset_deterministic_balanced_quantised():
    cfg = ShapesConfig(train_per_class=6, heldout_per_class=3, size=16)
    a, b = shapes_dataset(cfg), shapes_dataset(cfg)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.classes == list(SHAPE_CLASSES) == sorted(SHAPE_CLASSES)
    assert tuple(a.images.shape) == (30, 3, 16, 16)
    assert torch.bincount(a.labels).tolist() == [6] * 5
    assert float(a.images.min()) >= 0 and float(a.images.max()) <= 1
    torch.testing.assert_close(a.images * 255, (a.images * 255).round(), rtol=0, atol=1e-4)
    other_seed = shapes_dataset(
        ShapesConfig(train_per_class=6, heldout_per_class=3, seed=1, size=16)
    )
    assert not torch.equal(a.images, other_seed.images)
    held = shapes_dataset(cfg, "heldout")
    assert len(held) == 15
    flat_train, flat_held = a.images.flatten(1), held.images.flatten(1)
    assert torch.cdist(flat_held, flat_train).min() > 1.0  # no shared images
    state = torch.get_rng_state()
    shapes_dataset(cfg)
    assert torch.equal(torch.get_rng_state(), state)


def test_shape_contrasts_with_background_in_some_channel():
    """Fill and background come from opposite HSV-value bands: >= 0.25 apart in some channel."""
    cfg = ShapesConfig()
    labels = torch.arange(100) % 5
    images, alpha = data.render_shapes(
        labels, cfg.classes, 32, generator=torch.Generator().manual_seed(0), return_masks=True
    )
    assert tuple(alpha.shape) == (100, 1, 32, 32)
    inside, outside = alpha == 1, alpha == 0
    assert inside.flatten(1).any(1).all() and outside.flatten(1).any(1).all()
    fill = (images * inside).sum((2, 3)) / inside.sum((2, 3))  # (N, 3) mean colours
    for k in range(100):
        background = images[k][:, outside[k, 0]]  # (3, P)
        gap = (fill[k][:, None] - background).abs().amax(0)  # best channel, per pixel
        assert float(gap.quantile(0.05)) > 0.15  # 0.25 minus pixel noise
    # Shape sizes: coverage = area(shape) * radius^2 with radius in [0.22, 0.36] * 32 px.
    frac = alpha.flatten(1).sum(1) / 32**2
    circle = frac[labels == 0]
    lo, hi = math.pi * 0.85**2 * 0.22**2, math.pi * 0.85**2 * 0.36**2
    assert float(circle.min()) > 0.9 * lo and float(circle.max()) < 1.1 * hi


def test_shape_classes_are_single_tiny_tokens():
    from attnpatch.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    for name in SHAPE_CLASSES:
        ids = tok(name, add_special_tokens=False).input_ids
        assert len(ids) == 1, name
        assert ids[0] in tok(prompt_for(name)).input_ids


def test_config_validation():
    with pytest.raises(AttnPatchError, match="unknown shape classes.*hexagon"):
        ShapesConfig(classes=("circle", "hexagon"))
    with pytest.raises(AttnPatchError, match="distinct"):
        ShapesConfig(classes=("circle", "circle"))
    with pytest.raises(AttnPatchError, match="split"):
        shapes_dataset(ShapesConfig(train_per_class=1), "test")
    assert ShapesConfig().key() == ShapesConfig().key() != ShapesConfig(seed=1).key()


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
    with pytest.raises(AttnPatchError, match="not empty"):
        write_image_folder(ds, root)


def test_tensor_dataset_validation():
    with pytest.raises(AttnPatchError, match="channels-last"):
        TensorImageDataset(torch.rand(2, 8, 8, 3), torch.zeros(2, dtype=torch.long), ["a"])
    with pytest.raises(AttnPatchError, match=r"labels must lie in \[0, 1\)"):
        TensorImageDataset(torch.rand(2, 3, 4, 4), torch.tensor([0, 1]), ["a"])
    with pytest.raises(AttnPatchError, match="integers"):
        TensorImageDataset(torch.rand(2, 3, 4, 4), torch.tensor([0.0, 0.0]), ["a"])


# --------------------------------------------------------------------------- prompts


def test_prompts():
    assert prompt_for("star") == "a photo of a star"
    assert prompt_for("red car", "a painting of a {label}, close up") == (
        "a painting of a red car, close up"
    )
    assert prompts_for(torch.tensor([2, 0]), ["cat", "dog", "frog"]) == [
        "a photo of a frog",
        "a photo of a cat",
    ]
    with pytest.raises(AttnPatchError, match="placeholder"):
        prompt_for("cat", "a photo of a cat")
    with pytest.raises(AttnPatchError, match="outside"):
        prompts_for([3], ["cat"])
