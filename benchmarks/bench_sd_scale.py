"""SD-sized attack iterations: peak memory, seconds per iteration and the floor ratio per mode.

Each case runs in its own *child process*, which builds SD 1.5 / SD 2 base / SDXL parts from
their public configs with random weights (UNet: ``attnpatch.testing.REFERENCE_UNET_CONFIGS``;
VAE: the SD ``AutoencoderKL`` config below; no text encoder: random prompt embeddings of the
right width), then runs one attack iteration as ``attnpatch train`` does:

    image x (1, 3, px, px), requires grad
    -> classifier loss (attnpatch.testing.tiny_classifier: the repository has no
       torchvision-free ResNet; it is a 3-block CNN, negligible next to SD)
    -> AttentionPipeline(memory=...): VAE encode, k inversion steps, k denoising steps under
       CFG (2 UNet rows per step), cross-attention stored at every resolution and
       self-attention at the two lowest
    -> a loss on both (label-token variance of the cross maps, mean square of the self maps)
    -> backward to x.

Reported per case: peak memory above the built models (CPU: peak RSS over the RSS after
building and warming up, ``VmHWM`` after a reset; with ``--malloc env`` (the default)
``MALLOC_MMAP_THRESHOLD_=65536`` so that freed blocks go back to the OS (close to the live
tensors), with ``--malloc default`` glibc's defaults as a user runs, where attnpatch's low mode
sets that threshold itself at run time, and ``--malloc off`` the defaults with
``ATTNPATCH_MALLOC=0`` (glibc keeps freed blocks in its heaps); CUDA: ``torch.cuda.max_memory_allocated`` over the allocated
memory after building), the seconds of the iteration, and with ``--floor`` the floor ratio: the
iteration's time over the time of the bare forward + backward of the same calls (VAE encode,
``2k`` UNet calls, classifier; no hijack, no maps, no recomputation) measured in the same child.

``--peers`` installs diffusers' classic ``AttnProcessor`` on every layer and runs without
checkpointing (``memory="fast"``): every probability materialised, as prompt-to-prompt and
DiffAttack do (the comparison row).

Run one case (a child is spawned; ``--child`` is internal)::

    python benchmarks/bench_sd_scale.py --model sd2 --px 224 --steps 20 5 --guidance 2.5 \\
        --memory low --dtype float32 --device cpu [--floor] [--peers]

Several cases: pass several values to --model / --px / --memory / --dtype; they run one after
the other and a table is printed at the end (and as JSON lines to --json if given).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import subprocess
import sys
import time

from dit_parts import DIT_MODELS, build_dit, dit_blocks, dit_embeds, flux_per_block
from dit_parts import SD_VAE_CONFIG as VAE_CONFIG
from timing import PeakMeter, machine

#: model -> (reference UNet config, VAE scaling factor, pooled width or None)
MODELS = {
    "sd15": ("sd15", 0.18215, None),
    "sd2": ("sd21", 0.18215, None),  # SD 2 base: the SD 2.1 UNet architecture, epsilon
    "sdxl": ("sdxl", 0.13025, 1280),
    "tiny": (None, None, None),  # attnpatch.testing.tiny_sd("sd15", deep=True): a smoke test
}
#: every --model: the UNets above and the diffusion transformers of dit_parts.py
ALL_MODELS = sorted([*MODELS, *DIT_MODELS])


def build(model: str, dtype, device: str):
    """DiffusionParts with random weights, built directly in their dtype (no fp32 copy)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from attnpatch.diffusion import DiffusionParts, part_dtypes
    from attnpatch.testing import REFERENCE_UNET_CONFIGS, tiny_scheduler, tiny_sd

    dtypes = part_dtypes(dtype)
    if model == "tiny":
        parts = tiny_sd("sd15", deep=True)
        parts.unet.to(device, dtypes["unet"])
        parts.vae.to(device, dtypes["vae"])
        return parts
    name, scaling, _ = MODELS[model]
    previous = torch.get_default_dtype()
    try:
        with torch.device(device):
            torch.set_default_dtype(dtypes["unet"])
            unet = UNet2DConditionModel(**REFERENCE_UNET_CONFIGS[name])
            torch.set_default_dtype(dtypes["vae"])
            vae = AutoencoderKL(**VAE_CONFIG, scaling_factor=scaling)
    finally:
        torch.set_default_dtype(previous)
    for m in (unet, vae):
        m.eval().requires_grad_(False)
    scheduler = tiny_scheduler()  # SD 1.5's DDIM settings (SD 2 base's too; cost is the same)
    return DiffusionParts(unet, vae, None, None, scheduler, model)


