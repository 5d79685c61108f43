"""``attnpatch train --log``: TensorBoard event files read back with TensorBoard's own reader
(scalars equal metrics.jsonl at the same steps, images, resume after a crash), W&B offline,
a data-parallel run, and the missing-package message."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from attnpatch import AdversarialPatch
from attnpatch.cli import main
from attnpatch.training.terms import term_names

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

FAST = [
    "--quiet",
    "--train.iterations", "6",
    "--train.accumulate", "2",
    "--train.checkpoint_every", "3",
    "--train.lr", "0.03",
    "--train.log_images_every", "2",
    "--attention.num_steps", "1",
    "--attention.num_inference_steps", "4",
    "--data.synthetic_per_class", "2",
    "--data.synthetic_eval_per_class", "2",
    "--eval.eot_samples", "1",
    "--eval.examples", "1",
]  # fmt: skip


def train(out: Path, *extra: str) -> None:
    assert main(["train", "--train.out_dir", str(out), *FAST, *extra]) == 0


def events(out: Path) -> EventAccumulator:
    """Every scalar and image of the run's TensorBoard folder (nothing sampled away)."""
    acc = EventAccumulator(
        str(out / "logs" / "tensorboard"), size_guidance={"scalars": 0, "images": 0}
    )
    return acc.Reload()


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def f32(value: float) -> float:
    """What a TensorBoard scalar (float32) holds for ``value``."""
    return float(np.float32(value))


def check_scalars(acc: EventAccumulator, lines: list[dict], lr: float) -> None:
    """Every loss term, the total, success and lr: one event per metrics.jsonl line, at
    step = its iteration, with its value."""
    tags = acc.Tags()["scalars"]
    for name in (*term_names(), "total", "success"):
        tag = "train/success" if name == "success" else f"loss/{name}"
        expected = [(r["iteration"], f32(r[name])) for r in lines if r[name] is not None]
        if not expected:  # a term switched off (tv: weight 0) is not logged at all
            assert tag not in tags
            continue
        assert [(e.step, e.value) for e in acc.Scalars(tag)] == expected, tag
    assert [(e.step, e.value) for e in acc.Scalars("train/lr")] == [
        (r["iteration"], f32(lr)) for r in lines
    ]


def png(event) -> np.ndarray:
    with Image.open(io.BytesIO(event.encoded_image_string)) as im:
        return np.asarray(im.convert("RGB"))


