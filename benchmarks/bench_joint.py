"""What reading joint attention costs on diffusion transformers (SD3 and Flux architectures at
reduced depth and width, random weights): time side by side in one process, peak memory in one
child process per case.

SDPA never returns probabilities, so an observed joint layer materialises softmax(QKᵀ) for its
whole sequence (image + text tokens): ``(B, heads, S, S)`` in float32, kept for backward.
Unobserved layers run the original processor (SDPA / ``dispatch_attention_fn``). Cases, batch 1,
fp32:

1. forward inside ``hijack`` with a controller that needs nothing     / unhooked forward
2. ``AttentionStore(kinds=("cross",))`` on every layer, forward + backward through a loss on
   the maps                                                           / unhooked forward+backward
3. the same store on the last ``--few`` layers only                   / unhooked forward+backward
4. cross and self stored on every layer                               / unhooked forward+backward

Memory: peak RSS growth of one forward+backward over the built model, one child process per
case, ``MALLOC_MMAP_THRESHOLD_=65536`` (as bench_ddim_memory.py). The computed size of one
layer's probabilities is printed with it (labelled computed).

    python benchmarks/bench_joint.py                   # both families, latent 64 (512 px)
    python benchmarks/bench_joint.py --family sd3 --latent 32
    python benchmarks/bench_joint.py --clock cpu --threads 1   # on a machine others load
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from timing import PeakMeter, machine

#: reduced-size architectures: real token counts (a 512 px image: latent 64, grid 32x32 = 1024
#: image tokens; SD3's 333 / Flux's 512 text tokens), fewer and narrower layers
CONFIGS = {
    "sd3": dict(
        sample_size=64,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=6,
        attention_head_dim=32,
        num_attention_heads=8,
        joint_attention_dim=256,
        caption_projection_dim=256,
        pooled_projection_dim=256,
        pos_embed_max_size=96,
    ),
    "flux": dict(
        patch_size=1,
        in_channels=64,
        num_layers=2,
        num_single_layers=4,
        attention_head_dim=32,
        num_attention_heads=8,
        joint_attention_dim=256,
        pooled_projection_dim=256,
        axes_dims_rope=(4, 14, 14),
    ),
}
TEXT = {"sd3": 333, "flux": 512}
CLOCK = [time.perf_counter]
CASES = ("unhooked", "store-cross", "store-cross-few", "store-cross-self")


def build(family: str, latent: int):
    import torch
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    torch.manual_seed(0)
    cls = SD3Transformer2DModel if family == "sd3" else FluxTransformer2DModel
    model = cls(**CONFIGS[family]).eval().requires_grad_(False)
    channels = 16
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, channels, latent, latent, generator=g)
    cond = torch.randn(1, TEXT[family], 256, generator=g)
    pooled = torch.randn(1, 256, generator=g)
    return model, x, cond, pooled


def make_case(name: str, model, x, cond, pooled, few: int):
    import torch

    import attnpatch as ap
    from attnpatch.families import predict

    names = list(dict.fromkeys(layer.name for layer in ap.families.attention_layers(model)))
    last = set(names[-few:])

    class Few(ap.AttentionStore):
        def needs(self, site):
            return site.name in last and super().needs(site)

    def store():
        if name == "store-cross":
            return ap.AttentionStore(kinds=("cross",))
        if name == "store-cross-few":
            return Few(kinds=("cross",))
        return ap.AttentionStore(kinds=("cross", "self"))

    def run():
        latents = x.clone().requires_grad_(True)
        if name == "unhooked":
            out = predict(model, latents, 500.0, cond, pooled)
            loss = out.square().mean()
        else:
            control = store()
            with ap.hijack(model, control):
                out = predict(model, latents, 500.0, cond, pooled)
            loss = out.square().mean()
            for kind in control.kinds:
                for m in control.maps(kind).values():
                    loss = loss + m[..., 5].var()
        loss.backward()
        assert latents.grad is not None and torch.isfinite(latents.grad).all()

    return run


def child(family: str, case: str, latent: int, few: int) -> dict:
    import gc

    import torch

    model, x, cond, pooled = build(family, latent)
    run = make_case(case, model, x, cond, pooled, few)
    run()  # warm-up
    gc.collect()
    meter = PeakMeter()
    run()
    peak = meter.peak_kb()
    return {
        "growth_mib": (peak - meter.baseline_kb) / 1024,
        "method": meter.method,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def timings(family: str, latent: int, repeats: int, few: int) -> dict[str, float]:
    import torch

    import attnpatch as ap
    from attnpatch.families import predict

    model, x, cond, pooled = build(family, latent)

    def fwd():
        with torch.no_grad():
            predict(model, x, 500.0, cond, pooled)

    control = ap.AttentionControl()
    cases = {"fwd": fwd, "nothing-fwd": None}
    cases.update({c: make_case(c, model, x, cond, pooled, few) for c in CASES})
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(repeats + 1):  # the first round warms up
        for name, fn in cases.items():
            with ap.hijack(model, control) if name == "nothing-fwd" else _null():
                t = CLOCK[0]()
                (fn or fwd)()
                times[name].append(CLOCK[0]() - t)
    return {k: statistics.median(v[1:]) for k, v in times.items()}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=["sd3", "flux", "both"], default="both")
    parser.add_argument("--latent", type=int, default=64, help="latent side (image side / 8)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--few", type=int, default=2, help="layers observed in case 3")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--child", nargs=2, metavar=("FAMILY", "CASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.latent, args.few)))
        return
    families = ["sd3", "flux"] if args.family == "both" else [args.family]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        CLOCK[0] = time.process_time
    print(
        f"Machine: {machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{args.clock} clock"
    )
    print("| model | tokens (image + text) | case | median s | ratio | peak growth MiB |")
    print("|---|---|---|---:|---:|---:|")
    for family in families:
        grid = args.latent // 2
        n, t = grid * grid, TEXT[family]
        med = timings(family, args.latent, args.repeats, args.few)
        mem: dict[str, float] = {}
        if not args.no_memory:
            for case in CASES:
                cmd = [
                    sys.executable,
                    __file__,
                    "--latent",
                    str(args.latent),
                    "--few",
                    str(args.few),
                ]
                proc = subprocess.run(
                    cmd + ["--child", family, case],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if proc.returncode != 0:
                    sys.exit(f"child {family} {case} failed:\n{proc.stderr}")
                mem[case] = json.loads(proc.stdout.strip().splitlines()[-1])["growth_mib"]
        layers = CONFIGS[family]["num_layers"] + CONFIGS[family].get("num_single_layers", 0)
        heads = CONFIGS[family]["num_attention_heads"]
        tokens = f"{n} + {t}"
        rows = [
            ("unhooked fwd", "fwd", "fwd"),
            ("hijack, needs nothing, fwd", "nothing-fwd", "fwd"),
            ("unhooked fwd+bwd", "unhooked", "unhooked"),
            (f"store cross, all {layers} layers, fwd+bwd", "store-cross", "unhooked"),
            (f"store cross, last {args.few} layers, fwd+bwd", "store-cross-few", "unhooked"),
            (f"store cross+self, all {layers} layers, fwd+bwd", "store-cross-self", "unhooked"),
        ]
        for label, case, base in rows:
            growth = f"{mem[case]:.0f}" if case in mem else ""
            print(
                f"| {family} | {tokens} | {label} | {med[case]:.4f} | "
                f"{med[case] / med[base]:.3f} | {growth} |"
            )
        size = heads * (n + t) ** 2 * 4 / 2**20
        print(
            f"| {family} | {tokens} | computed: one layer's probabilities (1, {heads}, {n + t}, "
            f"{n + t}) fp32 | | | {size:.0f} |"
        )


if __name__ == "__main__":
    main()
