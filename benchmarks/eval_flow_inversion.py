"""How far flow_invert's Euler inversion is from exact (the numbers of docs/ddim.md, "Flow
matching").

1. The schedules: the sigma the first inverse step labels the clean latent with
   (``sigma_{N-1}``), for SD3 (shift 3) and Flux (resolution-dependent shift) at the tiny stacks'
   size and at 1024 px.
2. The oracle: a transformer whose velocity is ``noise - x0`` (flow matching's exact answer for
   that pair) makes inversion land on ``scale_noise(x0, t_{N-k}, noise)`` and denoising on
   ``x0``; the largest error, float32.
3. The approximation: a random tiny transformer's round trip ``flow_denoise(flow_invert(z))``
   relative to ``z`` (L2), with one noise level reached in ever finer steps, and with the whole
   schedule (``k = N``).

    python benchmarks/eval_flow_inversion.py
"""

from __future__ import annotations

import copy

import torch

from attnpatch.diffusion import encode_prompt, flow_denoise, flow_invert
from attnpatch.diffusion._flow_conditioning import _config_json, _private_schedule
from attnpatch.families import pack_latents as pack
from attnpatch.testing import tiny_flux, tiny_sd3

try:
    from timing import machine
except ImportError:  # run from elsewhere
    from benchmarks.timing import machine

PROMPT = "a photo of a red circle on a blue background"


def sigmas(parts, n, hw):
    """``sigma_i`` of the family's pipeline schedule for ``(h, w)`` latents, ``i = 0..N``."""
    seq = (hw[0] // 2) * (hw[1] // 2)  # both tiny transformers: 2x2 patches or packing
    _, s = _private_schedule(parts.variant, _config_json(parts.scheduler), n, seq)
    return s.tolist()


def oracle_error(parts, n, k):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    parts = copy.deepcopy(parts)
    target = noise - x0
    flux = parts.variant == "flux"
    parts.transformer.forward = lambda hidden_states, **kw: (pack(target) if flux else target,)
    e = encode_prompt(parts.tokenizers, parts.text_encoders, PROMPT, max_sequence_length=16)
    kw = dict(num_inference_steps=n, num_steps=k, **({"guidance": 3.5} if flux else {}))
    s = sigmas(parts, n, (8, 8))[n - k]
    with torch.no_grad():
        zt = flow_invert(parts.transformer, parts.scheduler, x0, e, **kw)
        back = flow_denoise(parts.transformer, parts.scheduler, zt, e, **kw)
    return float((zt - (s * noise + (1 - s) * x0)).abs().max()), float((back - x0).abs().max())


def round_trip(parts, n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2, 4, 8, 8, generator=g)
    e = encode_prompt(parts.tokenizers, parts.text_encoders, PROMPT, max_sequence_length=16)
    kw = dict(num_inference_steps=n, num_steps=k)
    if parts.variant == "flux":
        kw["guidance"] = 3.5
    with torch.no_grad():
        zt = flow_invert(parts.transformer, parts.scheduler, z, e, **kw)
        back = flow_denoise(parts.transformer, parts.scheduler, zt, e, **kw)
    return float((back - z).norm() / z.norm())


def main() -> None:
    torch.set_num_threads(2)
    print(f"machine: {machine()}; torch {torch.__version__}")
    stacks = {"tiny-sd3": tiny_sd3(), "tiny-flux": tiny_flux()}
    print(
        "\n1. sigma_{N-1} (the level the clean latent is labelled with in the first inverse step)"
    )
    for name, parts in stacks.items():
        for hw, label in [((8, 8), "tiny 8x8 latents"), ((128, 128), "1024 px")]:
            row = {n: sigmas(parts, n, hw)[n - 1] for n in (10, 28, 50)}
            print(
                f"  {name:10s} {label:17s} " + "  ".join(f"N={n}: {s:.4f}" for n, s in row.items())
            )
    print("\n2. oracle v = noise - x0: max |error| (inversion vs scale_noise, round trip vs x0)")
    for name, parts in stacks.items():
        for n, k in [(10, 3), (28, 28)]:
            inv, rt = oracle_error(parts, n, k)
            print(f"  {name:10s} N={n:2d} k={k:2d}: inversion {inv:.1e}, round trip {rt:.1e}")
    print("\n3. random tiny transformer: round-trip relative L2 error")
    for name, parts in stacks.items():
        same = {n: round_trip(parts, n, n - (n - 1) // 2) for n in (5, 9, 17, 33, 65)}
        print(f"  {name:10s} to the middle sigma: "
              + "  ".join(f"N={n}: {v:.3f}" for n, v in same.items()))  # fmt: skip
        full = {n: round_trip(parts, n, n) for n in (10, 28, 50, 200)}
        print(f"  {name:10s} whole schedule k=N: "
              + "  ".join(f"N={n}: {v:.3f}" for n, v in full.items()))  # fmt: skip


if __name__ == "__main__":
    main()