def test_tensorboard_holds_metrics_jsonl_and_the_images(tmp_path):
    out = tmp_path / "run"
    train(out, "--log", "tensorboard")
    acc = events(out)
    lines = records(out)
    assert [r["iteration"] for r in lines] == list(range(6))
    cfg = json.loads((out / "config.json").read_text())
    check_scalars(acc, lines, cfg["train"]["lr"])
    assert "loss/classifier" in acc.Tags()["scalars"] and "loss/l2" in acc.Tags()["scalars"]
    # the final evaluation, at the last iteration
    summary = json.loads((out / "summary.json").read_text())
    for key in ("clean_accuracy", "success_rate", "control_success_rate"):
        assert [(e.step, e.value) for e in acc.Scalars(f"eval/{key}")] == [(5, f32(summary[key]))]
    # images every 2 iterations (after iterations 2, 4, 6: steps 1, 3, 5), one per step
    side, size = cfg["patch"]["size"], cfg["data"]["image_size"]
    patch, heat = acc.Images("images/patch"), acc.Images("images/attention")
    assert [e.step for e in patch] == [e.step for e in heat] == [1, 3, 5]
    assert {(e.width, e.height) for e in patch} == {(side, side)}
    assert {(e.width, e.height) for e in heat} == {(size, size)}
    # the last patch image is the saved patch, rounded to 8 bits
    final = AdversarialPatch.load(out / "patch.safetensors").pixels.detach()[0]
    expected = (final.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    assert np.array_equal(png(patch[-1]), expected)
    assert not np.array_equal(png(patch[0]), expected)  # the patch moved between them
    assert png(heat[-1]).std() > 0


def test_a_resumed_run_continues_the_steps_without_duplicates(tmp_path, monkeypatch):
    out = tmp_path / "run"
    import attnpatch.training.run as run

    build = run.build_trainer

    def crashing(*args, **kwargs):
        trainer, held = build(*args, **kwargs)

        def crash(t, outputs, stepped):
            if t.iteration == 5:  # after the checkpoint at 3, iteration 3 logged, 4 not
                raise RuntimeError("crash")

        trainer.hooks["iteration"].insert(0, crash)
        return trainer, held

    with monkeypatch.context() as m:
        m.setattr(run, "build_trainer", crashing)
        with pytest.raises(RuntimeError, match="crash"):
            main(["train", "--train.out_dir", str(out), *FAST, "--log", "tensorboard"])
    crashed = events(out)  # closed by the crash: readable
    assert [e.step for e in crashed.Scalars("loss/total")] == [0, 1, 2, 3]
    train(out, "--log", "tensorboard", "--resume")
    assert len(list((out / "logs" / "tensorboard").glob("events.out.tfevents.*"))) == 2
    acc = events(out)
    lines = records(out)
    assert [r["iteration"] for r in lines] == list(range(6))  # metrics.jsonl redid 3 too
    check_scalars(acc, lines, 0.03)  # iteration 3 once, with the resumed session's value
    assert [e.step for e in acc.Images("images/patch")] == [1, 3, 5]
    assert [e.step for e in acc.Scalars("eval/success_rate")] == [5]


def test_wandb_offline_writes_its_run_folder(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        (tmp_path / var).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged = []
    real_log = wandb.sdk.wandb_run.Run.log

    def spy(self, data, step=None, *args, **kwargs):
        logged.append((step, dict(data)))
        return real_log(self, data, step, *args, **kwargs)

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", spy)
    out = tmp_path / "run"
    train(out, "--log", "wandb")
    (folder,) = (out / "logs" / "wandb").glob("offline-run-*")
    assert len(list(folder.glob("run-*.wandb"))) == 1
    lines = records(out)
    scalars = [(s, d) for s, d in logged if "loss/total" in d]
    assert [s for s, _ in scalars] == [r["iteration"] for r in lines]
    for (_, d), r in zip(scalars, lines):
        assert d["loss/classifier"] == r["classifier"] and d["train/success"] == r["success"]
        assert d["train/lr"] == 0.03
    steps = [s for s, _ in logged]
    assert steps == sorted(steps)  # W&B drops a step lower than one already logged
    media = sorted(p.name.split("_")[1] for p in folder.glob("files/media/images/**/patch_*.png"))
    assert media == ["1", "3", "5"]


def test_a_wandb_run_that_cannot_start_says_how_to_log_in(tmp_path, monkeypatch, capsys):
    wandb = pytest.importorskip("wandb")
    from accelerate.tracking import WandBTracker

    def no_key(self):
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(WandBTracker, "start", no_key)
    out = tmp_path / "run"
    assert main(["train", "--train.out_dir", str(out), *FAST, "--log", "wandb"]) == 2
    err = capsys.readouterr().err
    assert "wandb login" in err and "WANDB_MODE=offline" in err
    assert not (out / "metrics.jsonl").exists()  # no iteration ran


@pytest.mark.parametrize("kind, module", [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_a_missing_logger_is_named_before_anything_is_built(
    kind, module, tmp_path, monkeypatch, capsys
):
    import attnpatch.training.run as run

    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails

    def never(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(run, "load_diffusion", never)
    monkeypatch.setattr(run, "load_classifier", never)
    out = tmp_path / "run"
    assert main(["train", "--train.out_dir", str(out), *FAST, "--log", kind]) == 2
    err = capsys.readouterr().err
    assert f"pip install 'attnpatch[{kind}]'" in err and module in err
    assert not out.exists()


def _launch():
    """test_distributed's launcher (real processes, the way torchrun starts them)."""
    spec = importlib.util.spec_from_file_location(
        "_distributed_launch", Path(__file__).with_name("test_distributed.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.launch


def test_data_parallel_logs_from_process_0_the_global_means(tmp_path):
    out = tmp_path / "two"
    flags = ["--log", "tensorboard", "--train.log_images_every", "0"]
    # attention losses off: the heat map comes from an extra pass of the pipeline
    flags += ["--weights.cross_attention", "0", "--weights.self_attention", "0"]
    _launch()(2, out, 1, 2, *flags)
    (only,) = (out / "logs" / "tensorboard").glob("events.out.tfevents.*")  # process 0 alone
    acc = events(out)
    lines = records(out)
    assert [r["iteration"] for r in lines] == list(range(2))
    check_scalars(acc, lines, 2.0)  # the global means metrics.jsonl holds (test_distributed)
    assert "loss/cross_attention" not in acc.Tags()["scalars"]
    (heat,) = acc.Images("images/attention")  # log_images_every 0: at the end only
    assert heat.step == 1 and png(heat).std() > 0
