"""Real torchvision and timm classifiers (random weights, nothing downloaded): loading, the
normalisation, local weights, weights names and timm's pretrained=True from their caches (built
here by hand), training a patch at 224 px, ``attnpatch apply`` and ``attnpatch evaluate``.

Run in ``.venv-vision`` (``bash .ci/setup vision``): ``.venv-vision/bin/python -m pytest -m
vision tests/models/test_vision.py``. In ``.venv`` (no torchvision) the whole module skips.
"""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

tv = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

import attnpatch as ap  # noqa: E402
from attnpatch.cli import main  # noqa: E402
from attnpatch.data import read_image  # noqa: E402
from attnpatch.errors import AttnPatchError, ModelError  # noqa: E402
from attnpatch.models import (  # noqa: E402
    IMAGENET_MEAN,
    NormalizedClassifier,
    load_classifier,
    load_diffusion,
)
from attnpatch.training import build_trainer  # noqa: E402
from attnpatch.training.config import config_from_dict, config_to_dict  # noqa: E402
from attnpatch.training.run import build_patch, load_datasets  # noqa: E402

pytestmark = pytest.mark.vision

RESNET50_WEIGHTS = tv.models.ResNet50_Weights


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """``$TORCH_HOME`` in tmp, and every way out refused: a socket connection or a torch hub
    download fails the test (``offline["attempts"]`` lists them)."""
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    attempts: list[str] = []

    def refuse(what):
        def blocked(*args, **kwargs):
            attempts.append(f"{what} {args[1:2]}")
            raise OSError(f"test_vision: network access attempted ({what})")

        return blocked

    monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("socket.connect_ex"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse("download_url_to_file"))
    state = {"home": home, "attempts": attempts}
    yield state
    assert attempts == [], f"network access attempted: {attempts}"


def files_under(path):
    return sorted(p.relative_to(path) for p in path.rglob("*")) if path.exists() else []


def torchvision_normalize(x):
    """ImageNet normalisation as torchvision's own preset transform defines it."""
    preset = RESNET50_WEIGHTS.IMAGENET1K_V2.transforms()
    return tv.transforms.functional.normalize(x, list(preset.mean), list(preset.std))


def tensors_equal(a: nn.Module, b: dict[str, torch.Tensor]) -> bool:
    sd = a.state_dict()
    return sd.keys() == b.keys() and all(torch.equal(sd[k], b[k]) for k in sd)


def seeded(builder, seed, **kwargs):
    torch.manual_seed(seed)
    return builder(**kwargs).eval()


def calibrated_resnet50(images, seed):
    """A seeded random resnet50's state dict with BatchNorm statistics measured on ``images``
    (at torchvision's initialisation, running mean 0 / var 1, every input gets one class)."""
    model = seeded(tv.models.resnet50, seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a plain average over the calibration batch
    model.train()
    with torch.no_grad():
        model(
            torchvision_normalize(
                torch.cat([images, torch.rand(8, 3, 1, 1).expand(8, 3, 224, 224)])
            )
        )
    return model.eval().state_dict()


# --------------------------------------------------------------------------- torchvision


def test_torchvision_resnet50_random_weights_wrapped_frozen_and_normalised(offline):
    clf = load_classifier("torchvision:resnet50")
    assert isinstance(clf, NormalizedClassifier) and isinstance(clf.model, tv.models.ResNet)
    preset = RESNET50_WEIGHTS.IMAGENET1K_V2.transforms()
    torch.testing.assert_close(clf.mean.flatten(), torch.tensor(preset.mean), rtol=0, atol=0)
    torch.testing.assert_close(clf.std.flatten(), torch.tensor(preset.std), rtol=0, atol=0)
    assert clf.num_classes == 1000 and clf.model.fc.out_features == 1000
    assert clf.input_size == (224, 224) and clf.classes is None
    assert all(not p.requires_grad for p in clf.parameters())

    # eval mode kept: a parent's .train() reaches neither BatchNorm nor its statistics
    buffers = {k: v.clone() for k, v in clf.model.state_dict().items() if "running" in k}
    assert len(buffers) == 2 * sum(isinstance(m, nn.BatchNorm2d) for m in clf.model.modules())
    parent = nn.ModuleDict({"clf": clf, "head": nn.BatchNorm1d(3)}).train()
    assert parent["head"].training and not any(m.training for m in clf.modules())
    x = torch.rand(2, 3, 224, 224, requires_grad=True)
    out = parent["clf"](x)
    parent["clf"](torch.rand(2, 3, 224, 224))
    for k, v in clf.model.state_dict().items():
        if k in buffers:
            assert torch.equal(v, buffers[k]), k

    # the output is model((x - mean) / std), computed here with torchvision's own transform
    assert out.shape == (2, 1000)
    with torch.no_grad():
        torch.testing.assert_close(out, clf.model.eval()(torchvision_normalize(x)))
    out[:, 3].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in clf.parameters())

    ten = load_classifier("torchvision:resnet50", num_classes=10)
    assert ten.num_classes == 10 and ten.model.fc.out_features == 10
    assert ten(torch.rand(1, 3, 64, 64)).shape == (1, 10)
    assert files_under(offline["home"]) == []  # nothing was fetched or cached


