"""The "shapes" stack's training script (attnpatch/models/train_shapes.py): it still runs, it
resumes exactly, and it refuses what would lose work. CI never retrains the shipped weights."""

from __future__ import annotations

import json

import pytest
import torch

from attnpatch.errors import ConfigError, RunFolderError
from attnpatch.models import load_diffusion
from attnpatch.models import train_shapes as ts

_SMALL = dict(pool=64, batch_size=4, vae_steps=2, unet_steps=3, warmup=1, checkpoint_every=2)


def _state(folder) -> dict[str, torch.Tensor]:
    parts = load_diffusion(folder)
    out = {}
    for name in ("unet", "vae", "text_encoder"):
        out.update({f"{name}.{k}": v for k, v in getattr(parts, name).state_dict().items()})
    return out


def test_the_script_runs_and_writes_a_loadable_sd_folder(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--out", str(out), "--no-progress"]
    args += [f"--{k.replace('_', '-')}={v}" for k, v in _SMALL.items()]
    assert ts.main(args) == 0
    info = json.loads((out / "train_info.json").read_text())
    assert info["config"]["unet_steps"] == 3 and info["train_seconds"] > 0
    assert json.loads(capsys.readouterr().out) == info
    parts = load_diffusion(out)  # from_pretrained of a plain diffusers folder
    assert parts.text_encoder.config.num_hidden_layers == 0
    assert parts.vae.config.scaling_factor == pytest.approx(info["scaling_factor"])
    assert all(not p.requires_grad for p in parts.unet.parameters())
    # sha256 listed for every weights file
    assert sorted(info["sha256"]) == sorted(
        str(p.relative_to(out)) for p in out.glob("*/*.safetensors")
    )


def test_training_changes_every_network_and_the_text_embeddings(tmp_path):
    start = ts.shapes_sd(seed=0)
    ts.train_shapes(tmp_path / "a", ts.ShapesTrainConfig(**_SMALL), progress=False)
    trained = load_diffusion(tmp_path / "a")
    for name in ("unet", "vae", "text_encoder"):
        before = dict(getattr(start, name).named_parameters())
        after = dict(getattr(trained, name).named_parameters())
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        assert changed, name
    # the word embeddings themselves are trained (the shape word carries the shape)
    emb = start.text_encoder.get_input_embeddings().weight
    assert not torch.equal(emb, trained.text_encoder.get_input_embeddings().weight)


def test_same_seed_same_bytes_and_a_resumed_run_loses_nothing(tmp_path):
    config = ts.ShapesTrainConfig(**_SMALL)
    ts.train_shapes(tmp_path / "straight", config, progress=False)
    # Interrupted after the checkpoint at step 4 (inside the UNet stage), then resumed.
    short = ts.ShapesTrainConfig(**_SMALL)
    run = ts._Run(short)
    pool = ts.render_pool(short)
    ts._train_steps(run, pool, 4)  # the loop train_shapes runs, stopped at step 4
    torch.save(run.state_dict(), tmp_path / "ckpt.pt")
    (tmp_path / "resumed").mkdir()
    (tmp_path / "ckpt.pt").rename(tmp_path / "resumed" / "checkpoint.pt")
    ts.train_shapes(tmp_path / "resumed", config, resume=True, progress=False)
    a, b = _state(tmp_path / "straight"), _state(tmp_path / "resumed")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ts.train_shapes(tmp_path / "again", config, progress=False)
    c = _state(tmp_path / "again")
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_refuses_to_overwrite_or_to_resume_with_other_settings(tmp_path):
    out = tmp_path / "run"
    ts.train_shapes(out, ts.ShapesTrainConfig(**_SMALL), progress=False)
    with pytest.raises(RunFolderError, match="not empty; pass --resume"):
        ts.train_shapes(out, ts.ShapesTrainConfig(**_SMALL), progress=False)
    other = ts.ShapesTrainConfig(**dict(_SMALL, unet_steps=5))
    with pytest.raises(RunFolderError, match="other settings"):
        ts.train_shapes(out, other, resume=True, progress=False)
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        ts.ShapesTrainConfig(batch_size=0)
