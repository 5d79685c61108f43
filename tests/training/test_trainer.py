"""PatchTrainer: accumulation, gradient paths, frozen models, resume, bad input."""

from __future__ import annotations

import json

import pytest
import torch

import attnpatch as ap
from attnpatch.data import ShapesConfig, TensorImageDataset, shapes_dataset
from attnpatch.errors import (
    ConfigError,
    DataError,
    ImageLayoutError,
    ImageRangeError,
    InputError,
    ModelError,
    RunFolderError,
)
from attnpatch.models import load_diffusion
from attnpatch.testing import tiny_classifier
from attnpatch.training.config import config_from_dict
from attnpatch.training.run import build_patch


@pytest.fixture(scope="module")
def parts():
    return load_diffusion("tiny")


@pytest.fixture(scope="module")
def data():
    return shapes_dataset(ShapesConfig(size=32, train_per_class=2, heldout_per_class=1, seed=5))


def make_config(**sections):
    base = {
        "train": {"iterations": 5, "accumulate": 2, "progress": False, "checkpoint_every": 0},
        "attention": {"num_inference_steps": 4, "num_steps": 1},
        "patch": {"size": 8, "scale": [0.3, 0.4]},
        "weights": {"l2": 0.01},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return config_from_dict(base)


def make_trainer(cfg, parts, data, out_dir=None, classifier=None):
    classifier = classifier if classifier is not None else tiny_classifier(len(data.classes))
    torch.manual_seed(cfg.train.seed)
    patch = build_patch(cfg, torch.device("cpu"))
    return ap.PatchTrainer(
        cfg, classifier=classifier, parts=parts, patch=patch, train_data=data, out_dir=out_dir
    )


def test_gradient_accumulation_steps_only_when_the_counter_reaches_k(parts, data):
    K = 2
    trainer = make_trainer(
        make_config(train={"iterations": 2 * K + 1, "accumulate": K}), parts, data
    )
    events = []
    opt = trainer.optimizer
    real_step, real_zero = opt.step, opt.zero_grad
    opt.step = lambda *a, **k: (events.append(("step", trainer.iteration)), real_step(*a, **k))[1]
    opt.zero_grad = lambda *a, **k: (
        events.append(("zero", trainer.iteration)),
        real_zero(*a, **k),
    )[1]
    snapshots = []
    trainer.hooks["iteration"].append(
        lambda t, fwd, stepped: snapshots.append(
            (stepped, t.patch.pixels.detach().clone(), t.counter)
        )
    )
    before = trainer.patch.pixels.detach().clone()
    trainer.train()
    # step and zero_grad exactly twice, at iterations K-1 and 2K-1, zero_grad right after step
    assert events == [("step", K - 1), ("zero", K - 1), ("step", 2 * K - 1), ("zero", 2 * K - 1)]
    assert [s for s, _, _ in snapshots] == [False, True, False, True, False]
    assert [c for _, _, c in snapshots] == [1, 0, 1, 0, 1]
    previous = before
    for stepped, pixels, _ in snapshots:
        assert torch.equal(pixels, previous) != stepped  # changes exactly at the steps
        previous = pixels
    assert trainer.steps == 2
    assert trainer.patch.pixels.grad.abs().sum() > 0  # the last iteration's gradient waits
    assert trainer.patch.pixels.min() >= 0 and trainer.patch.pixels.max() <= 1


@pytest.mark.parametrize(
    "weights",
    [
        {"classifier": 1.0, "cross_attention": 0.0, "self_attention": 0.0, "l2": 0.0},
        {"classifier": 0.0, "cross_attention": 1.0, "self_attention": 0.0, "l2": 0.0},
        {"classifier": 0.0, "cross_attention": 0.0, "self_attention": 1.0, "l2": 0.0},
        {"classifier": 0.0, "cross_attention": 0.0, "self_attention": 0.0, "l2": 1.0},
    ],
    ids=["classifier", "cross-attention", "self-attention", "l2"],
)
def test_each_path_alone_reaches_the_patch(parts, data, weights):
    cfg = make_config(weights=weights, patch={"init": "random"})
    trainer = make_trainer(cfg, parts, data)
    images, labels = data.get_batch([0, 1])
    fwd = trainer.forward(images, labels, indices=[0, 1])
    (name,) = [n for n, w in weights.items() if w]
    assert fwd.terms.as_dict()[name] is not None
    assert all(v is None for n, v in fwd.terms.as_dict().items() if n not in (name, "total"))
    assert (fwd.attention is None) == (name in ("classifier", "l2"))
    fwd.terms.total().backward()
    grad = trainer.patch.pixels.grad
    assert grad is not None and torch.isfinite(grad).all()
    assert grad.abs().sum() > 0  # self-attention: patched vs clean structure differs
    frozen = [trainer.classifier, parts.unet, parts.vae, parts.text_encoder]
    assert all(p.grad is None for m in frozen for p in m.parameters())


def test_frozen_models_and_batchnorm_statistics_do_not_change(parts, data):
    classifier = tiny_classifier(len(data.classes)).train()  # even if handed over in train mode
    state = {k: v.clone() for k, v in classifier.state_dict().items()}
    unet = {k: v.clone() for k, v in parts.unet.state_dict().items()}
    trainer = make_trainer(make_config(), parts, data, classifier=classifier)
    trainer.train()
    assert not classifier.training
    for k, v in classifier.state_dict().items():  # includes BN running_mean/var/num_batches
        assert torch.equal(v, state[k]), k
    assert all(torch.equal(v, unet[k]) for k, v in parts.unet.state_dict().items())


def test_eot_switch(parts, data):
    images, labels = data.get_batch([0, 1])
    off = make_trainer(make_config(patch={"eot": False}), parts, data)
    torch.manual_seed(3)
    a = off.patch(images, eot=off.config.patch.eot)[0]
    torch.manual_seed(3)
    b = off.patch(images, eot=off.config.patch.eot)[0]
    assert torch.equal(a, b)
    torch.manual_seed(3)
    on1, mask1 = off.patch(images, eot=True)
    torch.manual_seed(4)
    on2, mask2 = off.patch(images, eot=True)
    assert not torch.equal(mask1, mask2)
    for out, mask in ((on1, mask1), (on2, mask2)):  # outside the mask: the input, exactly
        outside = mask == 0
        assert torch.equal(out[outside.expand_as(out)], images[outside.expand_as(images)])


def test_resume_is_bit_exact(parts, data, tmp_path):
    cfg = make_config(train={"iterations": 6, "accumulate": 4, "checkpoint_every": 3})
    straight = make_trainer(cfg, parts, data, tmp_path / "a")
    straight.train()

    class Interrupt(Exception):
        pass

    def stop_at_4(trainer, fwd, stepped):
        if trainer.iteration == 4:
            raise Interrupt

    interrupted = make_trainer(cfg, parts, data, tmp_path / "b")
    interrupted.hooks["iteration"].append(stop_at_4)
    with pytest.raises(Interrupt):
        interrupted.train()
    torch.manual_seed(12345)  # whatever happened to the RNG meanwhile
    resumed = make_trainer(cfg, parts, data, tmp_path / "b")
    resumed.load_checkpoint()
    assert (resumed.iteration, resumed.counter) == (3, 3)  # mid-accumulation
    resumed.train()
    assert torch.equal(resumed.patch.pixels, straight.patch.pixels)
    assert torch.equal(resumed.patch.pixels.grad, straight.patch.pixels.grad)
    lines_a = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lines_b = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines_b] == list(range(6))
    assert lines_a == lines_b


