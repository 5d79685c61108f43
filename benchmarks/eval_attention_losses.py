"""Do the attention losses do what docs/losses.md says? Measured on the embedded default.

Runs of ``attnpatch train``'s default config (same seed, data, patch init and budget) that
differ only in the attention weights: classifier only, + cross-attention variance at several
weights, + self-attention structure at several weights, both at the default weights. Each trained patch is then measured on held-out shapes
images with their object masks (placement and EOT drawn once, the same for every run and
for a random-noise control patch):

* attack success (``evaluate_patch``, EOT on) and the control's;
* the label word's cross-attention mass ratio on the visible object (1.0 = no preference; the
  variance loss should lower it: a flatter label map) and the label map's variance itself;
* the self-attention MSE between the patched and the clean image (the structure loss should
  lower it).

    python benchmarks/eval_attention_losses.py [--iterations 200] [--n 100] [--out runs/losses]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from attnpatch.losses import cross_attention_variance, self_attention_structure
from attnpatch.models.shapes_eval import heldout_scenes
from attnpatch.models.shapes_sd import label_mass_ratio
from attnpatch.training import TrainConfig, run_training
from attnpatch.training.trainer import attention_pipeline


def measure(trainer, scenes, patch, seed: int = 0) -> dict[str, float]:
    """Attention measures of ``patch`` on ``scenes`` (``patch=None``: the clean images)."""
    images, labels, masks = scenes["images"], scenes["labels"], scenes["masks"]
    pipe = attention_pipeline(trainer.config, trainer.parts)
    embeds = pipe.encode_prompts(trainer.prompts).take(labels)
    tokens = [trainer.tokens[int(y)] for y in labels]
    with torch.no_grad():
        clean = pipe(images, embeds)
        if patch is None:
            patched, visible = images, masks
        else:
            g = torch.Generator().manual_seed(seed)
            params = patch.sample_params(
                len(images), tuple(images.shape[-2:]), eot=True, generator=g
            )
            patched, pmask = patch(images, params=params)
            visible = masks * (1 - pmask)  # the object where the patch does not cover it
        result = pipe(patched, embeds)
    maps = result.cross_maps(pipe.cross_resolution)
    label = torch.stack([maps[i, ..., t].mean(-1) for i, t in enumerate(tokens)])
    ratio = label_mass_ratio(label, visible)
    var = cross_attention_variance(maps, tokens, reduction="none")
    mse = self_attention_structure(result.self_maps(), clean.self_maps(), reduction="none")
    return {
        "object_ratio_median": float(ratio.median()),
        "label_variance_mean": float(var.mean()),
        "self_mse_mean": float(mse.mean()),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--out", default="runs/losses")
    ap.add_argument("--cross-weights", type=float, nargs="*", default=[1e3, 1e4, 1e5])
    ap.add_argument("--self-weights", type=float, nargs="*", default=[1e4, 1e5, 1e6])
    args = ap.parse_args()
    w = TrainConfig().weights
    runs = {"classifier only": dict(cross_attention=0.0, self_attention=0.0)}
    for c in args.cross_weights:
        runs[f"+ cross variance x{c:g}"] = dict(cross_attention=c, self_attention=0.0)
    for c in args.self_weights:
        runs[f"+ self structure x{c:g}"] = dict(cross_attention=0.0, self_attention=c)
    runs["both (default weights)"] = {}
    scenes = heldout_scenes(args.n, seed=3)
    rows = {}
    trainer = None
    for name, change in runs.items():
        cfg = TrainConfig()
        cfg.weights = dataclasses.replace(w, **change)
        cfg.train.iterations = args.iterations
        cfg.train.progress = False
        cfg.train.out_dir = str(Path(args.out) / f"run{len(rows)}")
        t0 = time.perf_counter()
        res = run_training(cfg, overwrite=True, log=lambda *a: None)
        trainer = res.trainer
        ev = res.evaluation
        row = {"success": ev.success_rate, "control": ev.control_success_rate}
        row |= measure(trainer, scenes, trainer.patch)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows[name] = row
        print(name, json.dumps(row), flush=True)
    rows["clean images"] = measure(trainer, scenes, None)
    rows["random-noise control"] = measure(
        trainer, scenes, trainer.patch.random_like(generator=torch.Generator().manual_seed(0))
    )
    print(
        "\n| run | success | control | label mass ratio on object | label map variance | "
        "self-attention MSE to clean |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        s = f"{r['success']:.1%} | {r['control']:.1%}" if "success" in r else "– | –"
        print(
            f"| {name} | {s} | {r['object_ratio_median']:.2f} | "
            f"{r['label_variance_mean']:.2e} | {r['self_mse_mean']:.2e} |"
        )


if __name__ == "__main__":
    main()
