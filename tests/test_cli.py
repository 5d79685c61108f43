"""The command line: train (run folder, resume, configs), apply, trace."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import attnpatch as ap
from attnpatch.cli import main
from attnpatch.errors import ConfigError
from attnpatch.training.config import load_config

RUN_FILES = [
    "config.json",
    "metrics.jsonl",
    "patch.safetensors",
    "patch.png",
    "loss_curves.png",
    "attention.png",
    "examples.png",
    "success_vs_scale.png",
    "summary.json",
    "checkpoints/latest",
]

#: The outputs `attnpatch train` lists when it finishes, in its order.
PRINTED_FILES = [
    "patch.png",
    "patch.safetensors",
    "metrics.jsonl",
    "loss_curves.png",
    "attention.png",
    "examples.png",
    "success_vs_scale.png",
    "summary.json",
]

FAST = [
    "--quiet",
    "--train.iterations", "6",
    "--train.accumulate", "2",
    "--train.checkpoint_every", "3",
    "--attention.num_steps", "1",
    "--attention.num_inference_steps", "4",
    "--data.synthetic_per_class", "2",
    "--data.synthetic_eval_per_class", "2",
    "--eval.eot_samples", "1",
]  # fmt: skip


def assert_environment(env):
    """summary.json's "environment": the versions imported here and attnpatch's git commit."""
    import diffusers
    import transformers

    assert env["torch"] == torch.__version__ and env["cuda"] == torch.version.cuda
    assert env["diffusers"] == diffusers.__version__
    assert env["transformers"] == transformers.__version__
    assert env["attnpatch"] == ap.__version__
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    head = subprocess.run(
        ["git", "-C", str(Path(ap.__file__).parents[1]), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
    )
    assert env["git_commit"] == (head.stdout.strip() if head.returncode == 0 else None)


@pytest.mark.slow
def test_train_writes_the_run_folder_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--train.out_dir", str(out), *FAST]) == 0
    printed = capsys.readouterr().out
    for name in RUN_FILES:
        assert (out / name).is_file(), name
    listed = [line.strip() for line in printed.splitlines() if line.startswith("  ")]
    assert listed == [str(out / n) for n in PRINTED_FILES]  # the outputs it names, each once
    summary = json.loads((out / "summary.json").read_text())
    for key in ("clean_accuracy", "success_rate", "control_success_rate"):
        assert 0 <= summary[key] <= 1, key
    assert isinstance(summary["eligible"], int) and 0 < summary["eligible"] <= summary["images"]
    assert summary["iterations"] == 6 and summary["optimizer_steps"] == 3
    assert_environment(summary["environment"])
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == list(range(6))
    assert {"classifier", "cross_attention", "self_attention", "l2", "total"} <= set(lines[0])
    for name in (
        "patch.png",
        "loss_curves.png",
        "attention.png",
        "examples.png",
        "success_vs_scale.png",
    ):
        with Image.open(out / name) as im:
            assert im.size[0] > 8 and im.size[1] > 8
    # a second run into the same folder must not silently overwrite it: the same command
    # shows the finished run (nothing trained), another config is refused
    before = (out / "metrics.jsonl").read_text()
    assert main(["train", "--train.out_dir", str(out), *FAST]) == 0
    assert (out / "metrics.jsonl").read_text() == before
    capsys.readouterr()
    assert main(["train", "--train.out_dir", str(out), *FAST, "--train.lr", "0.01"]) == 2
    assert "--resume" in capsys.readouterr().err
    before = (out / "metrics.jsonl").read_text()
    # resume with more iterations continues from the checkpoint
    assert (
        main(["train", "--train.out_dir", str(out), *FAST, "--train.iterations", "8", "--resume"])
        == 0
    )
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == list(range(8))
    assert (out / "metrics.jsonl").read_text().startswith(before)  # the first 6 lines kept
    assert main(["train", "--train.out_dir", str(out), *FAST, "--overwrite"]) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == list(range(6))


def test_apply_reproduces_the_patched_image(tmp_path):
    patch = ap.AdversarialPatch(6, init="random", scale=(0.4, 0.4), position="center")
    patch.save(tmp_path / "patch.safetensors")
    rgb = (np.random.default_rng(0).random((24, 20, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "img.png")
    assert main(["apply", str(tmp_path / "patch.safetensors"), str(tmp_path / "img.png"),
                 "--out", str(tmp_path / "out")]) == 0  # fmt: skip
    with Image.open(tmp_path / "out" / "img_patched.png") as im:
        got = np.asarray(im.convert("RGB"))
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    loaded = ap.AdversarialPatch.load(tmp_path / "patch.safetensors")
    expected, mask = loaded(x, eot=False, generator=torch.Generator().manual_seed(0))
    expected = (expected[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(got, expected)
    assert mask.sum() > 0 and not np.array_equal(got, rgb)


def test_trace_prints_every_site(capsys):
    assert main(["trace", "--model", "sd15", "--latent", "64", "--summary"]) == 0
    out = capsys.readouterr().out
    assert "32 attention layers (16 self)" in out
    assert "| down | self | 64x64 | 2 | 8 | (B, 64, 64, 4096) |" in out
    assert main(["trace", "--model", "tiny", "--latent", "32x24"]) == 0
    assert "16x12" in capsys.readouterr().out


@pytest.mark.parametrize(
    "model, layers, rows",
    [
        ("sd3", "24 attention layers (24 joint image+text, 0 image-only; 333 text tokens)", 72),
        ("flux", "57 attention layers (57 joint image+text, 0 image-only; 512 text tokens)", 171),
    ],
)
def test_trace_diffusion_transformers(capsys, model, layers, rows):
    """SD3-medium and Flux-dev from their public configs, on the meta device."""
    assert main(["trace", "--model", model, "--latent", "64x48", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert layers in out
    keys = 333 if model == "sd3" else 512
    assert (
        f"| joint | cross | 32x24 | {24 if model == 'sd3' else 19} | 24 | (B, 32, 24, {keys}) |"
        in out
    )
    assert (
        sum(line.startswith("| ") and "| 32x24 | (B, 24," in line for line in out.splitlines())
        == rows
    )
    assert main(["trace", "--model", "sd4"]) == 2
    assert "unknown model 'sd4'" in capsys.readouterr().err


def test_configs_yaml_toml_flags_and_unknown_keys(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("train:\n  accumulate: 3\npatch:\n  shape: circle\n")
    (tmp_path / "c.toml").write_text("[train]\naccumulate = 3\n[patch]\nshape = 'circle'\n")
    for name in ("c.yaml", "c.toml"):
        cfg = load_config(tmp_path / name, {"train.lr": "0.2", "patch.scale": "0.1 0.2"})
        assert cfg.train.accumulate == 3 and cfg.patch.shape == "circle"
        assert cfg.train.lr == 0.2 and cfg.patch.scale == [0.1, 0.2]
    (tmp_path / "bad.yaml").write_text("train:\n  acumulate: 3\n")
    assert main(["train", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "did you mean 'accumulate'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--train.nope", "1"])
    with pytest.raises(ConfigError, match="train.accumulate must be an integer"):
        load_config(None, {"train.accumulate": "2.5"})


def test_apply_refuses_an_out_inside_its_input_folder(tmp_path, capsys):
    # was: a second run patched the first run's *_patched.png outputs
    patch = ap.AdversarialPatch(4, init="random", scale=0.3)
    patch.save(tmp_path / "patch.safetensors")
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(photos / "a.png")
    for out in (photos, photos / "patched"):
        assert main(["apply", str(tmp_path / "patch.safetensors"), str(photos), "--out",
                     str(out)]) == 2  # fmt: skip
        err = capsys.readouterr().err
        assert "inside the input folder" in err and "Traceback" not in err
    assert sorted(p.name for p in photos.iterdir()) == ["a.png"]  # nothing written
    assert main(["apply", str(tmp_path / "patch.safetensors"), str(photos), "--out",
                 str(tmp_path / "elsewhere")]) == 0  # fmt: skip
