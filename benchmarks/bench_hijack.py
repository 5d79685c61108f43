"""Cost of the hook layer, side by side in one process (ratios, not absolute times).

On ``attnpatch.testing.mid_unet()`` (SD1.5's block structure: four levels, two layers per
block, 8 heads, widths 32-128) at 32x32 and 64x64 latents, batch 1, fp32:

1. a forward inside ``hijack`` with a controller that needs nothing    / unhooked forward
   (the block is entered outside the timer; its enter+exit cost is reported separately)
1b. a hijack entered and left around one such forward (enter + forward + exit) / unhooked
   forward: what wrapping every single model call costs
2. an AttentionStore recording cross-attention at every resolution and self-attention at the
   two lowest, forward + backward through a loss on those maps      / unhooked forward + backward
3. the same store                                                    / diffusers' classic
   ``AttnProcessor`` on every layer (every probability materialised: what prompt-to-prompt and
   DiffAttack effectively do), forward + backward

Targets (docs/performance.md): (1) <= 1.03, (1b) <= 1.03 at 32x32, (2) <= 1.15, (3) <= 0.5 at
64x64; enter + exit alone under 0.3 ms for these 32 layers.

Timing: the cases run interleaved, ``--repeats`` rounds after a warm-up, and the median of each
is reported; ratios are of medians. Peak memory (CUDA only) is reported when run on a GPU.
``--clock cpu`` times the process's CPU time instead of the wall clock (with ``--threads 1``:
the work itself, robust when other processes load the machine; a shared machine's wall clock
is not).

    python benchmarks/bench_hijack.py                 # CPU, both sizes
    python benchmarks/bench_hijack.py --device cuda --reference sd15 --sizes 64 96
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

import attnpatch as ap
from attnpatch.testing import mid_unet, reference_unet

ENTER_REPEATS = 100
CLOCK = [time.perf_counter]


def lowest_two(unet, size: int) -> list[int]:
    sites = ap.trace_attention(unet, size)
    res = sorted({s.resolution[0] for s in sites})
    return res[:2]


def make_cases(unet, size: int, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    x0 = torch.randn(1, 4, size, size, generator=g).to(device, dtype)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g).to(device, dtype)
    low = lowest_two(unet, size)

    def forward(controller=None):
        """A forward pass; with a controller, inside a hijack entered outside the timer
        (as around a denoising loop: the block is entered once for many UNet calls)."""

        def run():
            with torch.no_grad():
                unet(x0, 500, text)

        if controller is None:
            return run
        return Timed(run, setup=lambda: ap.hijack(unet, controller))

    def enter_exit():  # 100 blocks per timing (one takes ~0.1 ms): see ENTER_REPEATS
        control = ap.AttentionControl()
        for _ in range(ENTER_REPEATS):
            with ap.hijack(unet, control):
                pass

    def around_one():
        with torch.no_grad(), ap.hijack(unet, ap.AttentionControl()):
            unet(x0, 500, text)

    def store():
        return ap.ComposeControl(
            ap.AttentionStore(kinds=("cross",)),
            ap.AttentionStore(kinds=("self",), resolutions=low),
        )

    def fwd_bwd(mode):
        def run():
            x = x0.clone().requires_grad_(True)
            if mode == "store":
                control = store()
                with ap.hijack(unet, control):
                    out = unet(x, 500, text).sample
                cross, selfs = control.controllers
                loss = out.float().square().mean()
                for m in cross.maps("cross").values():
                    loss = loss + m[..., 5].float().var()
                for m in selfs.maps("self").values():
                    loss = loss + m.float().square().mean()
            else:
                out = unet(x, 500, text).sample
                loss = out.float().square().mean()
            loss.backward()

        return run

    def classic_fwd_bwd():
        unet.set_attn_processor(AttnProcessor())
        try:
            fwd_bwd("plain")()
        finally:
            unet.set_attn_processor(AttnProcessor2_0())

    return {
        "unhooked fwd": forward(None),
        "hijack needs-nothing fwd": forward(ap.AttentionControl()),
        "hijack around one fwd": around_one,
        "unhooked fwd+bwd": fwd_bwd("plain"),
        "store fwd+bwd": fwd_bwd("store"),
        "classic-all fwd+bwd": classic_fwd_bwd,
        "hijack enter+exit": enter_exit,
    }, low


class Timed:
    """A case whose ``setup()`` context (e.g. a hijack block) is entered outside the timer."""

    def __init__(self, fn, setup):
        self.fn, self.setup = fn, setup

    def __call__(self):
        with self.setup():
            self.fn()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(cases, repeats: int, device) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in cases}
    for fn in cases.values():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in cases.items():
            ctx = fn.setup() if isinstance(fn, Timed) else contextlib.nullcontext()
            run = fn.fn if isinstance(fn, Timed) else fn
            with ctx:
                sync(device)
                t = CLOCK[0]()
                run()
                sync(device)
                times[name].append(CLOCK[0]() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def peak_memory(cases, device) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    peaks = {}
    for name, fn in cases.items():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync(device)
        peaks[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--reference", default=None, help="sd15 | sd21 | sdxl: a full-size UNet")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        CLOCK[0] = time.process_time
    dtype = getattr(torch, args.dtype)
    if args.reference:
        unet = reference_unet(args.reference, device=device, dtype=dtype)
        name = f"{args.reference} (random weights)"
    else:
        unet = mid_unet().to(device, dtype)
        name = "mid_unet (SD1.5 block structure, widths 32-128)"
    unet.set_attn_processor(AttnProcessor2_0())
    print(
        f"# {name}, {device}, {args.dtype}, torch {torch.__version__}, threads "
        f"{torch.get_num_threads()}, {args.clock} clock"
    )
    print("| latent | self stored at | case | median s | ratio | target |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        cases, low = make_cases(unet, size, device, dtype)
        med = measure(cases, args.repeats, device)
        rows = [
            ("unhooked fwd", None, ""),
            ("hijack needs-nothing fwd", med["unhooked fwd"], "<= 1.03"),
            ("hijack around one fwd", med["unhooked fwd"], "<= 1.03 at 32x32"),
            ("unhooked fwd+bwd", None, ""),
            ("store fwd+bwd", med["unhooked fwd+bwd"], "<= 1.15"),
            ("classic-all fwd+bwd", med["unhooked fwd+bwd"], ""),
        ]
        for case, base, target in rows:
            ratio = f"{med[case] / base:.3f}" if base else "1"
            print(f"| {size}x{size} | {low} | {case} | {med[case]:.4f} | {ratio} | {target} |")
        enter = med["hijack enter+exit"] / ENTER_REPEATS
        print(
            f"| {size}x{size} | {low} | hijack enter+exit (once per block) | {enter:.5f} | "
            f"{enter / med['unhooked fwd']:.4f} of one fwd | < 0.0003 s |"
        )
        r3 = med["store fwd+bwd"] / med["classic-all fwd+bwd"]
        print(f"| {size}x{size} | {low} | store / classic-all | | {r3:.3f} | <= 0.5 at 64x64 |")
        for case, mib in peak_memory(cases, device).items():
            print(f"| {size}x{size} | {low} | peak MiB: {case} | {mib:.0f} | | |")


if __name__ == "__main__":
    main()
