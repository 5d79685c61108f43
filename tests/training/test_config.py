"""TrainConfig: defaults, every validation rule (named, with the fix), dict round trip."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import attnpatch as ap
from attnpatch.errors import ConfigError
from attnpatch.training.config import config_from_dict, config_to_dict, load_config


def test_defaults_are_valid_and_round_trip():
    cfg = ap.TrainConfig()
    assert cfg.validate() is cfg
    assert cfg.data.prompt_template == ap.diffusion.PROMPT_TEMPLATE
    again = config_from_dict(config_to_dict(cfg))
    assert again == cfg and again is not cfg


@pytest.mark.parametrize(
    "section, key, value, words",
    [
        ("train", "accumulate", 0, ["train.accumulate", ">= 1"]),
        ("train", "accumulate", 300, ["train.accumulate", "train.iterations", "no optimizer step"]),
        ("train", "iterations", 0, ["train.iterations", ">= 1"]),
        ("train", "lr", 0.0, ["train.lr", "> 0"]),
        ("train", "optimizer", "lbfgs", ["train.optimizer", "'adam'", "'sgd'"]),
        ("train", "checkpoint_every", -1, ["train.checkpoint_every", ">= 0"]),
        ("train", "log", "mlflow", ["train.log", "'tensorboard'", "'wandb'"]),
        ("train", "log_images_every", -1, ["train.log_images_every", ">= 0"]),
        ("train", "threads", 10**11, ["train.threads", "1024"]),
        ("train", "out_dir", "", ["train.out_dir", "empty"]),
        ("train", "collective_timeout_minutes", 0.0, ["collective_timeout_minutes", "> 0"]),
        ("data", "batch_size", 0, ["data.batch_size", ">= 1"]),
        ("data", "image_size", 4, ["data.image_size", ">= 8"]),
        ("data", "prompt_template", "a photo", ["data.prompt_template", "{label}"]),
        ("attention", "num_inference_steps", 0, ["attention.num_inference_steps", ">= 1"]),
        ("attention", "num_steps", 11, ["attention.num_steps", "num_inference_steps"]),
        ("attention", "cross_loss", "kl", ["attention.cross_loss", "'variance'", "'repel'"]),
        ("attention", "diffusion_size", -8, ["attention.diffusion_size", ">= 0"]),
        ("attention", "cross_resolution", -1, ["attention.cross_resolution", ">= 0"]),
        ("attention", "self_resolutions", [0], ["attention.self_resolutions"]),
        ("patch", "shape", "hexagon", ["patch.shape", "'square'", "'circle'"]),
        ("patch", "position", "corner", ["patch.position", "'random'", "'center'"]),
        ("patch", "scale", [0.5, 0.2], ["patch.scale", "[low, high]"]),
        ("patch", "scale", [0.2, 1.5], ["patch.scale", "[low, high]"]),
        ("attack", "loss", "hinge", ["attack.loss", "'ce'", "'cw'"]),
        ("attack", "targeted", True, ["attack.target", "empty"]),
        ("weights", "l2", -1.0, ["weights.l2", ">= 0"]),
        ("models", "device", "gpu", ["models.device", "'gpu'", "'cuda'"]),
        ("models", "dtype", "float64", ["models.dtype", "'float16'"]),
    ],
)
def test_each_rule_names_the_field(raises, section, key, value, words):
    cfg = ap.TrainConfig()
    setattr(cfg, section, dataclasses.replace(getattr(cfg, section), **{key: value}))
    with raises(ConfigError, *words):
        cfg.validate()
    with raises(ConfigError, *words):  # the same through a file's dict
        config_from_dict({section: {key: value}})


def test_choices_are_the_librarys_constants():
    from attnpatch.diffusion import MEMORY_MODES
    from attnpatch.losses import CLASSIFIER_LOSSES, REGION_MODES
    from attnpatch.patch import MASK_SHAPES, POSITIONS

    for mode in MEMORY_MODES:
        assert config_from_dict({"attention": {"memory": mode}}).attention.memory == mode
    for kind in CLASSIFIER_LOSSES:
        assert config_from_dict({"attack": {"loss": kind}}).attack.loss == kind
    for mode in ("variance", *REGION_MODES):
        assert config_from_dict({"attention": {"cross_loss": mode}}).attention.cross_loss == mode
    for shape in MASK_SHAPES:
        assert config_from_dict({"patch": {"shape": shape}}).patch.shape == shape
    for position in POSITIONS:
        assert config_from_dict({"patch": {"position": position}}).patch.position == position


@pytest.mark.parametrize(
    "data, words",
    [
        ({"train": {"iterations": "many"}}, ["train.iterations", "int"]),
        ({"train": {"iterations": True}}, ["train.iterations", "number"]),
        ({"patch": {"eot": "maybe"}}, ["patch.eot", "true or false"]),
        ({"models": {"classifier": 3}}, ["models.classifier", "string"]),
        ({"patch": {"scale": 0.3}}, ["patch.scale", "list"]),
        ({"train": 3}, ["[train]", "mapping"]),
        ({"trian": {}}, ["'trian'", "did you mean 'train'"]),
        ([], ["mapping of sections"]),
        # infinite and huge numbers (was: inf accepted, 1e11 threads reached torch)
        ({"train": {"lr": float("inf")}}, ["train.lr", "finite"]),
        ({"train": {"lr": "1e400"}}, ["train.lr", "finite"]),
        ({"patch": {"degrees": float("nan")}}, ["patch.degrees", "finite"]),
        ({"train": {"threads": "1e11"}}, ["train.threads", "1024"]),
        ({"train": {"seed": 2**70}}, ["train.seed", "2**63"]),
        ({"data": {"class_map": ["cat"]}}, ["data.class_map", "KEY=VALUE"]),
    ],
)
def test_values_are_typed(raises, data, words):
    with raises(ConfigError, *words):
        config_from_dict(data)


def test_strings_from_flags_are_parsed():
    cfg = config_from_dict(
        {"train": {"iterations": "12", "progress": "off"}, "patch": {"scale": "0.2, 0.4"}}
    )
    assert cfg.train.iterations == 12 and cfg.train.progress is False
    assert cfg.patch.scale == [0.2, 0.4]
    cfg = config_from_dict({"data": {"class_map": ["kitty=tabby cat", "pup=beagle"]}})
    assert cfg.data.class_map == {"kitty": "tabby cat", "pup": "beagle"}  # flag words


@pytest.mark.parametrize(
    "name, text, words",
    [
        # YAML and JSON keep the last of two equal keys: a whole section was silently lost
        ("dup.yaml", "train:\n  iterations: 3\nweights:\n  l2: 1\ntrain:\n  lr: 0.1\n",
         ["'train'", "twice", "line 1", "line 5"]),
        ("dup_key.yaml", "train:\n  lr: 0.1\n  lr: 0.2\n", ["'lr'", "twice"]),
        ("dup.json", '{"train": {"lr": 0.1}, "train": {"iterations": 3}}', ["'train'", "twice"]),
        ("dup.toml", "[train]\nlr = 0.1\n[train]\niterations = 3\n", ["not valid TOML"]),
    ],
)  # fmt: skip
def test_duplicate_keys_are_refused(tmp_path, raises, name, text, words):
    path = tmp_path / name
    path.write_text(text)
    with raises(ConfigError, name, *words):
        load_config(path)


@pytest.mark.parametrize("name", ["bom.toml", "bom.yaml", "bom.json"])
def test_a_byte_order_mark_is_read(tmp_path, name):
    text = {
        "bom.toml": "[train]\nlr = 0.2\n",
        "bom.yaml": "train:\n  lr: 0.2\n",
        "bom.json": '{"train": {"lr": 0.2}}',
    }[name]
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())  # what Windows editors write
    assert load_config(path).train.lr == 0.2


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_mps_without_mps_is_refused(raises):
    with raises(ConfigError, "models.device", "mps", "'cpu'"):
        config_from_dict({"models": {"device": "mps"}})
    assert config_from_dict({"models": {"device": "cuda:1"}}).models.device == "cuda:1"  # parsed;
    # whether this machine has it is checked when the run starts (resolve_device)


def test_a_folder_as_the_config(tmp_path, raises):
    with raises(ConfigError, "is a folder", "config file"):
        load_config(tmp_path)


def test_home_in_paths_is_expanded(tmp_path, monkeypatch):
    from attnpatch.training.run_folder import out_dir_path

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "c.yaml").write_text("train:\n  out_dir: ~/runs/a\n")
    cfg = load_config("~/c.yaml")  # the file itself, then the out_dir inside it
    assert out_dir_path(cfg.train.out_dir) == tmp_path / "runs" / "a"


def test_the_legacy_checkpoint_switch_warns_with_its_replacement():
    with pytest.warns(FutureWarning, match=r"attention.checkpoint.*0\.3\.0.*attention.memory"):
        cfg = config_from_dict({"attention": {"checkpoint": True}})
    assert cfg.attention.checkpoint is True  # still works until then
