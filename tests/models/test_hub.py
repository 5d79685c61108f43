"""Hub ids as diffusers takes them (``org/name``, ``@revision``, ``variant=``), read from a Hugging
Face cache built here by hand, with every way to the network blocked."""

from __future__ import annotations

import json
import socket

import pytest
import torch
import yaml

from attnpatch.cli import main
from attnpatch.errors import ModelError
from attnpatch.models import hub, load_diffusion
from attnpatch.testing import save_to_hub_cache, tiny_sd
from attnpatch.training import build_trainer
from attnpatch.training.config import config_from_dict, load_config

REPO = "tiny-org/tiny-sd"


@pytest.fixture
def blocked(monkeypatch):
    """No socket connects and no name resolves: a download attempt fails (and is recorded)."""
    attempts: list[str] = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args[1:2]))
        raise OSError("test_hub: network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: refuse(None, a[0]))
    return attempts


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k].to(sa[k].dtype)) for k in sa)


def test_the_cache_layout_is_hf_downloads(tmp_path):
    snapshot = save_to_hub_cache(tiny_sd("sd15"), REPO, cache_dir=tmp_path)
    repo = tmp_path / "models--tiny-org--tiny-sd"
    assert snapshot.parent == repo / "snapshots"
    assert (repo / "refs" / "main").read_text() == snapshot.name and len(snapshot.name) == 40
    index = json.loads((snapshot / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (snapshot / part).is_dir(), part
    assert hub.repo_cache_folder(REPO) == hub.hub_cache() / "models--tiny-org--tiny-sd"


def test_a_hub_id_loads_the_cached_snapshot_offline(blocked):
    sd = tiny_sd("sd15", seed=0)
    save_to_hub_cache(sd, REPO)  # into $HF_HUB_CACHE (a tmp folder: tests/conftest.py)
    for kwargs in ({}, {"local_files_only": True}):
        parts = load_diffusion(REPO, **kwargs)
        for name in ("unet", "vae", "text_encoder"):
            assert same(getattr(parts, name), getattr(sd, name)), name
        assert parts.tokenizer.get_vocab() == sd.tokenizer.get_vocab()
        assert parts.variant == "sd15" and type(parts.scheduler).__name__ == "DDIMScheduler"
        assert parts.scheduler.config.beta_end == sd.scheduler.config.beta_end
        assert not any(p.requires_grad for p in parts.unet.parameters())
    assert blocked == []  # offline: not even tried


def test_revisions_commits_and_variants(blocked):
    main_sd, tagged, half = tiny_sd("sd15", 0), tiny_sd("sd15", 1), tiny_sd("sd15", 2)
    save_to_hub_cache(main_sd, REPO)
    snapshot = save_to_hub_cache(tagged, REPO, revision="v1")
    for module in half.modules():
        module.half()
    save_to_hub_cache(half, REPO, variant="fp16")  # beside main's fp32 files
    assert same(load_diffusion(f"{REPO}@v1").unet, tagged.unet)
    assert same(load_diffusion(REPO, revision="v1").unet, tagged.unet)
    assert same(load_diffusion(f"{REPO}@{snapshot.name}").unet, tagged.unet)  # a commit hash
    assert same(load_diffusion(REPO).unet, main_sd.unet)
    fp16 = load_diffusion(REPO, variant="fp16", torch_dtype=torch.float16)
    assert fp16.unet.dtype == torch.float16 and same(fp16.unet, half.unet)
    assert same(fp16.text_encoder, half.text_encoder)
    assert fp16.vae.dtype == torch.float32 and same(fp16.vae, half.vae)  # the VAE stays fp32
    assert blocked == []


def test_what_is_not_cached_names_hf_download_and_the_cache(blocked):
    save_to_hub_cache(tiny_sd("sd15"), REPO)
    with pytest.raises(ModelError) as err:
        load_diffusion("other-org/not-cached")
    message = str(err.value)
    assert "`hf download other-org/not-cached`" in message and "huggingface-cli" not in message
    assert str(hub.hub_cache() / "models--other-org--not-cached") in message
    assert "HF_HUB_OFFLINE" in message
    with pytest.raises(ModelError, match=r"hf download tiny-org/tiny-sd --revision v9"):
        load_diffusion(f"{REPO}@v9")
    with pytest.raises(ModelError, match="local_files_only=True"):
        load_diffusion("other-org/not-cached", local_files_only=True)
    with pytest.raises(ModelError, match="registered stack built in code"):
        load_diffusion("tiny", variant="fp16")
    assert blocked == []


def test_online_it_asks_the_hub_then_falls_back_to_the_cache(blocked, monkeypatch):
    """HF_HUB_OFFLINE unset: diffusers tries the hub (here: refused) and uses the snapshot."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert not hub.offline() and hub.offline(True)
    sd = tiny_sd("sd15")
    save_to_hub_cache(sd, REPO)
    assert same(load_diffusion(REPO).unet, sd.unet)
    assert blocked, "online, it must have tried the hub"
    with pytest.raises(ModelError, match=r"could not be fetched.*hf download other-org/x"):
        load_diffusion("other-org/x")


def test_parse_hub_id():
    assert hub.parse_hub_id("org/name") == ("org/name", None)
    assert hub.parse_hub_id("org/name@refs/pr/3") == ("org/name", "refs/pr/3")
    for spec in ("shapes", "/abs/path", "./org/name", "a/b/c", "~/x", "org/..", "org/name/"):
        assert hub.parse_hub_id(spec) is None, spec


FAST = {
    "train": {"iterations": 2, "accumulate": 2, "checkpoint_every": 0, "progress": False},
    "attention": {"num_steps": 1, "num_inference_steps": 4},
    "data": {"synthetic_per_class": 1, "synthetic_eval_per_class": 1},
    "eval": {"eot_samples": 1, "examples": 2},
}


def test_a_cached_hub_id_trains_from_python_the_config_and_the_cli(blocked, tmp_path):
    """The shipped shapes stack, saved as a hub snapshot, trains under HF_HUB_OFFLINE=1."""
    shapes = load_diffusion("shapes")
    save_to_hub_cache(shapes, "shapes-org/shapes-sd", revision="v2")
    spec = "shapes-org/shapes-sd@v2"

    cfg = config_from_dict({**FAST, "models": {"diffusion": spec}})  # Python
    trainer, _ = build_trainer(cfg)
    assert same(trainer.parts.unet, shapes.unet) and same(trainer.parts.vae, shapes.vae)
    trainer.train()
    assert trainer.iteration == 2

    config = tmp_path / "run.yaml"  # a config file (what attnpatch train --config reads)
    config.write_text(yaml.safe_dump({**FAST, "models": {"diffusion": spec}}))
    trainer, _ = build_trainer(load_config(config))
    assert same(trainer.parts.text_encoder, shapes.text_encoder)

    out = tmp_path / "run"  # the command line: attnpatch train --models.diffusion org/name@rev
    flags = ["--train.iterations", "2", "--train.accumulate", "2", "--attention.num_steps", "1"]
    flags += ["--attention.num_inference_steps", "4", "--data.synthetic_per_class", "1"]
    flags += ["--data.synthetic_eval_per_class", "1", "--eval.eot_samples", "1"]
    args = ["train", "--quiet", "--models.diffusion", spec, "--train.out_dir", str(out), *flags]
    assert main(args) == 0
    assert json.loads((out / "config.json").read_text())["models"]["diffusion"] == spec
    assert (out / "patch.safetensors").is_file() and (out / "summary.json").is_file()
    assert blocked == []
