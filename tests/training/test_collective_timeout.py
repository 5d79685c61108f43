"""A data-parallel run where one process stops (not dies): the others fail after
``train.collective_timeout_minutes``, naming it, instead of waiting forever. Real gloo
processes, launched as torchrun launches them; the timeout is made short."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

#: Runs `attnpatch train` with rank STALL_RANK asleep from iteration 2 on (a hung disk, say).
SCRIPT = """
import sys, time
from attnpatch.training import trainer
real = trainer.PatchTrainer.forward
def forward(self, *args, **kwargs):
    if self.iteration == 2 and self.dist.rank == int(sys.argv[1]):
        time.sleep(600)
    return real(self, *args, **kwargs)
trainer.PatchTrainer.forward = forward
from attnpatch.cli import main
sys.exit(main(sys.argv[2:]))
"""

ARGS = [
    "train", "--quiet",
    "--train.iterations", "8",
    "--train.accumulate", "2",
    "--train.checkpoint_every", "0",
    "--data.synthetic_per_class", "2",
    "--data.synthetic_eval_per_class", "1",
    "--eval.eot_samples", "1",
    "--eval.examples", "1",
    "--train.collective_timeout_minutes", "0.25",  # 15 s: above the processes' start-up skew
]  # fmt: skip


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_stalled_process_is_named_and_the_others_end(tmp_path):
    port, world, stalled = _port(), 2, 1
    procs = []
    for rank in range(world):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        env.pop("PYTEST_XDIST_WORKER", None)
        env.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        cmd = [sys.executable, "-c", SCRIPT, str(stalled), *ARGS]
        cmd += ["--train.out_dir", str(tmp_path / "run")]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    try:
        _, err = procs[0].communicate(timeout=240)  # was: waited forever, printing nothing
    finally:
        procs[stalled].kill()  # what the launcher does once a process has failed
        procs[stalled].communicate()
    err = err.decode()
    assert procs[0].returncode == 2, err[-3000:]
    lines = [x for x in err.splitlines() if x.startswith("attnpatch: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    line = lines[0]
    assert "process 0:" in line and "process(es) 1 of 2 stopped responding" in line
    assert "collective_timeout_minutes" in line and "--resume" in line


def test_the_timeout_reaches_the_process_group(monkeypatch):
    """``from_environment`` hands the configured timeout to accelerate's process group."""
    import datetime

    import accelerate

    from attnpatch.training import distributed

    seen = {}

    class FakeAccelerator:
        process_index, num_processes = 0, 2

        def __init__(self, cpu, kwargs_handlers):
            seen["kwargs"] = [h.to_kwargs() for h in kwargs_handlers]

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(accelerate, "Accelerator", FakeAccelerator)
    monkeypatch.setattr("torch.distributed.new_group", lambda **kw: seen.setdefault("group", kw))
    dist = distributed.from_environment("cpu", 2.5)
    assert seen["kwargs"] == [{"timeout": datetime.timedelta(minutes=2.5)}]
    assert seen["group"]["backend"] == "gloo" and dist.timeout.total_seconds() == 150