def test_torchvision_local_weights_pth_and_safetensors(tmp_path):
    source = seeded(tv.models.resnet18, 3, num_classes=6)
    state = source.state_dict()
    torch.save(state, tmp_path / "r18.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "r18.safetensors"))
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = source(torchvision_normalize(x))
    fresh = load_classifier("torchvision:resnet18", num_classes=6)
    assert not tensors_equal(fresh.model, state)  # so equality below comes from the file
    for name in ("r18.pth", "r18.safetensors"):
        for weights in (tmp_path / name, str(tmp_path / name)):  # a Path and a str
            clf = load_classifier("torchvision:resnet18", weights=weights, num_classes=6)
            assert tensors_equal(clf.model, state) and clf.classes is None
            with torch.no_grad():
                torch.testing.assert_close(clf(x), expected)

    torch.save(seeded(tv.models.resnet34, 0, num_classes=6).state_dict(), tmp_path / "r34.pth")
    with pytest.raises(AttnPatchError, match=r"do not fit the model.*unexpected.*architecture"):
        load_classifier("torchvision:resnet18", weights=tmp_path / "r34.pth", num_classes=6)
    with pytest.raises(AttnPatchError, match=r"do not fit the model.*same num_classes"):
        load_classifier("torchvision:resnet18", weights=tmp_path / "r18.pth")  # 1000 classes
    with pytest.raises(AttnPatchError, match="not found"):
        load_classifier("torchvision:resnet18", weights=tmp_path / "nope.pth")


def test_torchvision_weights_name_offline_and_not_cached_names_the_path(offline):
    """HF_HUB_OFFLINE=1 (tests/conftest.py): a weights name whose file is not in torch hub's
    cache is an error naming the file's URL and the path to put it at; nothing is fetched."""
    with pytest.raises(ModelError) as err:
        load_classifier("torchvision:resnet50", weights="IMAGENET1K_V2")
    message = str(err.value)
    url = RESNET50_WEIGHTS.IMAGENET1K_V2.url
    cached = offline["home"] / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
    assert "HF_HUB_OFFLINE" in message and f"curl -L {url} -o {cached}" in message
    for name in ("DEFAULT", "ResNet50_Weights.IMAGENET1K_V1"):
        with pytest.raises(ModelError, match="not in torch hub's cache"):
            load_classifier("torchvision:resnet50", weights=name)
    with pytest.raises(AttnPatchError, match=r"neither a local file nor .*IMAGENET1K_V1"):
        load_classifier("torchvision:resnet50", weights="IMAGENET2K")
    with pytest.raises(AttnPatchError, match="pretrained= is its deprecated"):
        load_classifier("torchvision:resnet50", pretrained=True)
    with pytest.raises(AttnPatchError, match=r"no model 'resnet5'.*resnet50"):
        load_classifier("torchvision:resnet5")
    assert files_under(offline["home"]) == [] and offline["attempts"] == []


def test_torchvision_weights_name_online_is_downloaded_into_torch_hubs_cache(offline, monkeypatch):
    """Online, torchvision fetches a missing file into its cache (the download is simulated:
    torch.hub's downloader writes a seeded state dict), then reads it from there."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    state = seeded(tv.models.resnet18, 5).state_dict()
    downloads = []

    def download(url, dst, *args, **kwargs):
        downloads.append((url, dst))
        torch.save(state, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    weights = tv.models.ResNet18_Weights.IMAGENET1K_V1
    cached = offline["home"] / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[1]
    clf = load_classifier("torchvision:resnet18", weights="IMAGENET1K_V1")
    assert [d[0] for d in downloads] == [weights.url] and cached.is_file()
    assert tensors_equal(clf.model, state) and clf.classes == list(weights.meta["categories"])
    again = load_classifier("torchvision:resnet18", weights="DEFAULT")  # from the cache now
    assert len(downloads) == 1 and tensors_equal(again.model, state)


def test_torchvision_weights_name_with_the_file_in_the_cache(offline):
    """torchvision reads its own cache file; its categories become the classes."""
    weights = RESNET50_WEIGHTS.IMAGENET1K_V2
    state = seeded(tv.models.resnet50, 4).state_dict()
    cache = offline["home"] / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(state, cache / weights.url.rsplit("/", 1)[1])
    for name in ("IMAGENET1K_V2", "DEFAULT", "ResNet50_Weights.IMAGENET1K_V2"):
        clf = load_classifier("torchvision:resnet50", weights=name)
        assert tensors_equal(clf.model, state), name
        assert clf.classes == list(weights.meta["categories"]) and clf.num_classes == 1000


# --------------------------------------------------------------------------- timm


def test_timm_vit_normalisation_from_its_pretrained_cfg(offline):
    clf = load_classifier("timm:vit_small_patch16_224")
    model = clf.model
    for cfg in (
        timm.data.resolve_data_config({}, model=model),
        timm.data.resolve_model_data_config(model),
    ):
        torch.testing.assert_close(clf.mean.flatten(), torch.tensor(cfg["mean"]), rtol=0, atol=0)
        torch.testing.assert_close(clf.std.flatten(), torch.tensor(cfg["std"]), rtol=0, atol=0)
        assert clf.input_size == tuple(cfg["input_size"][1:])
    assert tuple(clf.mean.flatten().tolist()) != IMAGENET_MEAN  # it was read: (0.5,) * 3
    assert clf.num_classes == model.num_classes == 1000
    assert all(not p.requires_grad for p in clf.parameters()) and not model.training
    x = torch.rand(2, 3, 224, 224, requires_grad=True)
    out = clf(x)
    mean = torch.tensor(model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.pretrained_cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(out, model((x - mean) / std))
    out[:, 0].sum().backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is None for p in clf.parameters())

    seven = load_classifier("timm:vit_small_patch16_224", num_classes=7)
    assert seven.num_classes == seven.model.num_classes == 7
    with pytest.raises(AttnPatchError, match="without a classifier head"):
        load_classifier("timm:vit_small_patch16_224", num_classes=0)
    with pytest.raises(AttnPatchError, match=r"no model 'vit_smal_patch16_224'.*vit_small"):
        load_classifier("timm:vit_smal_patch16_224")
    assert files_under(offline["home"]) == []


def hf_cache_snapshot(repo_id: str, files: dict[str, dict[str, torch.Tensor]]) -> Path:
    """A snapshot in the Hugging Face cache ($HF_HUB_CACHE, a tmp folder: tests/conftest.py),
    laid out as ``hf download`` writes it: ``models--org--name/refs/main`` naming the commit,
    ``snapshots/<commit>/<file>``."""
    from huggingface_hub import constants

    repo = Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, tensors in files.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(snapshot / name))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_timm_pretrained_reads_the_hugging_face_cache_offline(offline):
    """timm's pretrained=True loads timm/<model>.<tag> from the HF cache, HF_HUB_OFFLINE=1."""
    repo = timm.models.get_pretrained_cfg("resnet18").hf_hub_id
    assert repo == "timm/resnet18.a1_in1k"
    with pytest.raises(ModelError) as err:  # not cached yet: names hf download and the path
        load_classifier("timm:resnet18", pretrained=True)
    message = str(err.value)
    assert f"`hf download {repo} model.safetensors`" in message
    assert "models--timm--resnet18.a1_in1k" in message and "huggingface-cli" not in message
    torch.manual_seed(6)
    state = timm.create_model("resnet18").state_dict()
    hf_cache_snapshot(repo, {"model.safetensors": state})
    clf = load_classifier("timm:resnet18", pretrained=True)
    assert tensors_equal(clf.model, state) and clf.num_classes == 1000
    three = load_classifier("timm:resnet18", pretrained=True, num_classes=3)  # a new head
    body = {k: v for k, v in state.items() if not k.startswith("fc.")}
    assert all(torch.equal(three.model.state_dict()[k], v) for k, v in body.items())
    assert three.num_classes == 3
    assert offline["attempts"] == []


def test_timm_local_weights_and_the_pretrained_cfg_overlay_recipe(tmp_path):
    source = timm.create_model("vit_small_patch16_224", num_classes=4).eval()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # not timm's initialisation
    state = source.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "vit.safetensors"))
    torch.save(state, tmp_path / "vit.pth")
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        expected = source((x - 0.5) / 0.5)

    # attnpatch's weights= and timm's own recipe (pretrained + a local file; the overlay's
    # num_classes says the file's head has 4 classes, not the pretrained_cfg's 1000) agree
    overlay = {"file": str(tmp_path / "vit.safetensors"), "num_classes": 4}
    for kwargs in (
        {"weights": tmp_path / "vit.pth"},
        {"weights": tmp_path / "vit.safetensors"},
        {"pretrained": True, "pretrained_cfg_overlay": overlay},
    ):
        clf = load_classifier("timm:vit_small_patch16_224", num_classes=4, **kwargs)
        assert tensors_equal(clf.model, state), kwargs
        with torch.no_grad():
            torch.testing.assert_close(clf(x), expected)
    # timm adapts the head to another num_classes: the body is the file's, the head is new
    clf = load_classifier(
        "timm:vit_small_patch16_224",
        num_classes=3,
        pretrained=True,
        pretrained_cfg_overlay={"file": str(tmp_path / "vit.pth"), "num_classes": 4},
    )
    body = {k: v for k, v in state.items() if not k.startswith("head.")}
    loaded = clf.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in body.items())
    assert not torch.equal(loaded["head.weight"][:3], state["head.weight"][:3])
    assert clf.num_classes == 3 and clf.model.head.out_features == 3

    with pytest.raises(AttnPatchError, match="do not fit the model"):
        load_classifier("timm:vit_tiny_patch16_224", num_classes=4, weights=tmp_path / "vit.pth")
    with pytest.raises(AttnPatchError, match="pretrained_cfg_overlay file .* not found"):
        load_classifier(
            "timm:vit_small_patch16_224",
            pretrained=True,
            pretrained_cfg_overlay={"file": str(tmp_path / "missing.safetensors")},
        )


