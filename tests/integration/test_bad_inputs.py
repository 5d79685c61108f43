"""The bad-input table of docs/training.md ("Bad inputs"), one test per row.

Each row: what a user passes, the message (a substring) the CLI prints as ``attnpatch: error:``
with exit status 2 (never a traceback), and what must survive (nothing lost).
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import attnpatch as ap
from attnpatch.cli import main
from attnpatch.data import ImageFolder, read_image
from attnpatch.errors import InputError

FAST = [  # a run that is cheap enough to build for every row
    "--train.iterations",
    "2",
    "--train.accumulate",
    "1",
    "--train.checkpoint_every",
    "1",
    "--data.synthetic_per_class",
    "2",
    "--data.synthetic_eval_per_class",
    "1",
    "--eval.eot_samples",
    "1",
    "--eval.examples",
    "1",
    "--quiet",
]


def fails(capsys, argv: list[str], message: str) -> str:
    """Run the CLI; assert exit 2, ``message`` in its error line, no traceback."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("attnpatch: error: ")]
    assert len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err
    return errors[0]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# -- config -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.yaml", "train: [iterations: 3\n", "is not valid YAML"),
        ("bad.toml", "[train\niterations = 3\n", "is not valid TOML"),
        ("bad.json", '{"train": {"iterations": 3,}}', "is not valid JSON"),
        ("list.yaml", "- 1\n- 2\n", "a config must be a mapping"),
        ("unknown.yaml", "train:\n  iteratons: 3\n", "did you mean 'iterations'"),
        ("type.toml", "[train]\niterations = 'many'\n", "train.iterations must be int"),
    ],
)
def test_config_files(tmp_path, capsys, name, text, message):
    path = write(tmp_path / name, text)
    fails(capsys, ["train", "--config", str(path)], message)
    fails(capsys, ["doctor", "--config", str(path)], message)


def test_missing_config_file(tmp_path, capsys):
    fails(capsys, ["train", "--config", str(tmp_path / "no.yaml")], "does not exist")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--train.iterations", "0"], "train.iterations must be >= 1"),
        (["--train.accumulate", "0"], "train.accumulate (K) must be >= 1"),
        (["--patch.translate", "3"], "EOT translate must be >= 0 and < 1"),
        (["--patch.contrast", "1.2", "0.8"], "EOT contrast"),
        (["--patch.scale", "0.5", "0.2"], "patch.scale must be [low, high]"),
        (["--patch.degrees", "-5"], "EOT degrees must be >= 0"),
        (["--patch.size", "0"], "patch.size must be >= 1"),
        (["--attention.num_steps", "20"], "attention.num_steps (20) must be in"),
        (["--models.diffusion", "nosuch"], "unknown diffusion stack 'nosuch'"),
        (["--models.classifier", "nosuch"], "unknown classifier 'nosuch'"),
        (["--data.train", "/no/such/folder"], "does not exist"),
        (["--attack.targeted", "true"], "attack.target is empty"),
    ],
)
def test_config_values(tmp_path, capsys, flags, message):
    fails(capsys, ["train", "--train.out_dir", str(tmp_path / "run"), *flags], message)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_classifier_weights_that_do_not_exist_are_an_error(tmp_path, capsys):
    # was: silently ignored (build_trainer never passed the field on)
    missing = str(tmp_path / "nothere.pt")
    argv = ["train", "--train.out_dir", str(tmp_path / "run"), *FAST]  # not the cwd's runs/tiny
    fails(capsys, [*argv, "--models.classifier_weights", missing], "nothere.pt' not found")


def test_patch_larger_than_the_image(tmp_path, capsys):
    path = write(tmp_path / "c.toml", "[patch]\nscale = []\nsize = 40\n")
    fails(capsys, ["doctor", "--config", str(path)], "the patch is larger than the image")


def test_diffusers_folders(tmp_path, capsys):
    fails(capsys, ["doctor", "--models.diffusion", str(tmp_path)], "not a complete diffusers")
    from attnpatch.models.shapes_sd import SHAPES_WEIGHTS

    broken = tmp_path / "broken"
    shutil.copytree(SHAPES_WEIGHTS, broken)
    write(broken / "unet" / "config.json", "{bad")
    fails(capsys, ["doctor", "--models.diffusion", str(broken)], "unet/config.json")