def child(a: argparse.Namespace) -> dict:
    import torch
    from diffusers.models.attention_processor import AttnProcessor

    from attnpatch.diffusion import (
        AttentionPipeline,
        PromptEmbeds,
        ddim_denoise,
        ddim_invert,
        flow_denoise,
        flow_invert,
        sdxl_added_cond_kwargs,
        vae_encode,
    )
    from attnpatch.images import to_diffusion_input
    from attnpatch.losses import (
        GradientShares,
        LossTerms,
        classifier_loss,
        cross_attention_variance,
    )
    from attnpatch.testing import tiny_classifier

    torch.manual_seed(0)
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    dit = a.model in DIT_MODELS
    if dit:
        if a.peers:
            raise SystemExit("--peers: diffusers' classic AttnProcessor is for UNets only")
        parts = build_dit(a.model, dtype, a.device, _blocks(a.flux_blocks))
    else:
        parts = build(a.model, dtype, a.device)
    if a.peers:
        parts.unet.set_attn_processor(AttnProcessor())
    classifier = tiny_classifier().to(dev).requires_grad_(False)
    n_steps, k = a.steps
    memory = "fast" if a.peers else a.memory
    pipe = AttentionPipeline(  # traces the sites: a no-grad UNet forward (the warm-up)
        parts,
        num_inference_steps=n_steps,
        num_steps=k,
        guidance_scale=a.guidance,
        image_size=a.px,
        memory=memory,
    )
    g = torch.Generator().manual_seed(1)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dev)

    if dit:  # SD3's [CLIP; T5] / Flux's T5 tokens, pooled projections: random, right shapes
        embeds = dit_embeds(parts, a.model, dev, g)
    else:
        dim = parts.unet.config.cross_attention_dim
        pooled_dim = MODELS[a.model][2]
        pooled = (rnd(1, pooled_dim), rnd(1, pooled_dim)) if pooled_dim else (None, None)
        embeds = PromptEmbeds(rnd(1, 77, dim), rnd(1, 77, dim), *pooled)
    image = torch.rand(1, 3, a.px, a.px, generator=g).to(dev)
    with torch.no_grad():  # warm the VAE too
        vae_encode(
            parts.vae,
            to_diffusion_input(image, pipe.image_size, multiple=pipe.factor).to(
                next(parts.vae.parameters()).dtype
            ),
        )

    def autocast():
        if a.autocast:
            return torch.autocast(dev.type, dtype=dtype)
        return torch.autocast(dev.type, enabled=False)

    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    SHARES = {"classifier": 0.5, "cross_attention": 0.25, "self_attention": 0.25}
    combine = GradientShares(SHARES, every=4, exact=["classifier"])

    def iteration(mode: str = "sum") -> float:
        """One attack iteration: ``"sum"``, one backward of the weighted sum; weights.mode share
        (exact cheap): ``"share-measuring"`` one backward per term, ``"share"`` the classifier's
        own backward and one shared backward of the attention terms."""
        x = image.clone().requires_grad_(True)
        start = clock()
        with autocast():
            lc = classifier_loss(classifier(x), [3])
            r = pipe(x, embeds)
            lx = cross_attention_variance(r.cross_maps(pipe.cross_resolution), [5])
            ls = sum(v.float().square().mean() for v in r.self_maps().values())
            loss = lc + 10 * lx + 1e4 * ls
        if mode.startswith("share"):  # weights.mode share, exact cheap (the default)
            terms = LossTerms(SHARES)
            for name, value in zip(SHARES, (lc, lx, ls)):
                terms.add(name, value)
            combine.backward(terms, x, measure=mode == "share-measuring")
        else:
            loss.backward()
        if cuda:
            torch.cuda.synchronize()
        assert x.grad is not None and torch.isfinite(x.grad).all(), "non-finite gradient"
        return clock() - start

    def floor() -> float:
        """The same calls, bare: no hijack, no maps, no recomputation."""
        x = image.clone().requires_grad_(True)
        p = parts
        if dit:
            kw = dict(num_inference_steps=n_steps, num_steps=k, guidance=pipe.guidance)
            start = clock()
            lc = classifier_loss(classifier(x), [3])
            xd = to_diffusion_input(x, pipe.image_size, multiple=pipe.factor)
            z0 = vae_encode(p.vae, xd.to(next(p.vae.parameters()).dtype)).float()
            zt = flow_invert(p.transformer, p.scheduler, z0, embeds, **kw)
            out = flow_denoise(
                p.transformer, p.scheduler, zt, embeds, guidance_scale=a.guidance, **kw
            )
            (lc + out.square().mean()).backward()
            if cuda:
                torch.cuda.synchronize()
            return clock() - start
        added = None
        if p.variant == "sdxl":
            added = sdxl_added_cond_kwargs(
                embeds.pooled, pipe.image_size, uncond_pooled=embeds.uncond_pooled
            )
        kw = dict(num_inference_steps=n_steps, num_steps=k, added_cond_kwargs=added)
        start = clock()
        lc = classifier_loss(classifier(x), [3])
        xd = to_diffusion_input(x, pipe.image_size, multiple=8)
        z0 = vae_encode(p.vae, xd.to(next(p.vae.parameters()).dtype)).float()
        zt = ddim_invert(p.unet, p.scheduler, z0, embeds.cond, **kw)
        out = ddim_denoise(
            p.unet,
            p.scheduler,
            zt,
            embeds.cond,
            uncond=embeds.uncond,
            guidance_scale=a.guidance,
            **kw,
        )
        (lc + out.square().mean()).backward()
        if cuda:
            torch.cuda.synchronize()
        return clock() - start

    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        seconds = iteration()
        growth = (torch.cuda.max_memory_allocated() - base) / 2**30
        method = "torch.cuda.max_memory_allocated"
        base_gib = base / 2**30
    else:
        meter = PeakMeter()
        seconds = iteration()
        growth = (meter.peak_kb() - meter.baseline_kb) / 2**20
        method = meter.method
        base_gib = meter.baseline_kb / 2**20
    result = {
        "model": a.model,
        "px": a.px,
        "steps": [n_steps, k],
        "guidance": a.guidance,
        "memory": "peers" if a.peers else memory,
        "dtype": a.dtype + ("+autocast" if a.autocast else ""),
        "device": a.device,
        "baseline_gib": base_gib,
        "growth_gib": growth,
        "seconds": seconds,
        "method": method,
        "threads": torch.get_num_threads(),
        "malloc": (
            "MALLOC_MMAP_THRESHOLD_=65536"
            if "MALLOC_MMAP_THRESHOLD_" in os.environ
            else "glibc default"
            + (", ATTNPATCH_MALLOC=0" if "ATTNPATCH_MALLOC" in os.environ else "")
        ),
        "torch": torch.__version__,
        "parameters_b": sum(p.numel() for p in parts.denoiser.parameters()) / 1e9,
    }
    if dit:
        result["blocks"] = list(dit_blocks(parts))
        result["embedded_guidance"] = pipe.guidance
    if a.weights_mode == "share":  # the cost of weights.mode = "share" (docs/performance.md)
        gc.collect()
        result["share_seconds"] = iteration("share-measuring")
        gc.collect()
        result["share_plain_seconds"] = iteration("share")
        result["share_ratio"] = result["share_seconds"] / seconds
        # measuring every 4th iteration (weights.measure_every = 4): 1 measuring + 3 plain
        result["share_amortized_ratio"] = (
            result["share_seconds"] + 3 * result["share_plain_seconds"]
        ) / (4 * seconds)
    if a.floor:
        gc.collect()
        result["floor_seconds"] = floor()
        result["floor_ratio"] = seconds / result["floor_seconds"]
    return result


