"""TrainConfig: defaults, every validation rule (named, with the fix), dict round trip."""

from __future__ import annotations

import dataclasses

import pytest

import attnpatch as ap
from attnpatch.training.config import config_from_dict, config_to_dict


def test_defaults_are_valid_and_round_trip():
    cfg = ap.TrainConfig()
    assert cfg.validate() is cfg
    assert cfg.data.prompt_template == ap.diffusion.PROMPT_TEMPLATE
    again = config_from_dict(config_to_dict(cfg))
    assert again == cfg and again is not cfg


@pytest.mark.parametrize(
    "section, key, value, needle",
    [
        ("train", "accumulate", 0, r"train.accumulate \(K\) must be >= 1"),
        ("train", "iterations", 0, "train.iterations must be >= 1"),
        ("train", "lr", 0.0, "train.lr must be > 0"),
        ("train", "optimizer", "lbfgs", "train.optimizer must be 'adam' or 'sgd'"),
        ("train", "checkpoint_every", -1, "train.checkpoint_every must be >= 0"),
        ("train", "log", "mlflow", "train.log must be 'none', 'tensorboard' or 'wandb'"),
        ("train", "log_images_every", -1, "train.log_images_every must be >= 0"),
        ("data", "batch_size", 0, "data.batch_size must be >= 1"),
        ("data", "image_size", 4, "data.image_size must be >= 8"),
        ("data", "prompt_template", "a photo", "data.prompt_template needs '{label}'"),
        ("attention", "num_inference_steps", 0, "attention.num_inference_steps must be >= 1"),
        ("attention", "num_steps", 11, r"attention.num_steps \(11\) must be in \[1, num_inference"),
        ("attention", "cross_loss", "kl", "attention.cross_loss must be"),
        ("patch", "shape", "hexagon", "patch.shape must be 'square' or 'circle'"),
        ("patch", "position", "corner", "patch.position must be 'random' or 'center'"),
        ("patch", "scale", [0.5, 0.2], r"patch.scale must be \[low, high\]"),
        ("patch", "scale", [0.2, 1.5], r"patch.scale must be \[low, high\]"),
        ("attack", "loss", "hinge", "attack.loss must be 'ce' or 'cw'"),
        ("attack", "targeted", True, "attack.target is empty"),
        ("weights", "l2", -1.0, "weights.l2 must be >= 0"),
    ],
)
def test_each_rule_names_the_field(section, key, value, needle):
    cfg = ap.TrainConfig()
    setattr(cfg, section, dataclasses.replace(getattr(cfg, section), **{key: value}))
    with pytest.raises(ap.AttnPatchError, match=needle):
        cfg.validate()
    with pytest.raises(ap.AttnPatchError, match=needle):  # the same through a file's dict
        config_from_dict({section: {key: value}})


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"train": {"iterations": "many"}}, "train.iterations must be int"),
        ({"train": {"iterations": True}}, "train.iterations must be a number"),
        ({"patch": {"eot": "maybe"}}, "patch.eot must be true or false"),
        ({"models": {"classifier": 3}}, "models.classifier must be a string"),
        ({"patch": {"scale": 0.3}}, "patch.scale must be a list"),
        ({"train": 3}, r"config section \[train\] must be a mapping"),
        ({"trian": {}}, "unknown config key 'trian'; did you mean 'train'"),
        ([], "a config must be a mapping of sections"),
    ],
)
def test_values_are_typed(data, needle):
    with pytest.raises(ap.AttnPatchError, match=needle):
        config_from_dict(data)


def test_strings_from_flags_are_parsed():
    cfg = config_from_dict(
        {"train": {"iterations": "12", "progress": "off"}, "patch": {"scale": "0.2, 0.4"}}
    )
    assert cfg.train.iterations == 12 and cfg.train.progress is False
    assert cfg.patch.scale == [0.2, 0.4]