# -- data ---------------------------------------------------------------------------------------
def image_folder(root: Path, writer) -> Path:
    for cls in ("circle", "square"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            writer(root / cls / f"{i}.png")
    return root


def rgb(path: Path) -> None:
    Image.fromarray(np.full((8, 8, 3), 120, np.uint8)).save(path)


def test_empty_folder_and_folder_without_images(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    fails(capsys, ["doctor", "--data.train", str(tmp_path / "empty")], "no class subfolders")
    (tmp_path / "txt" / "cat").mkdir(parents=True)
    write(tmp_path / "txt" / "cat" / "a.txt", "hi")
    fails(capsys, ["doctor", "--data.train", str(tmp_path / "txt")], "holds no images")


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_bad_image_files_are_listed_up_front(tmp_path, capsys, damage):
    root = image_folder(tmp_path / "data", rgb)
    bad = root / "circle" / "0.png"
    if damage == "corrupt":
        bad.write_bytes(b"not a png")
    else:
        bad.write_bytes(bad.read_bytes()[:40])
    fails(capsys, ["doctor", "--data.train", str(root), "--data.eval", str(root)], "0.png")


def test_csv_with_a_missing_path(tmp_path, capsys):
    csv = write(tmp_path / "d.csv", "path,label\nmissing.png,circle\n")
    fails(capsys, ["doctor", "--data.train", str(csv)], "missing.png' not found")


def test_csv_labels_unknown_to_the_eval_set(tmp_path, capsys):
    root = image_folder(tmp_path / "data", rgb)
    csv = write(tmp_path / "d.csv", f"path,label\n{root}/circle/0.png,cat\n")
    fails(capsys, ["doctor", "--data.train", str(csv), "--data.eval", str(root)], "differ from")


def test_grey_rgba_16bit_and_4x4_images_are_read_as_rgb_in_0_1(tmp_path):
    Image.fromarray(np.full((6, 6), 51, np.uint8), "L").save(tmp_path / "grey.png")
    Image.fromarray(np.full((6, 6, 4), 204, np.uint8), "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(np.full((6, 6), 13107, np.uint16)).save(tmp_path / "deep.png")  # 0.2 * 65535
    Image.fromarray(np.full((4, 4, 3), 255, np.uint8)).save(tmp_path / "tiny.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")  # really 16-bit on disk
    for name, value in [("grey", 0.2), ("rgba", 0.8), ("deep", 0.2), ("tiny", 1.0)]:
        x = read_image(tmp_path / f"{name}.png", 8)  # 4x4 upsampled to the asked size
        assert x.shape == (3, 8, 8), name
        torch.testing.assert_close(x, torch.full_like(x, value), atol=1 / 255, rtol=0)
    # the image folder reads 16-bit files the same way (was: pure white)
    root = image_folder(tmp_path / "deep16", lambda p: shutil.copy(tmp_path / "deep.png", p))
    x, _ = ImageFolder(root, 8)[0]
    assert abs(float(x.mean()) - 0.2) < 1 / 255


# -- run folders --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished two-iteration run (checkpoint at iteration 2)."""
    out = tmp_path_factory.mktemp("run") / "run"
    assert main(["train", "--train.out_dir", str(out), *FAST]) == 0
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(run, out)
    return out


def test_rerun_without_overwrite(run, tmp_path, capsys):
    out = copy_of(run, tmp_path)
    fails(capsys, ["train", "--train.out_dir", str(out), *FAST], "already holds a run")


def test_resume_without_checkpoint(tmp_path, capsys):
    fails(
        capsys, ["train", "--resume", "--train.out_dir", str(tmp_path), *FAST], "no checkpoint in"
    )


def test_resume_after_changing_the_config(run, tmp_path, capsys):
    out = copy_of(run, tmp_path)
    argv = ["train", "--resume", "--train.out_dir", str(out), *FAST, "--train.lr", "0.1"]
    fails(capsys, argv, "comes from a different config (train.lr: 0.05 -> 0.1)")


def test_resume_with_fewer_iterations_keeps_config_json(run, tmp_path, capsys):
    out = copy_of(run, tmp_path)
    before = (out / "config.json").read_bytes()
    argv = ["train", "--resume", "--train.out_dir", str(out), *FAST, "--train.iterations", "1"]
    fails(capsys, argv, "is at iteration 2, past train.iterations=1")
    assert (out / "config.json").read_bytes() == before


@pytest.mark.parametrize(
    ("file", "damage", "message"),
    [
        ("state.pt", "truncate", "cannot read"),
        ("state.pt", "garbage", "cannot read"),
        ("patch.safetensors", "truncate", "not a readable safetensors file"),
        ("config.json", "truncate", "cannot read"),
    ],
)
def test_damaged_checkpoint(run, tmp_path, capsys, file, damage, message):
    out = copy_of(run, tmp_path)
    target = out / "checkpoints" / "it-000002" / file
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage")
    argv = ["train", "--resume", "--train.out_dir", str(out), *FAST]
    err = fails(capsys, argv, message)
    assert file in err and "--overwrite" in err


def test_latest_names_a_deleted_folder(run, tmp_path, capsys):
    out = copy_of(run, tmp_path)
    shutil.rmtree(out / "checkpoints" / "it-000002")
    fails(
        capsys, ["train", "--resume", "--train.out_dir", str(out), *FAST], "missing or incomplete"
    )


def test_out_dir_that_is_a_file_or_lies_under_one(tmp_path, capsys):
    write(tmp_path / "f", "x")
    fails(capsys, ["train", "--train.out_dir", str(tmp_path / "f"), *FAST], "is a file")
    fails(capsys, ["train", "--train.out_dir", str(tmp_path / "f" / "run"), *FAST], "is a file")


def test_overwrite_with_a_failing_config_keeps_the_checkpoints(run, tmp_path, capsys):
    out = copy_of(run, tmp_path)
    argv = ["train", "--overwrite", "--train.out_dir", str(out), *FAST]
    fails(capsys, [*argv, "--data.train", str(tmp_path / "nothere")], "does not exist")
    assert (out / "checkpoints" / "latest").is_file()  # still resumable
    fails(capsys, ["train", "--train.out_dir", str(out), *FAST], "already holds a run")


# -- apply --------------------------------------------------------------------------------------
def test_apply_refuses_bad_patch_files(run, tmp_path, capsys):
    folder = image_folder(tmp_path / "imgs", rgb)
    write(tmp_path / "p.safetensors", "not safetensors")
    fails(capsys, ["apply", str(tmp_path / "p.safetensors"), str(folder)], "not a readable")
    fails(capsys, ["apply", str(tmp_path / "none.safetensors"), str(folder)], "no patch file")


def test_apply_output_and_input_problems(run, tmp_path, capsys):
    patch = str(run / "patch.safetensors")
    folder = image_folder(tmp_path / "imgs", rgb)
    (tmp_path / "none").mkdir()
    fails(capsys, ["apply", patch, str(tmp_path / "none")], "no images found")
    write(tmp_path / "file", "x")
    fails(capsys, ["apply", patch, str(folder), "--out", str(tmp_path / "file")], "is a file")
    out = tmp_path / "out"
    (out / "0_patched.png").mkdir(parents=True)  # an output name taken by a folder
    fails(capsys, ["apply", patch, str(folder / "circle"), "--out", str(out)], "it is a folder")
    assert [p.name for p in out.iterdir()] == ["0_patched.png"]  # nothing else written
    (folder / "square" / "1.png").write_bytes(b"broken")
    fails(capsys, ["apply", patch, str(folder), "--out", str(tmp_path / "o2")], "1.png")
    assert not (tmp_path / "o2").exists()  # nothing written before the check


def test_apply_a_patch_from_a_run_with_another_image_size(run, tmp_path, capsys):
    # documented: the placement scale is relative to each image, any size works
    Image.fromarray(np.full((48, 64, 3), 90, np.uint8)).save(tmp_path / "big.png")
    assert main(["apply", str(run / "patch.safetensors"), str(tmp_path / "big.png"), "--out",
                 str(tmp_path / "o")]) == 0  # fmt: skip
    assert read_image(tmp_path / "o" / "big_patched.png").shape == (3, 48, 64)


# -- doctor, trace ------------------------------------------------------------------------------
@pytest.mark.parametrize("n", ["0", "-2", "1"])
def test_doctor_iterations(capsys, n):
    fails(capsys, ["doctor", "--iterations", n, "--train.accumulate", "1"], "at least K + 1 = 2")


@pytest.mark.parametrize("latent", ["abc", "0", "8x", "4x4x4"])
def test_trace_latent(capsys, latent):
    fails(capsys, ["trace", "--model", "tiny", "--latent", latent], "--latent must be")


# -- Python API ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def parts():
    return ap.load_diffusion("shapes")


def test_hijack_given_the_pipeline_or_parts(parts):
    with (
        pytest.raises(ap.AttnPatchError, match="pass its .unet"),
        ap.hijack(parts, ap.AttentionStore()),
    ):
        pass
    with (
        pytest.raises(ap.AttnPatchError, match="AttentionControl"),
        ap.hijack(parts.unet, object()),
    ):
        pass


def _denoise(parts, latents, scheduler=None):
    embeds = ap.diffusion.encode_prompt(parts.tokenizers, parts.text_encoders, ["a circle"])
    return ap.ddim_denoise(
        parts.unet,
        scheduler or parts.scheduler,
        latents,
        embeds.cond,
        num_inference_steps=10,
        num_steps=1,
    )


def test_nan_latents_and_non_ddim_scheduler(parts):
    with pytest.raises(ap.AttnPatchError, match="latents contain NaN or Inf"):
        _denoise(parts, torch.full((1, 4, 8, 8), float("nan")))
    from diffusers import EulerDiscreteScheduler

    euler = EulerDiscreteScheduler.from_config(parts.scheduler.config)
    with pytest.raises(ap.AttnPatchError, match="needs a DDIMScheduler"):
        _denoise(parts, torch.randn(1, 4, 8, 8), euler)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p[..., :1], "must return probabilities of the shape it received"),
        (lambda p: p * float("nan"), "returned NaN or Inf probabilities"),
    ],
)
def test_controller_returning_a_wrong_shape_or_nan(parts, edit, message):
    class Edit(ap.AttentionControl):
        def needs(self, site):
            return True

        def __call__(self, probs, site):
            return edit(probs)

    before = {n: m.processor for n, m in ap.hooks.attention_modules(parts.unet)}
    with pytest.raises(ap.AttnPatchError, match=message), ap.hijack(parts.unet, Edit()):
        _denoise(parts, torch.randn(1, 4, 8, 8))
    assert before == {n: m.processor for n, m in ap.hooks.attention_modules(parts.unet)}


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (torch.rand(1, 3, 32, 32) * 255, "look like \\[0, 255\\] pixels"),
        (torch.rand(1, 32, 32, 3), "channels-last"),
        (torch.full((1, 3, 32, 32), float("nan")), "NaN or Inf"),
        (torch.full((1, 3, 32, 32), float("inf")), "NaN or Inf"),
    ],
)
def test_pipeline_images(parts, images, message):
    pipe = ap.AttentionPipeline(parts, image_size=32)
    with pytest.raises(InputError, match=message):  # check_image's layout or range error
        pipe(images, ["a circle"])