def _blocks(text: str) -> tuple[int, int]:
    """``"D,S"`` -> ``(D, S)``."""
    d, s = (int(v) for v in text.split(","))
    return d, s


def _row(r: dict) -> str:
    floor = f"{r['floor_ratio']:.2f}" if "floor_ratio" in r else ""
    share = (
        f" share: measuring {r['share_ratio']:.2f}x, every 4th {r['share_amortized_ratio']:.2f}x"
        if "share_ratio" in r
        else ""
    )
    model = r["model"] + (" {}+{} blocks".format(*r["blocks"]) if "blocks" in r else "")
    return (
        f"| {model} | {r['px']} | {r['steps'][0]}/{r['steps'][1]} | {r['guidance']:g} | "
        f"{r['memory']} | {r['dtype']} | {r['device']} | {r.get('malloc', '')} | "
        f"{r['baseline_gib']:.2f} | "
        f"**{r['growth_gib']:.2f}** | {r['seconds']:.1f} | {floor} |{share}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["sd2"], choices=ALL_MODELS)
    parser.add_argument("--px", nargs="+", type=int, default=[224])
    parser.add_argument("--steps", nargs=2, type=int, default=[20, 5], metavar=("N", "K"))
    parser.add_argument("--guidance", type=float, default=2.5)
    parser.add_argument("--memory", nargs="+", default=["low"], choices=["low", "balanced", "fast"])
    parser.add_argument(
        "--dtype", nargs="+", default=["float32"], choices=["float32", "float16", "bfloat16"]
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--autocast", action="store_true", help="fp32 weights, autocast dtype")
    parser.add_argument("--floor", action="store_true", help="also time the bare calls")
    parser.add_argument("--peers", action="store_true", help="classic processors, no ckpt")
    parser.add_argument(
        "--weights-mode",
        default="sum",
        choices=["sum", "share"],
        help="share: also time a measuring iteration of weights.mode share (a backward per term)",
    )
    parser.add_argument(
        "--malloc",
        default="env",
        choices=["env", "default", "off"],
        help="CPU: env = MALLOC_MMAP_THRESHOLD_=65536 in the child (freed blocks unmapped: the "
        "tensor-level figure); default = glibc's defaults, as a user runs (attnpatch's low mode "
        "sets the threshold itself at run time); off = defaults and ATTNPATCH_MALLOC=0",
    )
    parser.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="cpu: the process's CPU time (all threads), for ratios on a busy machine",
    )
    parser.add_argument(
        "--flux-blocks",
        nargs="+",
        default=["2,4"],
        metavar="D,S",
        help="flux-reduced: double- and single-stream blocks (Flux-dev has 19,38); two or more "
        "depths also print the growth per block and the computed full Flux-dev iteration",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    parser.add_argument("--json", help="append each result as a JSON line to this file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        for name in ("model", "px", "memory", "dtype", "flux_blocks"):  # one case: the first
            setattr(args, name, getattr(args, name)[0])
        print(json.dumps(child(args)))
        return
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.pop("ATTNPATCH_MALLOC", None)
    if args.device == "cpu" and args.malloc == "env":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    elif args.device == "cpu" and args.malloc == "off":
        env["ATTNPATCH_MALLOC"] = "0"
    results = []
    cases = []
    for model, px, memory, dtype in itertools.product(args.model, args.px, args.memory, args.dtype):
        depths = args.flux_blocks if model in ("flux-reduced", "tiny-flux") else ["2,4"]
        cases += [(model, px, memory, dtype, d) for d in depths]
    for model, px, memory, dtype, blocks in cases:
        cmd = [sys.executable, __file__, "--child", "--model", model, "--px", str(px)]
        cmd += ["--steps", *map(str, args.steps), "--guidance", str(args.guidance)]
        cmd += ["--memory", memory, "--dtype", dtype, "--device", args.device]
        cmd += [
            f
            for f, on in (
                ("--floor", args.floor),
                ("--peers", args.peers),
                ("--autocast", args.autocast),
            )
            if on
        ]
        cmd += ["--weights-mode", args.weights_mode, "--clock", args.clock]
        cmd += ["--flux-blocks", blocks, "--threads", str(args.threads)]
        start = time.time()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(f"case {model} {px}px {memory} {dtype} failed:\n{proc.stderr}", file=sys.stderr)
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r["wall_seconds"] = time.time() - start
        results.append(r)
        print(_row(r), file=sys.stderr, flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(r) + "\n")
    if not results:
        sys.exit("no case succeeded")
    first = results[0]
    print(
        f"Machine: {machine()}; torch {first['torch']}, {first['threads']} threads; "
        f"memory method: {first['method']}"
    )
    print()
    print(
        "| model | px | N/k | CFG | memory | dtype | device | malloc | models GiB | growth GiB | "
        "s/iter | floor ratio |"
    )
    print("|---|---:|---|---:|---|---|---|---|---:|---:|---:|---:|")
    for r in results:
        print(_row(r))
    for line in flux_per_block(results):
        print(line)


if __name__ == "__main__":
    main()
