"""The run folder's figures (training/figures.py) and success_by_scale (training/evaluate.py)."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import attnpatch as ap
from attnpatch import viz
from attnpatch.errors import InputError
from attnpatch.training import load_config, run_training, success_by_scale
from attnpatch.training.evaluate import SCALES, at_scale
from attnpatch.training.figures import class_names, loss_weights, write_figures
from attnpatch.training.run import load_datasets
from attnpatch.training.trainer import attention_pipeline

FIGURES = [
    "patch.png",
    "loss_curves.png",
    "attention.png",
    "examples.png",
    "success_vs_scale.png",
]

FAST = {
    "train.iterations": "4",
    "train.accumulate": "2",
    "train.checkpoint_every": "4",
    "train.progress": "false",
    "attention.num_steps": "2",
    "attention.num_inference_steps": "4",
    "data.synthetic_per_class": "2",
    "data.synthetic_eval_per_class": "2",
    "eval.eot_samples": "2",
    "eval.examples": "6",
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return run_training(load_config(None, {**FAST, "train.out_dir": str(out)}))


def _size(fig) -> tuple[int, int]:
    width, height = fig.get_size_inches()
    return round(width * viz.DPI), round(height * viz.DPI)


def _weights_of(out):
    """The run's [weights] section as it was written (None: the mode's default)."""
    section = json.loads((out / "config.json").read_text())["weights"]
    return {k: v for k, v in section.items() if v is not None}


def test_run_folder_figures_exist_open_and_have_their_figures_size(run):
    out, trainer = run.out_dir, run.trainer
    sizes = {}
    for name in FIGURES:
        with Image.open(out / name) as im:
            assert im.format == "PNG", name
            sizes[name] = im.size
    # the sizes of the same figures drawn again from the run's own data
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    cfg = load_config(None, {"weights." + k: v for k, v in _weights_of(out).items()})
    weights = loss_weights(cfg)  # the run's terms, each None resolved to its mode's default
    logged = [t for t, w in weights.items() if w and any(r[t] is not None for r in records)]
    curves = viz.loss_curves(records, weights=weights)
    assert len(curves.axes) == 2 * (len(logged) + 1)  # each logged term, the total; 2 columns
    assert sizes["loss_curves.png"] == _size(curves)
    image = torch.rand(3, 32, 32)
    steps = [(f"step {i}", torch.rand(4, 4)) for i in range(2)]  # attention.num_steps = 2
    maps = [*steps, ("mean", torch.rand(4, 4))]
    attention = viz.attention_maps(image, maps, "circle", clean=image, clean_maps=maps)
    assert sizes["attention.png"] == _size(attention)
    six = viz.examples(torch.rand(6, 3, 32, 32), list("abcdef"), list("abcdef"))
    assert sizes["examples.png"] == _size(six)
    assert sizes["patch.png"] == _size(viz.patch_figure(trainer.patch.pixels.detach()))
    assert sizes["success_vs_scale.png"] == _size(viz.success_vs_scale(SCALES, SCALES))


def test_the_figures_show_the_runs_predictions_and_attention(run, monkeypatch, tmp_path):
    drawn = {}
    monkeypatch.setattr(viz, "save", lambda fig, path: drawn.__setitem__(path.name, fig))
    trainer = run.trainer
    held = load_datasets(trainer.config)[1]
    images, labels = held.get_batch(list(range(len(held))))
    (tmp_path / "metrics.jsonl").write_text((run.out_dir / "metrics.jsonl").read_text())
    write_figures(trainer, images, labels, tmp_path)
    assert sorted(drawn) == sorted(set(FIGURES) - {"patch.png"})
    # examples: the classifier's prediction on each patched image (the same EOT draws)
    n = trainer.config.eval.examples
    g = torch.Generator().manual_seed(trainer.config.train.seed)
    with torch.no_grad():
        params = trainer.patch.sample_params(n, (32, 32), eot=True, generator=g)
        predicted = trainer.classifier(trainer.patch(images[:n], params=params)[0]).argmax(1)
    names = [trainer.classes[int((trainer.logit_index == p).nonzero())] for p in predicted]
    shown = [ax.get_xlabel() for ax in drawn["examples.png"].axes]
    assert shown == [f"pred: {p}\ntrue: {trainer.classes[y]}" for p, y in zip(names, labels[:n])]
    # attention: the clean image above the patched one, each with one map per attention step
    # and the mean, each with a bar; the clean row is the pipeline's maps of the clean image
    attention = drawn["attention.png"]
    maps = trainer.config.attention.num_steps + 1
    assert len(attention.axes) == 2 * (1 + 2 * maps)
    assert f"'{trainer.classes[int(labels[0])]}'" in attention.get_suptitle()
    clean_shown = [ax for ax in attention.axes if ax.get_title() == "clean image"][0]
    np.testing.assert_allclose(
        clean_shown.get_images()[0].get_array(), images[0].permute(1, 2, 0).numpy(), atol=1e-6
    )
    pipe = trainer.attention or attention_pipeline(trainer.config, trainer.parts)
    label = int(labels[0])
    with torch.no_grad():
        result = pipe(images[:1], [trainer.prompts[label]])
    mean = result.cross_maps(pipe.cross_resolution)[0, ..., trainer.tokens[label]].mean(-1)
    clean_mean = [ax for ax in attention.axes if ax.get_title().endswith(" mean")][0]
    np.testing.assert_allclose(clean_mean.get_images()[1].get_array(), mean, rtol=1e-5)
    # loss curves: raw and weighted columns, with the config's weights
    curves = drawn["loss_curves.png"]
    titles = [ax.get_title() for ax in curves.axes]
    # share mode: the weights move with the norms; each point is weight.<term> x the raw value
    assert any(t.startswith("w x classifier") for t in titles)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    weighted = [ax for ax in curves.axes if ax.get_title().startswith("w x classifier")][0]
    expected = [r["weight.classifier"] * r["classifier"] for r in records]
    np.testing.assert_allclose(weighted.get_lines()[0].get_ydata(), expected, rtol=1e-6)
    lines = drawn["success_vs_scale.png"].axes[0].get_lines()
    assert [list(line.get_xdata()) for line in lines] == [list(SCALES)] * 2


def test_summary_holds_the_rates_by_scale(run):
    summary = json.loads((run.out_dir / "summary.json").read_text())
    rows = summary["by_scale"]
    assert [r["scale"] for r in rows] == list(SCALES)
    row = rows[SCALES.index(0.3)]
    assert row["eot_samples"] == max(1, run.trainer.config.eval.eot_samples // 2)
    trainer = run.trainer
    held = load_datasets(trainer.config)[1]  # the held-out set the run evaluated on
    images, labels = held.get_batch(list(range(len(held))))
    fixed = copy.deepcopy(trainer.patch)  # an independent way to fix the scale
    fixed.scale = 0.3
    expected = ap.evaluate_patch(
        trainer.classifier,
        fixed,
        images,
        trainer.logit_index[labels],
        eot_samples=row["eot_samples"],
        seed=trainer.config.train.seed,
    )
    assert row["success_rate"] == expected.success_rate
    assert row["control_success_rate"] == expected.control_success_rate
    assert row["eligible"] == expected.eligible


def _random_classifier() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3)
    )


def test_success_by_scale_is_evaluate_patch_at_each_fixed_scale():
    classifier = _random_classifier()
    images = torch.rand(12, 3, 16, 16)
    with torch.no_grad():
        labels = classifier(images).argmax(1)
    patch = ap.AdversarialPatch(
        6, init="random", scale=(0.2, 0.6), generator=torch.Generator().manual_seed(2)
    )
    scales = (0.2, 0.45, 0.7)
    got = success_by_scale(classifier, patch, images, labels, scales, eot_samples=3, seed=5)
    assert len(got) == len(scales)
    for s, r in zip(scales, got):
        fixed = copy.deepcopy(patch)
        fixed.scale = s
        want = ap.evaluate_patch(classifier, fixed, images, labels, eot_samples=3, seed=5)
        assert r == want, s
    assert patch.scale == (0.2, 0.6)  # the patch itself is left as it was


class RedVsGreen(nn.Module):
    """Class 1 when the image is redder than it is green, else class 0."""

    def forward(self, x):
        return torch.stack([x[:, 1].mean((1, 2)), x[:, 0].mean((1, 2))], dim=1)


def test_success_by_scale_on_known_decisions():
    # a red square on green images flips the decision once it covers more than half the image:
    # a centred patch of scale s covers s**2 of it
    still = ap.EOT(
        degrees=0, scale=(1, 1), translate=0, distortion=0, contrast=(1, 1), brightness=0, noise=0
    )
    red = ap.AdversarialPatch(4, init=torch.tensor([1.0, 0, 0]).view(3, 1, 1).expand(3, 4, 4))
    red.position, red.eot = "center", still
    images = torch.tensor([0.0, 1.0, 0.0]).view(1, 3, 1, 1).expand(4, 3, 8, 8).clone()
    labels = torch.zeros(4, dtype=torch.long)
    rates = [r.success_rate for r in success_by_scale(RedVsGreen(), red, images, labels, (0.5, 1))]
    assert rates == [0.0, 1.0]


def test_at_scale_copies_the_patch_and_checks_the_scale():
    patch = ap.AdversarialPatch(5, shape="circle", init="random", position="center")
    fixed = at_scale(patch, 0.4)
    assert fixed.scale == 0.4 and fixed.position == "center" and fixed.eot == patch.eot
    assert torch.equal(fixed.pixels, patch.pixels) and torch.equal(fixed.mask, patch.mask)
    assert fixed.pixels is not patch.pixels
    with pytest.raises(InputError, match="scale"):
        at_scale(patch, 0.0)
    with pytest.raises(InputError, match="scales is empty"):
        success_by_scale(RedVsGreen(), patch, torch.rand(2, 3, 8, 8), torch.zeros(2), ())


def test_class_names_map_outputs_through_the_data_then_the_classifier():
    named = SimpleNamespace(classes=[f"c{i}" for i in range(6)])
    trainer = SimpleNamespace(
        classes=["cat", "dog"], logit_index=torch.tensor([5, 2]), classifier=named
    )
    assert class_names(trainer, torch.tensor([5, 2, 0])) == ["cat", "dog", "c0"]
    trainer.classifier = nn.Identity()  # no names of its own
    assert class_names(trainer, torch.tensor([2, 3])) == ["dog", "#3"]
