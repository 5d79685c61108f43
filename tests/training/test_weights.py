"""weights.mode: shares of the update (scale-free) vs the weighted sum; the term registry."""

from __future__ import annotations

import contextlib
import dataclasses
import json

import pytest
import torch

import attnpatch as ap
from attnpatch.data import ShapesConfig, shapes_dataset
from attnpatch.errors import ConfigError
from attnpatch.losses import term_gradients
from attnpatch.models import load_diffusion
from attnpatch.testing import tiny_classifier
from attnpatch.training import terms as registry
from attnpatch.training.config import add_config_flags, apply_flags, config_from_dict
from attnpatch.training.run import build_patch
from attnpatch.training.weights import WeightsConfig


@pytest.fixture(scope="module")
def parts():
    return load_diffusion("tiny")


@pytest.fixture(scope="module")
def data():
    return shapes_dataset(ShapesConfig(size=32, train_per_class=2, heldout_per_class=1, seed=5))


@contextlib.contextmanager
def term_replaced(name, compute):
    """Register ``compute`` for term ``name`` for the block, then restore the original."""
    original = registry.term(name)
    registry.register_term(dataclasses.replace(original, compute=compute), overwrite=True)
    try:
        yield
    finally:
        registry.register_term(original, overwrite=True)


def config(weights=None, **train):
    return config_from_dict(
        {
            "train": {"iterations": 6, "accumulate": 2, "progress": False, **train},
            "attention": {"num_inference_steps": 4, "num_steps": 1},
            "patch": {"size": 8, "scale": [0.3, 0.4]},
            "weights": {"l2": 0.1, "measure_every": 2, **(weights or {})},
        }
    )


def trainer_for(cfg, parts, data):
    return ap.PatchTrainer(
        cfg,
        classifier=tiny_classifier(len(data.classes)),
        parts=parts,
        patch=build_patch(cfg, torch.device("cpu")),
        train_data=data,
    )


def trained(cfg, parts, data):
    trainer = trainer_for(cfg, parts, data)
    records = []
    trainer.hooks["iteration"].append(lambda t, out, stepped: records.append(out))
    trainer.train()
    return trainer, records


@pytest.mark.parametrize("name", ["cross_attention", "classifier"])
@pytest.mark.parametrize("scale", [1e-3, 1e3])
def test_share_mode_is_scale_free(parts, data, name, scale):
    """Multiplying one term's raw value by a constant leaves the patch after several optimizer
    steps unchanged (share mode), while it moves the weighted sum's patch (sum mode)."""
    cfg = config()
    reference, _ = trained(cfg, parts, data)
    original = registry.term(name).compute
    with term_replaced(name, lambda t, x: scale * original(t, x)):
        scaled, _ = trained(cfg, parts, data)
    assert reference.steps == scaled.steps == 3
    start = build_patch(cfg, torch.device("cpu")).pixels
    assert (reference.patch.pixels - start).abs().max() > 1e-3  # the patch moved
    torch.testing.assert_close(scaled.patch.pixels, reference.patch.pixels, rtol=1e-5, atol=1e-5)
    if name == "classifier" and scale == 1e3:  # the property is not vacuous
        sums = config({"mode": "sum", "classifier": 1.0, "cross_attention": 1e5})
        a, _ = trained(sums, parts, data)
        with term_replaced(name, lambda t, x: scale * original(t, x)):
            b, _ = trained(sums, parts, data)
        assert (a.patch.pixels - b.patch.pixels).abs().max() > 1e-3


def test_the_update_along_each_terms_gradient_grows_with_its_share(parts, data):
    images, labels = data.get_batch([0, 1])
    along = []
    for share in (0.1, 0.4, 0.8):
        w = {"classifier": 0.5, "cross_attention": share, "self_attention": 0.25}
        trainer = trainer_for(config(w), parts, data)
        own = {
            n: g / g.norm()
            for n, g in term_gradients(
                trainer.forward(images, labels, [0, 1]).terms, trainer.patch.pixels
            ).items()
        }
        trainer.backward(trainer.forward(images, labels, [0, 1]))
        grad = trainer.patch.pixels.grad.flatten()
        along.append({n: float(grad @ g.flatten()) for n, g in own.items()})
    cross = [a["cross_attention"] for a in along]
    assert cross[0] < cross[1] < cross[2]
    clf = [a["classifier"] for a in along]  # the others' relative shares fall
    assert clf[0] > clf[2]


def test_measured_shares_are_logged_at_measuring_iterations(parts, data, tmp_path):
    cfg = config({"classifier": 2.0, "cross_attention": 1.0, "self_attention": 1.0, "l2": 0.0})
    trainer = trainer_for(cfg, parts, data)
    trainer.out_dir = tmp_path
    trainer.train()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    measured = [r["iteration"] for r in lines if "share.classifier" in r]
    assert measured == [0, 2, 4]  # measure_every = 2
    first = {k[6:]: v for k, v in lines[0].items() if k.startswith("share.")}
    assert first == pytest.approx(
        {"classifier": 0.5, "cross_attention": 0.25, "self_attention": 0.25}, abs=1e-6
    )
    for r in lines:
        shares = [v for k, v in r.items() if k.startswith("share.")]
        assert not shares or sum(shares) == pytest.approx(1.0)
    state = torch.load(trainer.save_checkpoint() / "state.pt", weights_only=False)
    assert set(state["shares"]["norms"]) == {"classifier", "cross_attention", "self_attention"}


