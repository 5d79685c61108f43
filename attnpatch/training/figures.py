"""The run folder's figures, drawn with :mod:`attnpatch.viz` (matplotlib, Agg):

* ``patch.png``            the patch, one square per pixel;
* ``loss_curves.png``      one row per loss term and the total, raw and smoothed: the raw
  values beside the weighted contributions (``weight * value``, the config's ``weights``),
  which add up to the total in its row;
* ``attention.png``        the clean image and its patched copy, each with the label word's
  cross-attention per UNet step and averaged, each column on one colour scale;
* ``examples.png``         patched held-out images (EOT on), the classifier's prediction and
  the true class under each;
* ``success_vs_scale.png`` success rate vs patch scale, patch and random-noise control
  (:func:`~attnpatch.training.evaluate.success_by_scale` at ``SCALES``, with half of
  ``eval.eot_samples`` draws per image; its numbers go to summary.json as ``by_scale``).

``attnpatch.viz`` (and so matplotlib) is imported when a figure is drawn, not by
``import attnpatch``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .evaluate import SCALES, success_by_scale
from .trainer import PatchTrainer, attention_pipeline

__all__ = [
    "scale_curve",
    "write_figures",
    "write_patch_figure",
    "attention_heatmaps",
    "class_names",
    "loss_weights",
]


def write_patch_figure(patch: torch.Tensor, path: Path) -> None:
    """``patch.png``: the patch pixels ``(1, 3, h, w)`` or ``(3, h, w)`` in [0, 1]."""
    from .. import viz

    viz.save(viz.patch_figure(patch.detach().cpu()), path)


def scale_curve(
    trainer: PatchTrainer, images: torch.Tensor, labels: torch.Tensor
) -> dict[str, Any]:
    """What summary.json adds: ``{"by_scale": [{"scale", "success_rate",
    "control_success_rate", "eligible", "eot_samples"}, ...]}``, from
    :func:`~attnpatch.training.evaluate.success_by_scale` at :data:`SCALES` with half of
    ``eval.eot_samples`` draws per image (held-out ``images`` ``(N, 3, H, W)`` in [0, 1],
    ``labels`` ``(N,)`` data labels)."""
    cfg = trainer.config
    by_scale = success_by_scale(
        trainer.classifier,
        trainer.patch,
        images,
        trainer.logit_index[labels],
        SCALES,
        target=trainer.target,
        eot_samples=max(1, cfg.eval.eot_samples // 2),  # half the draws: a cheap curve
        seed=cfg.train.seed,
    )
    rows = [
        {
            "scale": s,
            "success_rate": r.success_rate,
            "control_success_rate": r.control_success_rate,
            "eligible": r.eligible,
            "eot_samples": r.eot_samples,
        }
        for s, r in zip(SCALES, by_scale)
    ]
    return {"by_scale": rows}


def write_figures(
    trainer: PatchTrainer,
    images: torch.Tensor,
    labels: torch.Tensor,
    out: Path,
    by_scale: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """loss_curves.png, examples.png, attention.png and success_vs_scale.png in ``out``.

    Args:
        trainer: the trained run (its patch, classifier, config, class names).
        images: held-out ``(N, 3, H, W)`` in [0, 1]; labels: ``(N,)`` data labels.
        by_scale: :func:`scale_curve`'s result (default: computed here).

    Returns:
        ``by_scale`` (what summary.json adds).
    """
    from .. import viz

    if by_scale is None:
        by_scale = scale_curve(trainer, images, labels)
    records = [
        json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line
    ]
    weights = loss_weights(trainer.config)
    viz.save(viz.loss_curves(records, weights=weights), out / "loss_curves.png")
    cfg = trainer.config
    n = min(cfg.eval.examples, len(images))
    g = torch.Generator().manual_seed(cfg.train.seed)
    device = trainer.patch.pixels.device
    with torch.no_grad():
        params = trainer.patch.sample_params(n, tuple(images.shape[-2:]), eot=True, generator=g)
        patched, _ = trainer.patch(images[:n].to(device), params=params)
        predicted = trainer.classifier(patched).argmax(1).cpu()
    truth = [trainer.classes[int(y)] for y in labels[:n]]
    figure = viz.examples(patched.cpu(), class_names(trainer, predicted), truth)
    viz.save(figure, out / "examples.png")
    clean = images[:1].to(device)
    attention_heatmaps(trainer, patched[:1], labels[:1], out / "attention.png", clean=clean)
    success = [r["success_rate"] for r in by_scale["by_scale"]]
    control = [r["control_success_rate"] for r in by_scale["by_scale"]]
    figure = viz.success_vs_scale(SCALES, success, control, trained=trainer.patch.scale)
    viz.save(figure, out / "success_vs_scale.png")
    return by_scale


def loss_weights(config: Any) -> dict[str, float]:
    """``{term: weight}`` of the run (the registered terms, each ``None`` in the config
    resolved to its mode's default); in share mode each ``metrics.jsonl`` line also holds the
    weights that iteration used (``weight.<term>``), which the figure prefers."""
    return config.weights.resolved()


def class_names(trainer: PatchTrainer, outputs: torch.Tensor) -> list[str]:
    """Classifier output indices ``(N,)`` -> names: the data's class for an output the data
    maps to (``trainer.logit_index``), else the classifier's own ``classes`` name, else
    ``"#<index>"``."""
    index = {int(o): trainer.classes[i] for i, o in enumerate(trainer.logit_index)}
    own = getattr(trainer.classifier, "classes", None) or []
    names = []
    for o in outputs.tolist():
        names.append(index.get(o) or (str(own[o]) if o < len(own) else f"#{o}"))
    return names


def attention_heatmaps(
    trainer: PatchTrainer,
    patched: torch.Tensor,
    labels: torch.Tensor,
    path: Path,
    *,
    clean: torch.Tensor | None = None,
) -> None:
    """The label word's cross-attention over one patched image ``(1, 3, H, W)`` in [0, 1],
    per denoising step and averaged, written to ``path``; with ``clean`` (the same image
    without the patch) the clean image's maps in a row above, on the same colour scales."""
    from .. import viz

    # attention losses off: a pipeline just for the figure
    pipe = trainer.attention or attention_pipeline(trainer.config, trainer.parts)
    label = int(labels[0])
    tokens = trainer.tokens[label]
    res = pipe.cross_resolution

    def word_maps(image: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        with torch.no_grad():
            result = pipe(image, [trainer.prompts[label]], per_step=True)
        steps = result.cross.step_maps("cross", res)
        maps = [(f"step {s}", m[-1, ..., tokens].mean(-1).cpu()) for s, m in steps.items()]
        maps.append(("mean", result.cross_maps(res)[0, ..., tokens].mean(-1).cpu()))
        return maps

    extra = {} if clean is None else {"clean": clean[0].cpu(), "clean_maps": word_maps(clean)}
    figure = viz.attention_maps(
        patched[0].cpu(), word_maps(patched), token=trainer.classes[label], **extra
    )
    viz.save(figure, path)
