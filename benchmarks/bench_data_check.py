"""What the up-front data check costs: building an ImageFolder (every file read to its end:
PNG chunks checked, JPEG decoded at 1/8 scale) next to the header-only check it replaced and
to one full decode of every file (the first epoch's reading), side by side on one folder.

    python benchmarks/bench_data_check.py [N] [SIDE]      # default 400 images of 224 px
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from timing import machine

from attnpatch.data import ImageFolder
from attnpatch.images import decode_image


def make_folder(root: Path, n: int, side: int, fmt: str) -> Path:
    rng = np.random.default_rng(0)
    base = (rng.random((side, side, 3)) * 255).astype(np.uint8)  # noisy: a realistic file size
    for i in range(n):
        cls = root / f"c{i % 2}"
        cls.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.roll(base, i, axis=1)).save(cls / f"{i}.{fmt}", quality=90)
    return root


def headers_only(folder: ImageFolder) -> None:
    for path, _ in folder.samples:
        with Image.open(path) as im:
            _ = im.size


def best_of(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 400
    side = int(sys.argv[2]) if len(sys.argv) > 2 else 224
    print(machine())
    print(f"{n} images of {side} px, best of 3, seconds (ms per image)")
    for fmt in ("png", "jpg"):
        with tempfile.TemporaryDirectory() as tmp:
            root = make_folder(Path(tmp), n, side, fmt)
            ds = ImageFolder(root, None, cache=False)
            build = best_of(lambda: ImageFolder(root, None, cache=False))
            header = best_of(lambda: headers_only(ds))
            decode = best_of(lambda: [decode_image(p, None, "crop") for p, _ in ds.samples])
            row = {"header-only check (before)": header, "ImageFolder(...) now": build}
            row["full decode of every file"] = decode
            cells = "; ".join(f"{k} {v:.2f} s ({1e3 * v / n:.2f} ms)" for k, v in row.items())
            print(f"{fmt}: {cells}; now / full decode = {build / decode:.2f}")


if __name__ == "__main__":
    main()