def test_checkpoint_from_a_different_config_is_refused(parts, data, tmp_path):
    cfg = make_config(train={"iterations": 2, "checkpoint_every": 2})
    make_trainer(cfg, parts, data, tmp_path).train()
    other = make_config(train={"iterations": 2, "lr": 0.5})
    with pytest.raises(RunFolderError, match="different config.*train.lr"):
        make_trainer(other, parts, data, tmp_path).load_checkpoint()
    longer = make_config(train={"iterations": 4, "checkpoint_every": 2})
    make_trainer(longer, parts, data, tmp_path).load_checkpoint()  # more iterations is fine


def test_bad_input_is_reported_before_work(parts, data):
    trainer = make_trainer(make_config(), parts, data)
    images, labels = data.get_batch([0, 1])
    with pytest.raises(ImageLayoutError, match="channels-last"):
        trainer.forward(images.permute(0, 2, 3, 1).contiguous(), labels)
    with pytest.raises(ImageRangeError, match="255"):
        trainer.forward(images * 255, labels)
    empty = TensorImageDataset(
        torch.zeros(0, 3, 32, 32), torch.zeros(0, dtype=torch.long), data.classes
    )
    with pytest.raises(DataError, match="empty"):
        make_trainer(make_config(), parts, empty)
    with pytest.raises(ModelError, match=r"logits \(B, classes\)"):
        make_trainer(make_config(), parts, data, classifier=torch.nn.Identity())
    with pytest.raises(DataError, match="classes"):
        make_trainer(make_config(), parts, data, classifier=tiny_classifier(3))
    with pytest.raises(ConfigError, match="accumulate"):
        make_config(train={"accumulate": 0})
    with pytest.raises(ConfigError, match="did you mean 'accumulate'"):
        make_config(train={"acumulate": 2})
    with pytest.raises(ConfigError, match="not a class"):
        make_trainer(make_config(attack={"targeted": True, "target": "zebra"}), parts, data)
    long_template = "a " * 80 + "photo of a {label}"  # the label falls past CLIP's 77 tokens
    with pytest.raises(ap.AttnPatchError, match="token"):
        make_trainer(make_config(data={"prompt_template": long_template}), parts, data)
    big = make_config(patch={"size": 40, "scale": []})  # native 40 px on 32 px images
    with pytest.raises(InputError, match="larger than the image"):
        make_trainer(big, parts, data)


