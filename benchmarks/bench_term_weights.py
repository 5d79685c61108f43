"""The cost of ``weights.mode = "share"`` over the weighted sum, on the embedded default.

One trainer per mode (the default config: the ``"shapes"`` stack, the tiny classifier, batch 1,
one thread), the same images; iterations are timed in rounds that alternate the modes, so drift
on a busy machine hits all alike. Each timed iteration is the trainer's forward plus its
``backward`` (no optimizer step). Modes:

* ``sum``: ``weights.mode sum``, ``measure_every 0`` (one backward of the weighted sum);
* ``share``: the default (``exact cheap``: the classifier and l2 terms each get their own
  backward every iteration (no UNet in them); the attention terms a backward each every 4th
  iteration and one shared backward otherwise);
* ``share, measuring``: every iteration a measuring one (``measure_every 1``);
* ``share, exact all``: every term its own backward every iteration (``exact all``).

Time is the process's CPU time (``time.process_time``, one thread), so other jobs on a busy
machine do not enter the ratios.

Reported: the median seconds per iteration and the ratio to ``sum``. The SD 2 base sized
row comes from ``bench_sd_scale.py --weights-mode share`` (docs/performance.md).

    python benchmarks/bench_term_weights.py [--iterations 40]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from timing import machine

from attnpatch._util import num_threads
from attnpatch.training import load_config
from attnpatch.training.run import build_trainer

MODES = {
    "sum": {"weights.mode": "sum", "weights.measure_every": 0},
    "share": {},
    "share, measuring": {"weights.measure_every": 1},
    "share, exact all": {"weights.exact": "all"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=40)
    args = ap.parse_args()
    trainers = {}
    for name, overrides in MODES.items():
        cfg = load_config(None, {"train.progress": False, **overrides})
        trainers[name], _ = build_trainer(cfg)
    data = next(iter(trainers.values())).data
    times: dict[str, list[float]] = {name: [] for name in MODES}
    with num_threads(1):
        for i in range(args.iterations + 4):
            images, labels = data[i % len(data)]
            for name, trainer in trainers.items():
                trainer.iteration = i
                start = time.process_time()
                out = trainer.forward(images[None], torch.tensor([labels]), [i % len(data)])
                trainer.backward(out)
                elapsed = time.process_time() - start
                trainer.patch.pixels.grad = None
                if i >= 4:  # warm-up
                    times[name].append(elapsed)
    base = statistics.median(times["sum"])
    print(f"Machine: {machine()}; torch {torch.__version__}, 1 thread, CPU time")
    print("| mode | s/iteration (median) | ratio to sum |")
    print("|---|---:|---:|")
    for name, t in times.items():
        m = statistics.median(t)
        print(f"| {name} | {m * 1000:.0f} ms | {m / base:.2f}x |")
    # share measures on every 4th iteration: its median mixes both kinds; the mean is the cost
    mean = {n: statistics.fmean(t) for n, t in times.items()}
    print(f"\nmean per iteration: share {mean['share'] / mean['sum']:.2f}x the sum's")


if __name__ == "__main__":
    main()
