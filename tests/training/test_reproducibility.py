"""Real `attnpatch train` processes: one config gives one run; a run killed (SIGKILL) or
interrupted (SIGINT) after a checkpoint and resumed ends exactly as an uninterrupted one."""

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

from attnpatch import AdversarialPatch

pytestmark = pytest.mark.slow  # real `attnpatch train` processes

ITERATIONS = 15
ARGS = [
    "train",
    "--quiet",
    "--train.iterations",
    str(ITERATIONS),
    "--train.accumulate",
    "2",
    "--train.checkpoint_every",
    "3",
    "--train.seed",
    "5",
    "--data.synthetic_per_class",
    "4",
    "--data.synthetic_eval_per_class",
    "2",
    "--eval.eot_samples",
    "1",
    "--eval.examples",
    "2",
]


def _env(threads: int = 1) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONHASHSEED="0")
    env.pop("PYTEST_XDIST_WORKER", None)
    return env


def start(out: Path, *extra: str, threads: int = 1) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "attnpatch", *ARGS, "--train.out_dir", str(out), *extra]
    env = _env(threads)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen, code: int = 0) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err.decode()[-2000:]
    return err.decode()


def outcome(run: Path) -> tuple[torch.Tensor, list[dict], dict]:
    """(patch pixels, metric records, summary without its wall-clock times)."""
    pixels = AdversarialPatch.load(run / "patch.safetensors").pixels.detach()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    summary.pop("seconds"), summary.pop("train_seconds")  # wall clock
    return pixels, records, summary


def assert_same_run(a: Path, b: Path) -> None:
    pa, ra, sa = outcome(a)
    pb, rb, sb = outcome(b)
    assert torch.equal(pa, pb)  # bit-identical patches
    assert [r["iteration"] for r in rb] == list(range(ITERATIONS))  # no duplicates, no gaps
    # the environment's git state may change between two runs (a commit meanwhile): the rest
    # of it (package versions, CPU) must agree, and every number
    for s in (sa, sb):
        for key in ("git_commit", "git_dirty"):
            s.get("environment", {}).pop(key, None)
    assert ra == rb and sa == sb


def stop_after_first_checkpoint(proc: subprocess.Popen, run: Path, sig: int) -> None:
    latest = run / "checkpoints" / "latest"
    deadline = time.monotonic() + 240
    while not latest.is_file():
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.01)
    proc.send_signal(sig)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("reference") / "run"
    finish(start(run))
    return run


def test_one_config_gives_one_run(reference, tmp_path):
    # another process, with another OMP_NUM_THREADS (train.threads fixes the count: 1)
    finish(start(tmp_path / "again", threads=2))
    assert_same_run(reference, tmp_path / "again")
    # the draws do depend on the seed (the test could fail)
    finish(start(tmp_path / "other", "--train.seed", "6", "--train.iterations", "2"))
    assert not torch.equal(outcome(reference)[0], outcome(tmp_path / "other")[0])


def test_sigkill_after_a_checkpoint_then_resume(reference, tmp_path):
    run = tmp_path / "killed"
    proc = start(run)
    stop_after_first_checkpoint(proc, run, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "summary.json").exists()  # killed mid-run
    finish(start(run, "--resume"))
    assert_same_run(reference, run)


def test_sigint_checkpoints_the_last_iteration_then_resume(reference, tmp_path):
    run = tmp_path / "interrupted"
    proc = start(run)
    stop_after_first_checkpoint(proc, run, signal.SIGINT)
    err = finish(proc, code=130)
    assert "--resume continues the run" in err and "Traceback" not in err
    assert not (run / "summary.json").exists()
    done = len((run / "metrics.jsonl").read_text().splitlines())
    assert (run / "checkpoints" / "latest").read_text() == f"it-{done:06d}"  # the last one
    assert 3 <= done < ITERATIONS
    finish(start(run, "--resume"))
    assert_same_run(reference, run)


def test_tiny_classifier_bytes_do_not_depend_on_threads(tmp_path):
    code = (
        "import hashlib, sys;"
        "from attnpatch.data import ShapesConfig;"
        "from attnpatch.models.shapes_classifier import train_tiny_classifier;"
        "m, _ = train_tiny_classifier(ShapesConfig(train_per_class=30, heldout_per_class=2), 0,"
        " epochs=3);"
        "sys.stdout.write(hashlib.sha256(b''.join(v.numpy().tobytes()"
        " for v in m.state_dict().values())).hexdigest())"
    )
    digests = []
    for threads in (1, 2):
        done = subprocess.run(
            [sys.executable, "-c", code], env=_env(threads), capture_output=True, timeout=300
        )
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        digests.append(done.stdout.decode())
    assert len(digests[0]) == 64 and digests[0] == digests[1]
