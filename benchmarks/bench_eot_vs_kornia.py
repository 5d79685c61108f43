"""kornia.augmentation pipeline vs attnpatch's single-warp path: cost, edge fidelity, blur."""

import math

import kornia.augmentation as KA
import kornia.geometry.transform as KT
import torch
import torch.nn.functional as F
from kornia.constants import DataKey
from timing import min_median_ms

from attnpatch.patch import EOT, AdversarialPatch, EOTDraw, PatchParams, apply_patch, eot_matrix

torch.set_num_threads(1)


def kornia_aug(mask_resample):
    return KA.AugmentationSequential(
        KA.RandomAffine(degrees=20.0, scale=(0.9, 1.1), translate=(0.05, 0.05), p=1.0),
        KA.RandomPerspective(0.1, p=1.0),
        KA.RandomContrast((0.8, 1.2), p=1.0),
        KA.RandomBrightness((0.9, 1.1), p=1.0),
        data_keys=["input", "mask"],
        extra_args={DataKey.MASK: {"resample": mask_resample, "align_corners": False}},
    )


def kornia_apply(aug, x, p, m, scales, noise=True):
    """Pad the patch to its diagonal (rotation must not crop), augment patch+mask, then place
    each at its own scale (second resampling) at the image centre."""
    B, _, H, W = x.shape
    h = p.shape[-1]
    d = math.ceil(h * math.sqrt(2))
    a = (d - h) // 2
    pad = (a, d - h - a, a, d - h - a)
    pc, mc = aug(F.pad(p, pad).expand(B, -1, -1, -1), F.pad(m, pad).expand(B, -1, -1, -1))
    if noise:
        pc = (pc + torch.empty_like(pc).uniform_(-0.1, 0.1)).clamp(0, 1)
    canvas_p, canvas_m = [], []
    for b in range(B):
        s = max(1, round(scales[b] * min(H, W) * d / h))
        s = min(s, H)
        pb = F.interpolate(pc[b : b + 1], size=(s, s), mode="bilinear", align_corners=False)
        mb = F.interpolate(mc[b : b + 1], size=(s, s), mode="bilinear", align_corners=False)
        t = (H - s) // 2
        left = (W - s) // 2
        q = (left, W - s - left, t, H - s - t)
        canvas_p.append(F.pad(pb, q))
        canvas_m.append(F.pad(mb, q))
    pw, mw = torch.cat(canvas_p), torch.cat(canvas_m)
    return x * (1 - mw) + pw * mw, mw


def bench(fn):
    return min_median_ms(fn, n=50, warmup=5)


for B, S, h, scale in [(1, 224, 64, (0.2, 0.4)), (16, 32, 16, (0.3, 0.5))]:
    x = torch.rand(B, 3, S, S)
    patch = AdversarialPatch(h, init="random", scale=scale, position="center")
    aug = kornia_aug("nearest")

    def k_fb():
        sc = [scale[0] + (scale[1] - scale[0]) * float(torch.rand(())) for _ in range(B)]
        y, _ = kornia_apply(aug, x, patch.pixels, patch.mask, sc)
        y.sum().backward()

    def o_fb():
        y, _ = patch(x)
        y.sum().backward()

    k, o = bench(k_fb), bench(o_fb)
    print(
        f"{B}x3x{S}x{S}, patch {h}: kornia fwd+bwd min/median {k[0]:.2f}/{k[1]:.2f} ms, "
        f"attnpatch {o[0]:.2f}/{o[1]:.2f} ms"
    )

# Edge fidelity: a white patch on white images must stay white wherever the mask reaches.
torch.manual_seed(0)
x = torch.ones(64, 3, 32, 32)
white = AdversarialPatch(16, init=torch.ones(3, 16, 16), scale=(0.5, 0.7), position="center")
geo = EOT(contrast=(1.0, 1.0), brightness=0.0, noise=0.0)
for res in ("nearest", "bilinear"):
    aug = KA.AugmentationSequential(
        KA.RandomAffine(degrees=20.0, scale=(0.9, 1.1), p=1.0),
        KA.RandomPerspective(0.1, p=1.0),
        data_keys=["input", "mask"],
        extra_args={DataKey.MASK: {"resample": res, "align_corners": False}},
    )
    y, m = kornia_apply(aug, x, white.pixels.detach(), white.mask, [0.6] * 64, noise=False)
    print(
        f"kornia, mask resample={res}: white-on-white min {y.min():.3f}, pixels < 0.99 per image: {(y < 0.99).any(1).sum() / 64:.1f} (of {(m > 0).sum() / 64:.0f} touched)"
    )
y, m = white(x, eot=geo)
print(f"attnpatch (premultiplied, one warp): white-on-white min {y.min():.6f}")

# Blur: std of a noise patch's interior after the same rotation+scale, one vs two resamplings.
torch.manual_seed(0)
noise = AdversarialPatch(32, init="random", scale=1.0, position="center")


theta, s = math.radians(10), 1.0
G = eot_matrix(
    torch.tensor([theta]),
    torch.tensor([s]),
    torch.zeros(1, 2),
    torch.zeros(1, 4, 2),
    torch.tensor([[64.0, 64.0]]),
)
params = PatchParams(torch.tensor([[0, 0, 64, 64]]), (64, 64), (32, 32), EOTDraw(matrix=G))
one, _ = apply_patch(torch.zeros(1, 3, 64, 64), noise.pixels.detach(), noise.mask, params)
M = KT.get_rotation_matrix2d(torch.tensor([[15.5, 15.5]]), torch.tensor([10.0]), torch.ones(1, 2))
rot = KT.warp_affine(noise.pixels.detach(), M, (32, 32), align_corners=False)
two = F.interpolate(rot, size=(64, 64), mode="bilinear", align_corners=False)
c = slice(20, 44)
print(
    f"interior std: patch {noise.pixels.std():.4f}; one warp {one[..., c, c].std():.4f}; rotate then upscale {two[..., c, c].std():.4f}"
)
