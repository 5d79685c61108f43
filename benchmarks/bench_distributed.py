"""Data-parallel throughput: images per second of `attnpatch train` with N processes.

Each case launches N real processes the way torchrun does (RANK, WORLD_SIZE, MASTER_ADDR/PORT;
gloo on CPU, NCCL on GPUs), with per-process batch ``--batch`` (global batch ``N x batch``),
and reads ``train_seconds`` (the training loop alone, models already loaded) from the run's
summary.json: throughput = iterations x global batch / train_seconds.

    python benchmarks/bench_distributed.py --processes 1 2                 # the embedded default, CPU
    python benchmarks/bench_distributed.py --processes 1 2 4 8 --config sd.yaml   # a GPU machine

On a CPU each process runs ``--threads`` torch threads (default 1): N processes on N cores.
Results: docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
from pathlib import Path


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(n: int, args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, "-m", "attnpatch", "train", "--quiet", "--train.out_dir", str(out)]
    cmd += ["--data.batch_size", str(args.batch), "--train.iterations", str(args.iterations)]
    cmd += ["--train.threads", str(args.threads), "--train.checkpoint_every", "0"]
    cmd += ["--data.synthetic_per_class", str(args.per_class)]
    if args.config:
        cmd += ["--config", args.config]
    port, procs = _port(), []
    for rank in range(n):
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        if n > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(n),
                       LOCAL_WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        )
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise SystemExit(err.decode()[-3000:])
    summary = json.loads((out / "summary.json").read_text())
    images = args.iterations * args.batch * n
    return {
        "processes": n,
        "global_batch": args.batch * n,
        "train_seconds": summary["train_seconds"],
        "images_per_second": images / summary["train_seconds"],
        "gradient_reductions": summary.get("gradient_reductions", 0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=2, help="per-process batch")
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--per-class", type=int, default=40, help="synthetic images per class")
    parser.add_argument("--config", default=None, help="a config (default: the embedded one)")
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.processes:
            rows.append(run(n, args, Path(tmp) / f"n{n}"))
    base = rows[0]["images_per_second"]
    print("| processes | global batch | loop s | images/s | speed-up | grad all-reduces |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['processes']} | {r['global_batch']} | {r['train_seconds']:.1f} | "
              f"{r['images_per_second']:.2f} | {r['images_per_second'] / base:.2f}x | "
              f"{r['gradient_reductions']} |")  # fmt: skip


if __name__ == "__main__":
    main()