def test_sum_mode_is_the_weighted_sum(parts, data):
    images, labels = data.get_batch([0, 1])
    grads = {}
    for every in (0, 1):
        cfg = config({"mode": "sum", "cross_attention": 1e4, "measure_every": every})
        trainer = trainer_for(cfg, parts, data)
        out = trainer.forward(images, labels, [0, 1])
        weights = out.terms.weights
        expected = sum(weights[n] * v for n, v in out.terms.values().items())
        (g,) = torch.autograd.grad(expected, trainer.patch.pixels, retain_graph=True)
        measured = trainer.backward(out)
        assert (measured is None) == (every == 0)
        torch.testing.assert_close(
            trainer.patch.pixels.grad, g, rtol=1e-4, atol=1e-6 * float(g.abs().max())
        )
        grads[every] = trainer.patch.pixels.grad
    assert sum(measured.values()) == pytest.approx(1.0)


@pytest.mark.parametrize("mode", ["share", "sum"])
def test_a_weight_of_zero_is_never_computed(parts, data, mode):
    calls = []
    original = registry.term("cross_attention").compute
    with term_replaced("cross_attention", lambda t, x: calls.append(1) or original(t, x)):
        cfg = config({"mode": mode, "cross_attention": 0.0, "self_attention": 0.0})
        trainer, outs = trained(cfg, parts, data)
    assert trainer.attention is None and not calls
    assert outs[0].terms.as_dict()["cross_attention"] is None


def test_a_registered_term_is_computed_logged_and_checked(parts, data, tmp_path):
    from attnpatch.training.doctor import diagnose

    new = registry.Term(
        "patch_mean",
        lambda t, x: t.patch.pixels.mean(),
        weight=1.0,
        share=0.2,
        label="pm",
    )
    registry.register_term(new)
    try:
        cfg = config()
        assert cfg.weights.resolved()["patch_mean"] == 0.2  # its default share
        trainer = trainer_for(cfg, parts, data)
        trainer.out_dir = tmp_path
        trainer.train()
        lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
        assert all(r["patch_mean"] is not None for r in lines)
        assert lines[0]["share.patch_mean"] == pytest.approx(0.2 / 1.3, abs=1e-6)  # + l2 0.1
        report = diagnose(trainer_for(cfg, parts, data))
        assert "patch_mean" in report["gradient flow: patch"].value
        assert "patch_mean" in report["update shares (share mode)"].value
    finally:
        registry._TERMS.pop("patch_mean")
    assert "patch_mean" not in registry.term_names()


def test_config_mode_flag_and_defaults():
    import argparse

    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    args = parser.parse_args(["--weights.mode", "sum", "--weights.cross_attention", "0"])
    cfg = config_from_dict({"weights": {}}, None)
    assert cfg.weights.mode == "share" and cfg.weights.resolved()["classifier"] == 0.4
    assert cfg.attention.cross_loss == "repel"  # the sweep's choice (docs/training.md)
    overrides = apply_flags(args)
    assert overrides == {"weights.mode": "sum", "weights.cross_attention": "0"}
    from attnpatch.training.config import load_config

    cfg = load_config(None, overrides)
    assert cfg.weights.resolved() == {
        "classifier": 10.0,
        "cross_attention": 0.0,
        "self_attention": 10000.0,
        "l2": 0.01,
        "tv": 0.0,
    }
    helps = {a.dest: a.help for a in parser._actions}
    assert helps["cfg::weights.classifier"] == "(default: share 0.4 / sum 10)"


@pytest.mark.parametrize(
    "weights, needle",
    [
        ({"mode": "product"}, "weights.mode must be one of"),
        ({"measure_every": 0}, "measure_every must be >= 1 in share mode"),
        ({"l2": -1.0}, "weights.l2 must be >= 0"),
        ({"momentum": 1.0}, r"weights.momentum must be in \[0, 1\)"),
        (
            {"classifier": 0, "cross_attention": 0, "self_attention": 0, "l2": 0},
            "every loss weight is 0",
        ),
    ],
)
def test_bad_weights_are_config_errors(weights, needle):
    with pytest.raises(ConfigError, match=needle):
        config_from_dict({"weights": weights})


def test_weights_config_is_built_from_the_registry():
    fields = [f.name for f in dataclasses.fields(WeightsConfig)]
    assert fields == ["mode", "measure_every", "momentum", "exact", *registry.term_names()]
    assert WeightsConfig().resolved() == registry.describe("share")
