"""Shared report steps of the shapes evaluations (eval_shapes.py for the UNet ``"shapes"``
stack, eval_shapes_sd3.py for the DiT ``"shapes-sd3"`` stack; run them from the repo root):
the summary line of mass ratios, the CFG-halves and non-square checks, and the generation
recognition rate."""

from __future__ import annotations

import torch

from attnpatch.data import SHAPE_CLASSES
from attnpatch.diffusion import DiffusionParts
from attnpatch.models.shapes_eval import centre_of_mass, generate, heldout_scenes, word_maps
from attnpatch.models.shapes_sd import label_mass_ratio


def summary(r: torch.Tensor) -> str:
    """One line for mass ratios ``r (N,)``: median, share above 1.5, mean."""
    return f"median {r.median():.2f}  >1.5: {(r > 1.5).float().mean():4.0%}  mean {r.mean():.2f}"


def report_offsets(
    parts: DiffusionParts, images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor
) -> None:
    """Print the mass ratio of the label word's own token and of its neighbours (an
    off-by-one in the token indices would show here)."""
    for offset in (-1, 0, 1):
        r = label_mass_ratio(word_maps(parts, images, labels, offset=offset), masks)
        print(f"  token offset {offset:+d}: {summary(r)}")


def report_halves_and_quadrants(
    parts: DiffusionParts,
    images: torch.Tensor,
    labels: torch.Tensor,
    masks: torch.Tensor,
    n: int,
) -> None:
    """Print the label word's mass ratio in each CFG half (scale 3.0), then, on ``n``
    non-square (32x48, 48x32) scenes with the object in a known quadrant, how often the map's
    centre of mass falls in that quadrant."""
    for half in ("cond", "uncond"):
        m = word_maps(parts, images, labels, guidance_scale=3.0, half=half)
        print(f"  CFG 3.0, {half:6s} half: {summary(label_mass_ratio(m, masks))}")
    corners = torch.tensor([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]])
    for size in ((32, 48), (48, 32)):
        centres = corners.repeat(n // 4, 1)
        s = heldout_scenes(len(centres), seed=2, size=size, centres=centres)
        com = centre_of_mass(word_maps(parts, s["images"], s["labels"]))
        right = ((com > 0.5) == (centres > 0.5)).all(dim=1).float().mean()
        print(f"  {size[0]}x{size[1]} input: centre of mass in the object's quadrant {right:.0%}")


def report_recognition(
    parts: DiffusionParts, clf: torch.nn.Module, scale: float, per: int = 20
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Generate ``per`` samples of each class's prompt at guidance ``scale``, print the
    classifier's recognition rate (total and per class); returns ``(images (5 per, 3, H, W),
    predicted (5 per,), wanted (5 per,))``."""
    prompts = [f"a photo of a {c}" for c in SHAPE_CLASSES for _ in range(per)]
    imgs = generate(parts, prompts, seed=0, guidance_scale=scale)
    with torch.no_grad():
        pred = clf(imgs).argmax(1)
    wanted = torch.arange(len(SHAPE_CLASSES)).repeat_interleave(per)
    rates = [(pred[wanted == c] == c).float().mean().item() for c in range(5)]
    total = (pred == wanted).float().mean()
    each = " ".join(f"{c} {r:.0%}" for c, r in zip(SHAPE_CLASSES, rates))
    print(f"  guidance {scale}: recognised {total:.0%} (chance 20%)  [{each}]")
    return imgs, pred, wanted
