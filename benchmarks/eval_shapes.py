"""What the "shapes" stack's attention means, measured (the numbers of docs/models.md).

Through the library's own path (VAE -> DDIM inversion -> denoising under hijack ->
``store.aggregate("cross", r)``) on held-out shapes images with their masks:

1. localisation: the label word's mass ratio on its object (1.0 = no preference) at several
   noise levels (the last k of N DDIM steps) and both cross-attention resolutions, for the
   trained stack and the random tiny one;
2. the checks the semantic tests assert: the word's own token vs its neighbours (an off-by-one),
   down vs up blocks, the CFG halves, non-square inputs with the object in a known quadrant;
3. generation: ``parts.pipeline()`` (plain diffusers) samples per prompt, the tiny classifier's
   recognition rate, and a figure of the samples with its predictions
   (``attnpatch.viz.examples``; docs/figures/shapes_samples.png).

    python benchmarks/eval_shapes.py [--model shapes] [--n 200] [--figure PATH]
"""

from __future__ import annotations

import argparse
import time

import torch
from shapes_report import (
    report_halves_and_quadrants,
    report_offsets,
    report_recognition,
    summary,
)

from attnpatch import viz
from attnpatch.data import SHAPE_CLASSES
from attnpatch.models import load_classifier, load_diffusion
from attnpatch.models.shapes_eval import centre_of_mass, heldout_scenes, localisation, word_maps
from attnpatch.models.shapes_sd import label_mass_ratio
from attnpatch.testing import tiny_sd


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--figure", default="docs/figures/shapes_samples.png")
    args = ap.parse_args()
    t0 = time.perf_counter()
    parts = load_diffusion(args.model)
    scenes = heldout_scenes(args.n, seed=0)
    print(f"threads {torch.get_num_threads()}, {args.n} held-out images, model {args.model}")

    print("\n1. localisation (label word mass ratio on the object)")
    for name, p in (("trained", parts), ("random tiny", tiny_sd("sd15"))):
        for n_steps, k in ((10, 1), (10, 2), (10, 3), (10, 5)):
            r = localisation(p, scenes, num_inference_steps=n_steps, num_steps=k)
            print(f"  {name:11s} N={n_steps} k={k} 8x8   {summary(r)}")
        if name == "trained":
            r = localisation(p, scenes, resolution=16)
            print(f"  {name:11s} N=10 k=2 16x16 {summary(r)}")

    print("\n2. the semantic checks (N=10, k=2, 8x8)")
    images, labels, masks = scenes["images"], scenes["labels"], scenes["masks"]
    report_offsets(parts, images, labels, masks)
    down = word_maps(parts, images, labels, places=("down",))
    up = word_maps(parts, images, labels, places=("up",))
    gap = (centre_of_mass(down) - centre_of_mass(up)).norm(dim=1)
    print(f"  down: {summary(label_mass_ratio(down, masks))}")
    print(f"  up:   {summary(label_mass_ratio(up, masks))}")
    print(f"  down vs up centre of mass distance (fraction of side): median {gap.median():.3f}")
    report_halves_and_quadrants(parts, images, labels, masks, args.n)

    print("\n3. generation (parts.pipeline(), 25 DDIM steps)")
    clf = load_classifier("tiny")
    per = 20
    for scale in (1.0, 3.0, 5.0):
        imgs, pred, wanted = report_recognition(parts, clf, scale, per)
        if scale == 3.0 and args.figure:
            keep = torch.arange(len(imgs)).view(5, per)[:, :8].reshape(-1)
            said = [SHAPE_CLASSES[int(p)] for p in pred[keep]]
            asked = [SHAPE_CLASSES[int(w)] for w in wanted[keep]]
            viz.save(viz.examples(imgs[keep], said, asked, ncols=8), args.figure)
            print(f"  figure: {args.figure} (rows: {', '.join(SHAPE_CLASSES)}; the tiny")
            print("  classifier's prediction and the prompted class under each)")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