def test_labels_map_to_a_larger_classifier_by_name(parts, data):
    """An ImageNet-style classifier on a subset: data labels go to its outputs by class name."""
    names = ["dog", "triangle", "cat", "circle", "star", "square", "cross"]

    class Named(torch.nn.Module):
        classes = names

        def __init__(self):
            super().__init__()
            self.net = tiny_classifier(len(names))

        def forward(self, x):
            return self.net(x)

    trainer = make_trainer(make_config(), parts, data, classifier=Named())
    expected = [names.index(c) for c in data.classes]
    assert trainer.logit_index.tolist() == expected
    images, labels = data.get_batch([0, 1, 2])
    fwd = trainer.forward(images, labels)
    assert fwd.targets.tolist() == [expected[int(y)] for y in labels]
    targeted = make_trainer(
        make_config(attack={"targeted": True, "target": "star"}), parts, data, classifier=Named()
    )
    assert targeted.target == names.index("star")

    class Unnamed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tiny_classifier(len(names))

        def forward(self, x):
            return self.net(x)

    with pytest.raises(DataError, match="names no output"):
        make_trainer(make_config(), parts, data, classifier=Unnamed())


@pytest.mark.parametrize("mode", ["repel", "attract"])
def test_region_loss_uses_the_mask_resized_like_the_images(parts, data, mode):
    cfg = make_config(
        attention={"cross_loss": mode, "diffusion_size": 48},  # 32 px images, 48 px to the VAE
        weights={"classifier": 0.0, "self_attention": 0.0, "l2": 0.0, "cross_attention": 1.0},
    )
    trainer = make_trainer(cfg, parts, data)
    images, labels = data.get_batch([0, 1])
    fwd = trainer.forward(images, labels)
    share = fwd.terms.as_dict()["cross_attention"]
    assert 0.0 <= share <= 1.0
    fwd.terms.total().backward()
    assert trainer.patch.pixels.grad.abs().sum() > 0
    resized = trainer.attention.resize_mask(fwd.mask)
    assert resized.shape[-2:] == (48, 48) and resized.min() >= 0 and resized.max() <= 1
