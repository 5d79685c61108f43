"""The doctor: all PASS on the healthy tiny pipeline; each deliberate fault gives the right FAIL."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils.data import Dataset

import attnpatch as ap
import attnpatch.diffusion.pipeline as attention_pipeline
from attnpatch.data import ShapesConfig, shapes_dataset
from attnpatch.models import load_diffusion
from attnpatch.testing import tiny_classifier
from attnpatch.training.config import config_from_dict
from attnpatch.training.doctor import diagnose
from attnpatch.training.report import CAUSES, FAIL, PASS
from attnpatch.training.run import build_patch

K = 2


@pytest.fixture(scope="module")
def parts():
    return load_diffusion("tiny")


@pytest.fixture(scope="module")
def data():
    return shapes_dataset(ShapesConfig(size=32, train_per_class=2, heldout_per_class=1, seed=3))


def trainer_for(parts, data, **train):
    cfg = config_from_dict(
        {
            "train": {"accumulate": K, "progress": False, **train},
            "attention": {"num_inference_steps": 4, "num_steps": 2},
            "patch": {"size": 8},
            "weights": {"cross_attention": 0.25, "self_attention": 0.25, "l2": 0.05},
        }
    )
    torch.manual_seed(0)
    return ap.PatchTrainer(
        cfg,
        classifier=tiny_classifier(len(data.classes)),
        parts=parts,
        patch=build_patch(cfg, torch.device("cpu")),
        train_data=data,
    )


def assert_fail(report, name, cause):
    check = report[name]
    assert check.status == FAIL, report
    assert check.cause == cause, report
    assert CAUSES[cause][0] in check.line()  # names the cause and a fix in the report
    assert "Fix:" in check.line()


def test_healthy_pipeline_passes_everything(parts, data):
    trainer = trainer_for(parts, data)
    before = trainer.patch.pixels.detach().clone()
    report = diagnose(trainer)
    assert report.ok and all(c.status == PASS for c in report.checks), report
    names = {c.name for c in report.checks}
    for expected in [
        "gradient flow: VAE latent",
        "gradient flow: inverted latent",
        "gradient flow: denoised latent",
        "gradient flow: cross-attention maps",
        "hijack during denoising",
        "hijack removed after the maps",
        "diffusion input",
        "classifier input",
        "accumulation counter",
        "patch changes exactly at the steps",
        "loss classifier",
        "loss cross_attention",
        "loss self_attention",
        "loss l2",
    ]:
        assert expected in names
    # the doctor leaves the trainer as it found it
    assert torch.equal(trainer.patch.pixels, before) and trainer.iteration == 0


def test_detached_latent_after_the_vae(parts, data, monkeypatch):
    real = attention_pipeline.vae_encode
    monkeypatch.setattr(attention_pipeline, "vae_encode", lambda vae, x: real(vae, x).detach())
    report = diagnose(trainer_for(parts, data))
    assert_fail(report, "gradient flow: VAE latent", "grad_flow")
    assert "does not require grad" in report["gradient flow: VAE latent"].value  # the break
    assert "no gradient" in report["gradient flow: diffusion input"].value  # upstream of it
    patch = report["gradient flow: patch"].value
    assert "cross_attention" in patch and "classifier" not in patch  # classifier path intact


def test_denoising_outside_the_hijack(parts, data, monkeypatch):
    monkeypatch.setattr(attention_pipeline, "hijack", lambda unet, c: contextlib.nullcontext(c))
    report = diagnose(trainer_for(parts, data))
    assert_fail(report, "hijack during denoising", "hijack")


def test_hijack_left_installed(parts, data, monkeypatch):
    real = attention_pipeline.hijack
    never_closed = []  # keep the contexts alive: their finally-blocks never run

    @contextlib.contextmanager
    def leaky(unet, controller):
        ctx = real(unet, controller)
        never_closed.append(ctx)
        yield ctx.__enter__()  # never exits: the processors stay installed

    monkeypatch.setattr(attention_pipeline, "hijack", leaky)
    trainer = trainer_for(parts, data)
    originals = {n: m.processor for n, m in ap.hooks.attention_modules(parts.unet)}
    try:
        report = diagnose(trainer)
        assert_fail(report, "hijack removed after the maps", "remove_hijack")
    finally:
        for name, module in ap.hooks.attention_modules(parts.unet):
            module.set_processor(originals[name])


def test_zero_grad_every_iteration(parts, data):
    trainer = trainer_for(parts, data)
    trainer.hooks["forward"].append(lambda t, fwd: t.optimizer.zero_grad())
    report = diagnose(trainer, iterations=2 * K)
    assert_fail(report, "gradient accumulates until the step", "zero_grad")


def test_frozen_patch(parts, data):
    trainer = trainer_for(parts, data)
    trainer.patch.pixels.requires_grad_(False)
    report = diagnose(trainer)
    assert_fail(report, "requires_grad: patch", "requires_grad")
    assert not report.ok


class Transformed(Dataset):
    """The data set's images, passed through ``fn`` (a broken loader)."""

    def __init__(self, data, fn):
        self.data, self.fn, self.classes = data, fn, data.classes

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        x, y = self.data[i]
        return self.fn(x), y


@pytest.mark.parametrize(
    "fn, cause",
    [(lambda x: x.permute(1, 2, 0).contiguous(), "layout"), (lambda x: x * 255, "range")],
    ids=["channels-last", "0-255"],
)
def test_bad_images(parts, data, fn, cause):
    trainer = trainer_for(parts, data)
    trainer.data = Transformed(data, fn)  # broken after construction, as a loader bug would be
    report = diagnose(trainer)
    assert_fail(report, "training images", cause)


def test_counter_never_reset(parts, data):
    trainer = trainer_for(parts, data)

    def break_counter(t, fwd, stepped):  # a loop that forgets to reset the counter
        if stepped:
            t.counter = K

    trainer.hooks["iteration"].insert(0, break_counter)
    report = diagnose(trainer, iterations=2 * K)
    assert_fail(report, "accumulation counter", "counter")


def test_doctor_cli_on_the_tiny_default(capsys, tmp_path, monkeypatch):
    from attnpatch.cli import main

    monkeypatch.chdir(tmp_path)
    code = main(["doctor", "--train.accumulate", "2", "--attention.num_steps", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "0 failed" in out and "PASS  gradient flow: inverted latent" in out
    first = out.splitlines()[0]  # the environment, before the checks
    assert first.startswith("environment: attnpatch ") and f"torch {torch.__version__}" in first
