"""Data-parallel training: real `attnpatch train` processes on the gloo backend, launched the
way torchrun launches them (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnpatch import AdversarialPatch
from attnpatch.training import load_config
from attnpatch.training.run import build_patch

pytestmark = pytest.mark.slow  # real `attnpatch train` processes

K = 2
ARGS = [
    "train",
    "--quiet",
    "--train.accumulate",
    str(K),
    "--train.checkpoint_every",
    "0",
    "--train.seed",
    "3",
    "--data.synthetic_per_class",
    "4",
    "--data.synthetic_eval_per_class",
    "3",
    "--eval.eot_samples",
    "2",
    "--eval.examples",
    "1",
    # SGD, not Adam: Adam's step is invariant to the gradient's scale, so a wrong division
    # (a sum instead of a mean) would go unseen
    "--train.optimizer",
    "sgd",
    "--train.lr",
    "2.0",
]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    world: int, out: Path, batch: int, iterations: int, *extra: str, code: int = 0
) -> list[str]:
    """Run `attnpatch train` as ``world`` processes (each must exit with ``code``); returns
    their stderr."""
    port = _port()
    cmd = [sys.executable, "-m", "attnpatch", *ARGS, "--train.out_dir", str(out)]
    cmd += ["--data.batch_size", str(batch), "--train.iterations", str(iterations), *extra]
    procs = []
    for rank in range(world):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        env.pop("PYTEST_XDIST_WORKER", None)
        if world > 1:
            env.update(
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(world),
                LOCAL_WORLD_SIZE=str(world),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
            )
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    errs = []
    for p in procs:
        _, err = p.communicate(timeout=300)
        errs.append(err.decode())
        assert p.returncode == code, err.decode()[-3000:]
    return errs


def result(run: Path) -> tuple[torch.Tensor, list[dict], dict]:
    pixels = AdversarialPatch.load(run / "patch.safetensors").pixels.detach()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return pixels, records, json.loads((run / "summary.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process with batch 2, two with batch 1: the same global batch, 6 iterations."""
    root = tmp_path_factory.mktemp("dist")
    launch(1, root / "one", 2, 6)
    launch(2, root / "two", 1, 6)
    return root


def test_two_processes_train_the_single_process_patch(runs):
    p1, m1, s1 = result(runs / "one")
    p2, m2, s2 = result(runs / "two")
    assert float((p1 - p2).abs().max()) <= 1e-5  # the gradient was averaged, once, right
    cfg = load_config(None, {"train.seed": 3, "data.batch_size": 2})
    moved = float((p1 - build_patch(cfg, torch.device("cpu")).pixels).abs().max())
    assert moved > 1e-3  # far above the tolerance: half or twice the step would show
    # process 0 alone wrote: one line per iteration, the losses as global means
    assert [r["iteration"] for r in m2] == list(range(6))
    for a, b in zip(m1, m2):
        assert a["step"] == b["step"] and a["counter"] == b["counter"]
        assert a["classifier"] == pytest.approx(b["classifier"], rel=1e-4, abs=1e-6)
        assert a["success"] == pytest.approx(b["success"])
    # the gathered evaluation equals the single-process one
    for key in ("clean_accuracy", "success_rate", "control_success_rate", "eligible"):
        assert s1[key] == s2[key], key
    # the patch gradient was reduced exactly once per optimizer step
    assert s2["optimizer_steps"] == 6 // K == s2["gradient_reductions"]
    assert s2["processes"] == 2 and "gradient_reductions" not in s1
    assert not list((runs / "two").glob("**/*.tmp"))


def test_two_process_resume_is_bit_exact(runs, tmp_path):
    out = tmp_path / "resumed"
    launch(2, out, 1, 3)  # stops mid-accumulation (counter 1): two unreduced gradients saved
    state = torch.load(out / "checkpoints" / "it-000003" / "state.pt", weights_only=False)
    assert state["counter"] == 1 and state["world"] == 2 and len(state["grads"]) == 2
    assert not torch.equal(state["grads"][0], state["grads"][1])
    # one process cannot take over two processes' unreduced gradients: a clear refusal
    other = tmp_path / "one-process"
    shutil.copytree(out, other)
    (err,) = launch(1, other, 1, 6, "--resume", code=2)
    assert "written by 2 process(es) in the middle of an accumulation" in err
    launch(2, out, 1, 6, "--resume")
    p, m, _ = result(out)
    p_ref, m_ref, _ = result(runs / "two")
    assert torch.equal(p, p_ref)
    assert m == m_ref
