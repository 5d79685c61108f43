"""Signals, full disks and read-only folders mid-run, and what a resume checks: the data it
trained on, the metrics it wrote, the process count (docs/training.md, "Bad inputs")."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from attnpatch import viz
from attnpatch.cli import main
from attnpatch.data import ShapesConfig, shapes_dataset, write_image_folder
from attnpatch.training import checkpoint as checkpoint_module
from attnpatch.training import metrics_log

FAST = [
    "--train.iterations", "4",
    "--train.accumulate", "1",
    "--train.checkpoint_every", "1",
    "--data.synthetic_per_class", "2",
    "--data.synthetic_eval_per_class", "1",
    "--eval.eot_samples", "1",
    "--eval.examples", "1",
    "--quiet",
]  # fmt: skip


def fails(capsys, argv: list[str], *words: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("attnpatch: error: ")]
    assert len(errors) == 1 and all(w.lower() in errors[0].lower() for w in words), err
    assert "Traceback" not in err
    return errors[0]


def _fail_on_call(n: int, error: int, real):
    """A stand-in for ``real`` whose ``n``-th call raises OSError(``error``)."""
    calls = []

    def fake(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise OSError(error, os.strerror(error), str(args[-1]) if args else None)
        return real(*args, **kwargs)

    return fake


# -- full disks and read-only folders -----------------------------------------------------------
def test_a_full_disk_at_a_checkpoint_keeps_the_last_good_one(tmp_path, capsys, monkeypatch):
    # was: a traceback, and a .tmp checkpoint folder left behind
    out = tmp_path / "run"
    monkeypatch.setattr(torch, "save", _fail_on_call(3, errno.ENOSPC, torch.save))
    line = fails(capsys, ["train", "--train.out_dir", str(out), *FAST], "No space left")
    assert "it-000002" in line and "--resume" in line  # what was saved, how to go on
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["it-000002", "latest"]  # no .tmp
    assert (ckpts / "latest").read_text() == "it-000002"
    monkeypatch.undo()  # space freed
    assert main(["train", "--train.out_dir", str(out), *FAST, "--resume"]) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["iteration"] for x in lines] == [0, 1, 2, 3]


def test_a_read_only_folder_mid_run(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(metrics_log, "open", _fail_on_call(2, errno.EROFS, open), raising=False)
    line = fails(capsys, ["train", "--train.out_dir", str(out), *FAST], "read-only")
    assert "it-000001" in line and "--resume" in line


def test_a_failing_figure_keeps_summary_json(tmp_path, capsys, monkeypatch):
    # was: a traceback after training, and no summary.json
    out = tmp_path / "run"
    monkeypatch.setattr(viz, "save", _fail_on_call(2, errno.ENOSPC, viz.save))
    fails(capsys, ["train", "--train.out_dir", str(out), *FAST], "summary.json", "figure")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["optimizer_steps"] == 4 and "success_rate" in summary
    assert (out / "patch.safetensors").is_file()


def test_stale_tmp_checkpoints_of_a_killed_run_are_cleaned(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--train.out_dir", str(out), *FAST, "--train.iterations", "2"]) == 0
    stale = out / "checkpoints" / ".it-000077.tmp"  # as a SIGKILL mid-write leaves it
    stale.mkdir()
    (stale / "state.pt").write_bytes(b"half")
    assert main(["train", "--train.out_dir", str(out), *FAST, "--resume"]) == 0
    assert not list((out / "checkpoints").glob(".*"))


def test_write_checkpoint_failure_removes_its_temporary_folder(tmp_path, monkeypatch):
    from attnpatch import AdversarialPatch

    root = tmp_path / "checkpoints"
    patch = AdversarialPatch(4)
    state = {"iteration": 1}
    checkpoint_module.write_checkpoint(root, patch, state, {})
    monkeypatch.setattr(torch, "save", _fail_on_call(1, errno.ENOSPC, torch.save))
    with pytest.raises(OSError):
        checkpoint_module.write_checkpoint(root, patch, {"iteration": 2}, {})
    assert sorted(p.name for p in root.iterdir()) == ["it-000001", "latest"]
    with pytest.raises(OSError):  # rewriting the very checkpoint `latest` names
        monkeypatch.setattr(torch, "save", _fail_on_call(1, errno.ENOSPC, torch.save))
        checkpoint_module.write_checkpoint(root, patch, state, {})
    assert sorted(p.name for p in root.iterdir()) == ["it-000001", "latest"]
    assert (root / "it-000001" / "state.pt").is_file()


# -- SIGTERM ------------------------------------------------------------------------------------
def test_sigterm_checkpoints_the_iteration_like_ctrl_c(tmp_path):
    # was: no checkpoint of the current iteration and no message (what SLURM / k8s send)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "attnpatch", "train", "--train.out_dir", str(out), *FAST]
    cmd += ["--train.iterations", "100000", "--train.checkpoint_every", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    err = err.decode()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "--resume" in err and "stopped after iteration" in err
    done = len(metrics.read_text().splitlines())
    assert (out / "checkpoints" / "latest").read_text() == f"it-{done:06d}"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # this process: untouched


def test_ctrl_c_handler_also_catches_sigterm_and_restores_both():
    from attnpatch.training.interrupt import CtrlC

    outside = []  # a SIGTERM that reaches this handler was not caught by the block
    old = signal.signal(signal.SIGTERM, lambda *a: outside.append(1))
    try:
        before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
        with CtrlC() as c:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
        assert not outside and c.pressed and c.signum == signal.SIGTERM
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    finally:
        signal.signal(signal.SIGTERM, old)


# -- what a resume checks -----------------------------------------------------------------------
@pytest.fixture
def folder_run(tmp_path):
    """A finished run on an image folder (checkpoint at iteration 4), and its folders."""
    data = write_image_folder(
        shapes_dataset(ShapesConfig(train_per_class=2, seed=3)), tmp_path / "data"
    )
    out = tmp_path / "run"
    argv = ["train", "--train.out_dir", str(out), *FAST, "--data.train", str(data)]
    assert main(argv) == 0
    return argv, data, out


def test_resume_refuses_changed_training_data(folder_run, capsys):
    # was: a resumed run whose files were removed or added continued silently
    argv, data, out = folder_run
    victim = sorted((data / "circle").iterdir())[0]
    saved = victim.read_bytes()
    victim.unlink()
    before = (out / "config.json").read_bytes()
    line = fails(capsys, [*argv, "--resume", "--train.iterations", "5"], "training data changed")
    assert "10 images then, 9 now" in line and "circle: 2 -> 1" in line
    assert (out / "config.json").read_bytes() == before
    victim.write_bytes(saved)
    (data / "circle" / "extra.png").write_bytes(saved)  # one added
    fails(capsys, [*argv, "--resume", "--train.iterations", "5"], "circle: 2 -> 3")
    (data / "circle" / "extra.png").unlink()
    assert main([*argv, "--resume", "--train.iterations", "5"]) == 0  # the same data again


def test_resume_without_metrics_says_so(folder_run, capsys):
    argv, _, out = folder_run
    (out / "metrics.jsonl").unlink()
    assert main([*argv, "--resume", "--train.iterations", "5"]) == 0
    printed = capsys.readouterr().out
    assert "metrics.jsonl is missing" in printed and "iterations 0-3" in printed
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["iteration"] for x in lines] == [4]


def test_resume_on_another_process_count_at_a_step_says_so(folder_run, capsys):
    # a checkpoint written by 2 processes at an optimizer step (counter 0), resumed on 1
    argv, _, out = folder_run
    state_file = out / "checkpoints" / "it-000004" / "state.pt"
    state = torch.load(state_file, weights_only=False)
    assert state["counter"] == 0
    state["world"], state["grads"] = 2, None
    torch.save(state, state_file)
    assert main([*argv, "--resume", "--train.iterations", "5"]) == 0
    printed = capsys.readouterr().out
    assert "written by 2 process(es) and resumes on 1" in printed
    assert "global batch is now 1 x data.batch_size = 1 images (was 2)" in printed


def test_fingerprints_see_files_and_pixels(tmp_path):
    from attnpatch.data import ImageFolder, TensorImageDataset, describe_change, fingerprint

    ds = shapes_dataset(ShapesConfig(train_per_class=1))
    fp = fingerprint(ds)
    other = TensorImageDataset(ds.images.flip(-1), ds.labels, ds.classes)
    assert "renamed or replaced" in describe_change(fp, fingerprint(other))
    root = write_image_folder(ds, tmp_path / "f")
    a = fingerprint(ImageFolder(root, 32))
    shutil.move(root / "star", tmp_path / "star")
    (root / "star").mkdir()
    shutil.copy(next((root / "circle").iterdir()), root / "star" / "x.png")
    assert "renamed or replaced" in describe_change(a, fingerprint(ImageFolder(root, 32)))
    assert describe_change(a, a) is None
    assert Path(root).is_dir()
