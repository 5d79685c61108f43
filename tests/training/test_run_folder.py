"""The run folder is the tool's only where the tool made it; one run at a time; nothing left
behind by a refused run; files that follow the umask (docs/training.md, "Bad inputs")."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from attnpatch.cli import main
from attnpatch.errors import ConfigError, RunFolderError

MARKER = ".attnpatch-run"  # attnpatch.training.run_folder.MARKER (a test pins the name)

FAST = [
    "--train.iterations", "2",
    "--train.accumulate", "1",
    "--train.checkpoint_every", "1",
    "--data.synthetic_per_class", "2",
    "--data.synthetic_eval_per_class", "1",
    "--eval.eot_samples", "1",
    "--eval.examples", "1",
    "--quiet",
]  # fmt: skip


def fails(capsys, argv: list[str], *words: str) -> str:
    """Run the CLI; assert exit 2, one error line holding every word, no traceback."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("attnpatch: error: ")]
    assert len(errors) == 1, err
    assert all(w.lower() in errors[0].lower() for w in words), err
    assert "Traceback" not in err
    return errors[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# -- ownership ----------------------------------------------------------------------------------
@pytest.mark.parametrize("flags", [[], ["--overwrite"], ["--resume"]])
def test_a_folder_the_tool_did_not_make_is_never_emptied(tmp_path, capsys, flags):
    # was: a fresh run deleted logs/ and replaced metrics.jsonl (no checkpoints/latest there)
    out = tmp_path / "mine"
    (out / "logs").mkdir(parents=True)
    (out / "logs" / "events.txt").write_text("a week of someone's logs")
    (out / "metrics.jsonl").write_text('{"not": "attnpatch"}\n')
    before = snapshot(out)
    fails(capsys, ["train", "--train.out_dir", str(out), *FAST, *flags], "did not write", "logs/")
    assert snapshot(out) == before and not (out / MARKER).exists()


def test_the_current_folder(tmp_path, capsys, monkeypatch):
    # `--train.out_dir ""` was the current folder: its logs/ was deleted
    monkeypatch.chdir(tmp_path)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "keep.txt").write_text("x")
    fails(capsys, ["train", "--train.out_dir", "", *FAST], "train.out_dir", "empty")
    fails(capsys, ["train", "--train.out_dir", ".", *FAST], "did not write", "logs/")
    assert (tmp_path / "logs" / "keep.txt").read_text() == "x"


