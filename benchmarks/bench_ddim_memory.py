"""Peak memory of a differentiable DDIM invert + denoise, with and without checkpointing.

For each ``num_steps`` in (1, 2, 5, 10) and ``checkpoint`` in (False, True) a *child process*
builds ``attnpatch.testing.mid_unet()`` (SD1.5's block structure, 8.6M parameters), runs
``ddim_invert`` then ``ddim_denoise`` (``num_steps`` each, ``num_inference_steps=10``) on latents
that require grad, and calls ``backward()``. Reported: the peak resident set size over a
baseline taken after the model is built and warmed up.

Why a child per case, and ``MALLOC_MMAP_THRESHOLD_=65536``: glibc keeps freed heap memory in the
process, so the RSS of a process that ran a big case first would lie about the next one; with
the threshold, every block of 64 KiB or more is an ``mmap`` that goes back to the OS when freed.
The peak is read from ``VmHWM`` after resetting it (``/proc/self/clear_refs``, Linux); where that
is not allowed, a thread samples ``VmRSS`` every millisecond instead.

Run (about 6 minutes on 2 busy CPU cores at the default 32x32 latent, i.e. 256 px images)::

    python benchmarks/bench_ddim_memory.py [--size 32] [--guidance 1.0]
    python benchmarks/bench_ddim_memory.py --size 64 --checkpoint-only --steps 1,10 --no-timing

The second form checks the goal at SD1.5's native 64x64 latent (512 px), skipping the plain
loop; it took 10 minutes on the same busy machine (the mmap threshold makes the large
allocations slow, see below).

Timing is measured separately, in children *without* the mmap threshold: with it, every large
allocation is a fresh, page-faulting ``mmap`` and the run is several times slower.

Goal (issue 3): with checkpointing, growth at 10 steps <= 1.3x growth at 1 step. The growth
that remains comes from bookkeeping that non-reentrant checkpointing keeps per UNet call (the
forward's autograd nodes and, per saved tensor, a holder, a weak reference and a
shape/dtype/device record): 1.6-2 MiB per call of this UNet, whatever the latent size, so the
ratio approaches 1 as the activations of one call grow (measured: 1.91x at 32x32, 1.18x at
64x64).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from timing import PeakMeter, machine

STEPS = (1, 2, 5, 10)
NUM_INFERENCE_STEPS = 10


def child(steps: int, checkpoint: bool, size: int, guidance: float, repeats: int = 1) -> dict:
    import gc

    import torch

    from attnpatch.diffusion import ddim_denoise, ddim_invert
    from attnpatch.testing import mid_unet, tiny_scheduler

    torch.manual_seed(0)
    unet = mid_unet()
    scheduler = tiny_scheduler()
    dim = unet.config.cross_attention_dim
    cond, uncond = torch.randn(1, 77, dim), torch.randn(1, 77, dim)

    def run(k: int) -> float:
        latents = torch.randn(1, 4, size, size, requires_grad=True)
        kw = dict(
            num_inference_steps=NUM_INFERENCE_STEPS,
            num_steps=k,
            uncond=uncond,
            guidance_scale=guidance,
            checkpoint=checkpoint,
        )
        start = time.perf_counter()
        zt = ddim_invert(unet, scheduler, latents, cond, **kw)
        out = ddim_denoise(unet, scheduler, zt, cond, **kw)
        out.square().mean().backward()
        assert latents.grad is not None and torch.isfinite(latents.grad).all()
        return time.perf_counter() - start

    run(1)  # warm-up: lazy initialisation, thread pools, kernel caches
    gc.collect()
    meter = PeakMeter()
    seconds = [run(steps) for _ in range(repeats)]
    peak = meter.peak_kb()
    return {
        "steps": steps,
        "checkpoint": checkpoint,
        "baseline_mib": meter.baseline_kb / 1024,
        "growth_mib": (peak - meter.baseline_kb) / 1024,
        "seconds": min(seconds),
        "method": meter.method,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def _spawn(args: argparse.Namespace, steps: int, ckpt: bool, env: dict, repeats: int) -> dict:
    cmd = [sys.executable, __file__, "--size", str(args.size), "--guidance", str(args.guidance)]
    cmd += ["--repeats", str(repeats), "--child", str(steps), "1" if ckpt else "0"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"child steps={steps} checkpoint={ckpt} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32, help="latent side (image side / 8)")
    parser.add_argument("--guidance", type=float, default=1.0, help="guidance_scale, both ways")
    parser.add_argument(
        "--steps", type=str, default=",".join(map(str, STEPS)), help="comma-separated num_steps"
    )
    parser.add_argument(
        "--checkpoint-only", action="store_true", help="skip the (large) plain-loop cases"
    )
    parser.add_argument("--no-timing", action="store_true", help="skip the timing comparison")
    parser.add_argument("--repeats", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--child", nargs=2, metavar=("STEPS", "CHECKPOINT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        steps, ckpt = int(args.child[0]), args.child[1] == "1"
        print(json.dumps(child(steps, ckpt, args.size, args.guidance, args.repeats)))
        return

    steps_list = [int(s) for s in args.steps.split(",")]
    modes = (True,) if args.checkpoint_only else (False, True)
    mem_env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    results: dict[tuple[bool, int], dict] = {}
    for ckpt in modes:
        for steps in steps_list:
            r = results[ckpt, steps] = _spawn(args, steps, ckpt, mem_env, repeats=1)
            print(
                f"  memory: steps={steps:2d} checkpoint={ckpt!s:5}: +{r['growth_mib']:.1f} MiB",
                file=sys.stderr,
            )
    first = next(iter(results.values()))
    print(f"Machine: {machine()}; torch {first['torch']}, {first['threads']} threads")
    print(
        f"mid_unet (SD1.5 block structure, 8.6M params), latent 1x4x{args.size}x{args.size} "
        f"({8 * args.size} px images), num_inference_steps={NUM_INFERENCE_STEPS}, "
        f"guidance_scale={args.guidance:g}; ddim_invert k + ddim_denoise k + backward; peak RSS "
        f"over the baseline after build and warm-up ({first['method']}); "
        "MALLOC_MMAP_THRESHOLD_=65536; one child process per case"
    )
    print()
    head = "| num_steps |"
    rule = "|---:|"
    for ckpt in modes:
        name = "checkpoint" if ckpt else "plain"
        head += f" {name}: peak growth | {name}: x of {steps_list[0]} step |"
        rule += "---:|---:|"
    print(head)
    print(rule)
    for k in steps_list:
        row = f"| {k} |"
        for ckpt in modes:
            g, g0 = results[ckpt, k]["growth_mib"], results[ckpt, steps_list[0]]["growth_mib"]
            row += f" {g:.1f} MiB | {g / g0:.2f} |"
        print(row)
    if True in modes and len(steps_list) > 1:
        lo, hi = steps_list[0], steps_list[-1]
        ratio = results[True, hi]["growth_mib"] / results[True, lo]["growth_mib"]
        verdict = "meets" if ratio <= 1.3 else "misses"
        print(
            f"\ncheckpoint: growth at {hi} steps = {ratio:.2f}x growth at {lo} step "
            f"({verdict} the <= 1.3x goal)"
        )
    if not args.no_timing:
        # Timing without the mmap threshold (it makes every large allocation a page-faulting
        # mmap, which distorts time): best of 2, in fresh children.
        k = steps_list[-1]
        times = {
            ckpt: _spawn(args, k, ckpt, dict(os.environ), repeats=2)["seconds"] for ckpt in modes
        }
        line = ", ".join(f"{'checkpoint' if c else 'plain'} {t:.2f} s" for c, t in times.items())
        extra = f" (checkpoint/plain = {times[True] / times[False]:.2f})" if len(times) == 2 else ""
        print(f"\ntime of invert {k} + denoise {k} + backward, best of 2: {line}{extra}")


if __name__ == "__main__":
    main()
