"""Per-call cost of AdversarialPatch.forward (sampling + application), CPU."""

import sys

import torch
from timing import min_median_ms

from attnpatch.patch import AdversarialPatch

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)


def bench(fn):
    return min_median_ms(fn, n=100, warmup=10)


print("threads", torch.get_num_threads())
for B, S, h, scale in [(1, 224, 64, (0.2, 0.4)), (16, 32, 16, (0.3, 0.5))]:
    x = torch.rand(B, 3, S, S)
    patch = AdversarialPatch(h, shape="circle", init="random", scale=scale)
    for eot in (False, True):

        def f():
            return patch(x, eot=eot)

        def fb():
            y, _ = patch(x, eot=eot)
            y.sum().backward()

        a, b = bench(f)
        c, d = bench(fb)
        print(
            f"{B}x3x{S}x{S}, patch {h}px circle, scale {scale}, eot={eot}: "
            f"fwd min {a:.2f} / median {b:.2f} ms; fwd+bwd min {c:.2f} / median {d:.2f} ms"
        )