def test_other_files_in_a_new_folder_are_kept_and_overwrite_deletes_only_outputs(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")  # no output name: the run may share the folder
    assert main(["train", "--train.out_dir", str(out), *FAST]) == 0
    assert (out / MARKER).is_file() and (out / "summary.json").is_file()
    (out / "checkpoints" / "it-000002" / "patch.safetensors").unlink()  # damaged, say
    assert main(["train", "--train.out_dir", str(out), *FAST, "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "my notes"  # not an output: never touched
    assert (out / "checkpoints" / "it-000002" / "patch.safetensors").is_file()


def test_an_earlier_run_without_a_checkpoint_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--train.out_dir", str(out), *FAST]) == 0
    import shutil

    shutil.rmtree(out / "checkpoints")  # e.g. killed before its first checkpoint
    before = snapshot(out)
    fails(capsys, ["train", "--train.out_dir", str(out), *FAST], "no checkpoint", "--overwrite")
    assert snapshot(out) == before
    assert main(["train", "--train.out_dir", str(out), *FAST, "--overwrite"]) == 0


def test_the_same_command_twice_shows_the_finished_run_and_trains_nothing(tmp_path, capsys):
    # was: the README's main job run a second time (or `.ci/run` after it) was refused
    out = tmp_path / "run"
    argv = ["train", "--train.out_dir", str(out), *FAST]
    assert main(argv) == 0
    capsys.readouterr()
    trained = {k: v for k, v in snapshot(out).items() if k != "summary.json"}
    assert main(argv) == 0
    err_out = capsys.readouterr()
    assert "already holds this run, finished" in err_out.out + err_out.err
    assert snapshot(out).keys() >= trained.keys()
    for name in ("metrics.jsonl", "config.json"):
        assert (out / name).read_bytes() == trained[name], name  # nothing trained again
    # the patch file is written again: the same tensors and metadata (safetensors orders the
    # metadata keys as it likes, so the bytes may differ)
    from safetensors import safe_open
    from safetensors.torch import load

    with safe_open(str(out / "patch.safetensors"), "pt") as f:
        meta = f.metadata()
    again = load((out / "patch.safetensors").read_bytes())
    first = load(trained["patch.safetensors"])
    assert again.keys() == first.keys()
    assert all(torch.equal(again[k], first[k]) for k in first)
    assert meta["extra"] and json.loads(meta["extra"])["config"]
    # a different config (another rate; more iterations: extending a run is --resume's job)
    # is still refused
    fails(capsys, [*argv, "--train.lr", "0.1"], "already holds a run", "--overwrite")
    fails(capsys, ["train", "--train.out_dir", str(out), *FAST, "--train.iterations", "3"],
          "already holds a run")  # fmt: skip


def test_a_refused_run_leaves_no_marker_or_folder(tmp_path, capsys):
    out = tmp_path / "a" / "b"
    fails(capsys, ["train", "--train.out_dir", str(out), *FAST, "--models.classifier", "nosuch"])
    assert not (tmp_path / "a").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    fails(capsys, ["train", "--train.out_dir", str(existing), *FAST, "--data.train", "/no/x"])
    assert list(existing.iterdir()) == []  # the marker it made is gone again


def test_outputs_are_the_names_the_run_writes(tmp_path):
    from attnpatch.training.run_folder import MARKER as marker
    from attnpatch.training.run_folder import OUTPUTS

    assert marker == MARKER
    out = tmp_path / "run"
    assert main(["train", "--train.out_dir", str(out), *FAST]) == 0
    written = {p.name for p in out.iterdir()} - {MARKER}
    assert written == set(OUTPUTS) - {"logs"}  # logs/ only with --log


# -- the lock -----------------------------------------------------------------------------------
def _start_long_run(out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "attnpatch", "train", "--train.out_dir", str(out), *FAST]
    cmd += ["--train.iterations", "100000", "--train.checkpoint_every", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:  # until it holds the lock and has begun
        if (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text():
            return proc
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("the first run did not start")


def test_a_second_run_is_refused_at_once_and_a_killed_run_leaves_no_lock(
    tmp_path, capsys, monkeypatch
):
    # was: both runs exited 0, their metrics interleaved, the first's checkpoints unlinked
    out = tmp_path / "run"
    first = _start_long_run(out)
    try:
        import attnpatch.training.run as run_module

        def never(*a, **k):
            raise AssertionError("the models were built before the refusal")

        monkeypatch.setattr(run_module, "build_trainer", never)
        for flags in ([], ["--overwrite"], ["--resume"]):
            line = fails(capsys, ["train", "--train.out_dir", str(out), *FAST, *flags], "in use")
            assert f"process {first.pid}" in line
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGKILL)  # a crash: no chance to clean up
        first.wait()
    monkeypatch.undo()
    assert (out / MARKER).is_file()  # the marker stays; its lock died with the process
    assert main(["train", "--train.out_dir", str(out), *FAST, "--overwrite"]) == 0


def test_the_lock_is_released_when_the_block_ends(tmp_path, raises):
    from attnpatch.training.run_folder import RunFolder

    out = tmp_path / "run"
    with RunFolder(out) as folder:
        folder.started()
        with raises(RunFolderError, "in use", f"process {os.getpid()}"), RunFolder(out):
            pass
    with RunFolder(out, overwrite=True):
        pass


# -- paths --------------------------------------------------------------------------------------
def test_symlink_loops_and_broken_links_are_refused_before_the_models(tmp_path, capsys):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    fails(capsys, ["train", "--train.out_dir", str(loop / "run"), *FAST], "symlink loop")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "gone")
    fails(capsys, ["train", "--train.out_dir", str(dangling), *FAST], "points nowhere")


def test_tilde_in_out_dir_is_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)  # a literal "~" folder would land here, not in the repo
    assert main(["train", "--train.out_dir", "~/run", *FAST]) == 0
    assert (tmp_path / "home" / "run" / "summary.json").is_file()
    assert not (tmp_path / "~").exists()


def test_outputs_follow_the_umask(tmp_path):
    # was: mode 0600 (mkstemp's), unreadable by the other users of a shared machine
    old = os.umask(0o022)
    try:
        assert main(["train", "--train.out_dir", str(tmp_path / "run"), *FAST]) == 0
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in files}
    assert set(modes.values()) == {"0o644"}, modes


# -- config edges on the command line ------------------------------------------------------------
def test_several_configs_and_unknown_devices(tmp_path, capsys):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("train:\n  lr: 0.1\n")
    b.write_text("train:\n  iterations: 3\n")
    for verb in ("train", "doctor"):
        fails(capsys, [verb, "--config", str(a), "--config", str(b)], "--config", "2 times")
    fails(capsys, ["train", "--models.device", "gpu", *FAST], "models.device", "'gpu'")
    fails(capsys, ["train", "--config", str(tmp_path)], "is a folder")
    line = fails(capsys, ["train", "--train.threads", "1e11", *FAST], "train.threads")
    assert "1024" in line


def test_accumulate_past_the_iterations_is_refused_up_front(tmp_path, capsys):
    # was: no optimizer step, and an "attack success" for the random initial patch
    out = tmp_path / "run"
    argv = ["train", "--train.out_dir", str(out), *FAST, "--train.accumulate", "3"]
    fails(capsys, argv, "train.accumulate", "train.iterations", "no optimizer step")
    assert not out.exists()


def test_a_run_that_took_no_step_says_so(tmp_path, monkeypatch, raises):
    from attnpatch.training import TrainConfig, load_config, run_training

    cfg = load_config(None, {"train.out_dir": str(tmp_path / "run"), "train.progress": False})
    cfg.train.iterations, cfg.train.accumulate = 2, 3  # past validation, as code may do
    cfg.data.synthetic_per_class, cfg.data.synthetic_eval_per_class = 2, 1
    monkeypatch.setattr(TrainConfig, "validate", lambda self: self)
    with raises(ConfigError, "without an optimizer step", "no attack success"):
        run_training(cfg, log=lambda *a: None)
    assert not (tmp_path / "run" / "summary.json").exists()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["accumulate"] == 3