def test_pipeline_prompt_count_and_missing_resolution(parts):
    pipe = ap.AttentionPipeline(parts, image_size=32)
    with pytest.raises(ap.AttnPatchError, match="got 2 prompts for 1 images"):
        pipe(torch.rand(1, 3, 32, 32), ["a", "b"])
    with torch.no_grad():
        result = pipe(torch.rand(1, 3, 32, 32), ["a circle"])
    with pytest.raises(ap.AttnPatchError, match="no cross-attention maps at resolution"):
        result.cross.aggregate("cross", (5, 5))


def test_vae_encode_warns_on_images_without_negative_pixels(parts):
    with pytest.warns(UserWarning, match="no pixel of the batch is below 0"):
        ap.vae_encode(parts.vae, torch.rand(1, 3, 32, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ap.vae_encode(parts.vae, torch.rand(1, 3, 32, 32) * 2 - 1)  # [-1, 1]: no warning


def test_training_leaves_no_sigint_handler_behind(run):
    # `run` trained in this process; Ctrl-C handling is armed only inside the loop
    import signal

    # what the process started with stays: Python's own handler, or SIG_IGN where the suite
    # was started as a background job (its shell ignores SIGINT there); never the loop's
    assert signal.getsignal(signal.SIGINT) in (signal.default_int_handler, signal.SIG_IGN)
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.SIG_IGN)