# --------------------------------------------------------------------------- training, CLI


def training_config(**sections):
    base = {
        "train": {"iterations": 4, "accumulate": 2, "progress": False, "checkpoint_every": 0},
        "data": {"image_size": 224, "synthetic_per_class": 1, "synthetic_eval_per_class": 1},
        "attention": {"num_inference_steps": 4, "num_steps": 1, "diffusion_size": 64},
        "patch": {"size": 50},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return config_from_dict(base)


def train_and_check(trainer):
    """Train; check the patch moved, got gradients, every weighted term stayed finite and the
    classifier got no gradient and kept its state (BatchNorm statistics included)."""
    before = trainer.patch.pixels.detach().clone()
    state = {k: v.clone() for k, v in trainer.classifier.state_dict().items()}
    weighted = {name for name, w in trainer.weights.items() if w > 0}
    terms, grads = [], []
    trainer.hooks["forward"].append(lambda t, fwd: terms.append(fwd.terms.as_dict()))
    trainer.hooks["backward"].append(
        lambda t, fwd: grads.append(t.patch.pixels.grad.detach().clone())
    )
    trainer.train()
    assert len(terms) == len(grads) == trainer.config.train.iterations
    assert trainer.steps == trainer.config.train.iterations // trainer.config.train.accumulate
    for step in terms:
        present = {name for name, v in step.items() if v is not None and name != "total"}
        assert present == weighted
        assert all(math.isfinite(float(step[name])) for name in present | {"total"})
    for g in grads:
        assert torch.isfinite(g).all() and g.abs().sum() > 0
    assert not torch.equal(trainer.patch.pixels, before)
    assert trainer.patch.pixels.min() >= 0 and trainer.patch.pixels.max() <= 1
    assert all(p.grad is None for p in trainer.classifier.parameters())
    for k, v in trainer.classifier.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.fixture(scope="module")
def shapes_parts():
    return load_diffusion("shapes")


def make_trainer(cfg, spec, parts):
    train, _ = load_datasets(cfg)
    classifier = load_classifier(spec, num_classes=len(train.classes))
    torch.manual_seed(cfg.train.seed)
    patch = build_patch(cfg, torch.device("cpu"))
    return ap.PatchTrainer(cfg, classifier=classifier, parts=parts, patch=patch, train_data=train)


def test_training_a_patch_against_resnet50_then_attnpatch_apply(tmp_path, shapes_parts):
    cfg = training_config()
    trainer = make_trainer(cfg, "torchvision:resnet50", shapes_parts)
    assert trainer.patch.size == (50, 50)
    train_and_check(trainer)

    # the saved patch, applied by the CLI to a 224-px image, is the in-process application
    trainer.patch.save(tmp_path / "patch.safetensors")
    rgb = (np.random.default_rng(1).random((224, 224, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "img.png")
    assert main(["apply", str(tmp_path / "patch.safetensors"), str(tmp_path / "img.png"),
                 "--out", str(tmp_path / "out")]) == 0  # fmt: skip
    got = read_image(tmp_path / "out" / "img_patched.png")
    loaded = ap.AdversarialPatch.load(tmp_path / "patch.safetensors")
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        expected, mask = loaded(x, eot=False, generator=torch.Generator().manual_seed(0))
    expected = (expected * 255).round() / 255
    assert got.shape == (3, 224, 224) and mask.sum() > 0
    torch.testing.assert_close(got[None], expected, rtol=0, atol=1e-6)
    # the classifier sees the CLI's file as it sees the patched tensor: the pixels agree to
    # 1e-6 (the 8-bit rounding), which 50 layers amplify to ~2e-5 in logits of size ~6
    # (measured on CI's torch 2.14.1 build); a wrong application moves them by whole units
    with torch.no_grad():
        torch.testing.assert_close(
            trainer.classifier(got[None]), trainer.classifier(expected), rtol=1e-5, atol=1e-4
        )


def test_training_a_patch_against_timm_vit(shapes_parts):
    cfg = training_config(train={"iterations": 3}, attack={"loss": "cw"})
    train_and_check(make_trainer(cfg, "timm:vit_small_patch16_224", shapes_parts))


def test_config_form_with_a_cached_torchvision_weights_name(tmp_path, offline):
    """``models.classifier: torchvision:resnet50`` + ``models.classifier_weights: IMAGENET1K_V2``
    through build_trainer: data folders named after ImageNet categories map onto their logits."""
    weights = RESNET50_WEIGHTS.IMAGENET1K_V2
    cache = offline["home"] / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    state = seeded(tv.models.resnet50, 5).state_dict()
    torch.save(state, cache / weights.url.rsplit("/", 1)[1])
    rng = np.random.default_rng(0)
    for category in ("tench", "goldfish", "tiger shark"):
        (tmp_path / "data" / category).mkdir(parents=True)
        for i in range(2):
            rgb = (rng.random((240, 200, 3)) * 255).astype(np.uint8)
            Image.fromarray(rgb).save(tmp_path / "data" / category / f"{i}.png")
    cfg = training_config(
        models={
            "classifier": "torchvision:resnet50",
            "classifier_weights": "IMAGENET1K_V2",
            "device": "cpu",
        },
        data={"train": str(tmp_path / "data"), "eval": str(tmp_path / "data")},
        train={"iterations": 2},
    )
    trainer, held = build_trainer(cfg)
    assert tensors_equal(trainer.classifier.model, state)
    categories = list(weights.meta["categories"])
    assert trainer.logit_index.tolist() == [categories.index(c) for c in trainer.classes]
    assert sorted(trainer.classes) == ["goldfish", "tench", "tiger shark"] and len(held) == 6
    train_and_check(trainer)


def test_attnpatch_evaluate_on_tiny_and_resnet50(tmp_path, offline, capsys):
    """``attnpatch evaluate --classifiers tiny,torchvision:resnet50`` on 224-px images. The run
    config in the patch names resnet50 with a cached weights name (so the CLI's resnet50 is the
    one built here), the data folders are named after its clean predictions (clean accuracy 1),
    and the patch covers every image with one colour, so its success rate is known exactly."""
    weights = RESNET50_WEIGHTS.IMAGENET1K_V2
    cache = offline["home"] / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    rng = np.random.default_rng(2)
    rgb = (rng.random((6, 224, 224, 3)) * 255).astype(np.uint8)  # 4 noise images,
    rgb[4:] = (rng.random((2, 1, 1, 3)) * 255).astype(np.uint8)  # and 2 of one colour each
    images = torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 255
    torch.save(calibrated_resnet50(images, seed=6), cache / weights.url.rsplit("/", 1)[1])
    resnet = load_classifier("torchvision:resnet50", weights="IMAGENET1K_V2")
    categories = resnet.classes
    with torch.no_grad():
        clean = resnet(images).argmax(1).tolist()
    for i, k in enumerate(clean):
        assert categories.count(categories[k]) == 1  # a folder name maps to one logit
        (tmp_path / "data" / categories[k]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb[i]).save(tmp_path / "data" / categories[k] / f"{i}.png")

    # a patch of image 4's colour over the whole image: every patched image is image 4, so
    # the resnet predicts its class k for all of them
    k = clean[4]
    expected = sum(c != k for c in clean) / 6
    assert 0 < expected < 1  # neither none nor all of the images change class
    still = ap.EOT(degrees=0, scale=(1, 1), translate=0, distortion=0, contrast=(1, 1),
                   brightness=0, noise=0)  # fmt: skip
    patch = ap.AdversarialPatch(4, init="gray", scale=(1.0, 1.0), position="center", eot=still)
    with torch.no_grad():
        patch.pixels.copy_(images[4, :, :1, :1].expand_as(patch.pixels[0]))
    run = config_from_dict(
        {
            "models": {
                "classifier": "torchvision:resnet50",
                "classifier_weights": "IMAGENET1K_V2",
                "device": "cpu",
            },
            "data": {"train": str(tmp_path / "data"), "eval": str(tmp_path / "data")},
            "eval": {"eot_samples": 1},
        }
    )  # data.image_size stays 32: the tiny victim is the 32-px one, images come at 224
    patch.save(tmp_path / "patch.safetensors", extra={"config": json.dumps(config_to_dict(run))})

    assert main(["evaluate", "--patch", str(tmp_path / "patch.safetensors"),
                 "--classifiers", "tiny,torchvision:resnet50", "--data", str(tmp_path / "data"),
                 "--image-size", "224", "--out", str(tmp_path / "out")]) == 0  # fmt: skip
    assert "torchvision:resnet50" in capsys.readouterr().out
    for name in ("transfer.csv", "transfer.json", "transfer.png"):
        assert (tmp_path / "out" / name).is_file()
    rows = {
        r["victim"]: r for r in json.loads((tmp_path / "out" / "transfer.json").read_text())["rows"]
    }
    assert list(rows) == ["tiny", "torchvision:resnet50"]

    r = rows["torchvision:resnet50"]
    assert r["surrogate"] and r["label_rule"] == "label" and r["clean_accuracy"] == 1.0
    assert r["eligible"] == r["images"] == 6 and r["num_classes"] == 1000
    assert r["input_size"] == "224x224"
    assert r["success_rate"] == pytest.approx(expected)
    assert 0 <= r["control_success_rate"] <= 1
    t = rows["tiny"]
    assert not t["surrogate"] and t["label_rule"] == "changed" and t["clean_accuracy"] is None
    assert t["eligible"] == 6 and t["num_classes"] == 5 and t["input_size"] == "32x32"
