"""What the "shapes-sd3" stack's attention means, measured (the numbers of docs/models.md).

Through the library's own DiT path (VAE -> ``flow_invert`` -> ``flow_denoise`` under
``hijack`` -> the joint layers' image-to-text block, ``attnpatch.models.shapes_eval.dit_maps``)
on held-out shapes images with their masks:

1. localisation: the label word's mass ratio on its object (1.0 = no preference) at several
   noise levels (the last k of N flow steps), for the trained stack, the untrained
   architecture (same VAE, random transformer) and the random ``"tiny-sd3"``;
2. per joint block, and the checks the semantic tests assert: the word's own token vs its
   neighbours, the CFG halves, non-square inputs with the object in a known quadrant;
3. generation: ``parts.pipeline()`` (diffusers' ``StableDiffusion3Pipeline``) samples per
   prompt and the tiny classifier's recognition rate.

    python benchmarks/eval_shapes_sd3.py [--model shapes-sd3] [--n 200]
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

from attnpatch.models import load_classifier, load_diffusion, shapes_sd3
from attnpatch.models.shapes_eval import heldout_scenes, localisation, word_maps
from attnpatch.models.shapes_sd import label_mass_ratio
from attnpatch.testing import tiny_sd3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="shapes-sd3")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--no-generation", action="store_true")
    args = ap.parse_args()
    t0 = time.perf_counter()
    parts = load_diffusion(args.model)
    scenes = heldout_scenes(args.n, seed=0)
    print(f"threads {torch.get_num_threads()}, {args.n} held-out images, model {args.model}")

    print("\n1. localisation (label word mass ratio on the object, all joint blocks, 8x8)")
    others = (("trained", parts), ("untrained", shapes_sd3(seed=0)), ("tiny-sd3", tiny_sd3()))
    for name, p in others:
        for n_steps, k in ((10, 1), (10, 2), (10, 3), (10, 5)):
            if name != "trained" and k != 2:
                continue
            r = localisation(p, scenes, num_inference_steps=n_steps, num_steps=k)
            print(f"  {name:9s} N={n_steps} k={k}  {summary(r)}")

    print("\n2. the semantic checks (N=10, k=2)")
    images, labels, masks = scenes["images"], scenes["labels"], scenes["masks"]
    n_blocks = parts.transformer.config.num_layers
    for b in range(n_blocks):
        r = label_mass_ratio(word_maps(parts, images, labels, blocks=[b]), masks)
        print(f"  block {b}: {summary(r)}")
    report_offsets(parts, images, labels, masks)
    report_halves_and_quadrants(parts, images, labels, masks, args.n)

    if not args.no_generation:
        print("\n3. generation (parts.pipeline(): StableDiffusion3Pipeline, 25 Euler steps)")
        clf = load_classifier("tiny")
        for scale in (1.0, 3.0, 5.0):
            report_recognition(parts, clf, scale)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
