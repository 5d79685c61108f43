"""Memory modes: "low" (blocks recomputed inside each recomputed UNet call, the VAE encoder
checkpointed, the guidance halves as two calls) and "balanced" give the values, maps and
gradients of the plain computation ("fast"), record each map once, and leave nothing behind."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

import attnpatch as ap
from attnpatch.diffusion import (
    MEMORY_MODES,
    AttentionPipeline,
    ddim_denoise,
    ddim_invert,
    vae_encode,
)
from attnpatch.diffusion._memory import block_checkpointing, resolve_memory
from attnpatch.errors import AttnPatchError
from attnpatch.hooks import is_hijacked
from attnpatch.testing import tiny_sd

N, K = 6, 2
PROMPTS = ["a photo of a circle", "a photo of a star"]
# SDPA (the uncond half under split guidance) against explicit softmax: rounding only
TOL = dict(atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def deep():
    return ap.load_diffusion(tiny_sd("sd15", deep=True))  # attention at two resolutions


class _Counter(ap.AttentionControl):
    """Counts the cross-attention calls it sees, forward and recomputed."""

    def __init__(self):
        self.forward = self.recomputed = 0

    def needs(self, site):
        return site.is_cross

    def __call__(self, probs, site):
        if self.recomputing:
            self.recomputed += 1
        else:
            self.forward += 1
        return probs


def _pipeline_run(parts, mode, g, size=32):
    pipe = ap.AttentionPipeline(
        parts, num_inference_steps=N, num_steps=K, guidance_scale=g, image_size=size, memory=mode
    )
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    x = images.requires_grad_(True)
    r = pipe(x, PROMPTS)
    cross = r.cross_maps(pipe.cross_resolution)
    selfs = r.self_maps()
    loss = cross[..., 2].var() + sum(v.square().mean() for v in selfs.values())
    loss = loss + r.denoised.square().mean()
    loss.backward()
    return {
        "denoised": r.denoised.detach(),
        "cross": cross.detach(),
        **{f"self:{k}": v.detach() for k, v in selfs.items()},
        "grad": x.grad,
        "steps": (r.cross.num_steps, r.self_store.num_steps),
    }


@pytest.mark.parametrize("g", [1.0, 3.0])
@pytest.mark.parametrize("mode", ["balanced", "low"])
def test_modes_equal_the_plain_pipeline(deep, mode, g):
    ref = _pipeline_run(deep, "fast", g)
    got = _pipeline_run(deep, mode, g)
    assert got.keys() == ref.keys()
    assert got.pop("steps") == ref.pop("steps") == (K, K)  # recorded once per step
    assert ref["grad"].abs().sum() > 0
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], **TOL, msg=key)


def test_low_mode_on_sdxl_splits_the_added_conditioning():
    parts = ap.load_diffusion("tiny-sdxl")
    ref = _pipeline_run(parts, "fast", 2.0)
    got = _pipeline_run(parts, "low", 2.0)
    assert got.pop("steps") == ref.pop("steps")
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], **TOL, msg=key)


def test_low_mode_leaves_the_models_as_they_were(deep):
    _pipeline_run(deep, "low", 3.0)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in deep.unet.modules())
    assert not any("forward" in m.__dict__ for m in deep.vae.modules())
    assert not is_hijacked(deep.unet)


def _ddim_under_hijack(parts, mode, editor, backward_inside):
    """Invert outside the hijack, denoise under it with an editor; loss on maps + latents."""
    unet, sched = parts.unet, parts.scheduler
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 4, 16, 16, generator=g, requires_grad=True)
    d = unet.config.cross_attention_dim
    cond, uncond = torch.randn(2, 77, d, generator=g), torch.randn(2, 77, d, generator=g)
    kw = dict(num_inference_steps=N, num_steps=K, checkpoint=mode != "fast")
    store, counter = ap.AttentionStore(per_step=True), _Counter()
    control = ap.ComposeControl(editor, store, counter)
    ctx = block_checkpointing(unet) if mode == "low" else torch.enable_grad()
    with ctx:
        zt = ddim_invert(unet, sched, z, cond, **kw)
        with ap.hijack(unet, control):
            out = ddim_denoise(unet, sched, zt, cond, uncond=uncond, guidance_scale=2.0, **kw)
            loss = store.aggregate("cross", 8)[..., 3].pow(2).sum() + out.pow(2).mean()
            loss = loss + store.aggregate("self", 8).pow(2).sum()
            if backward_inside:
                loss.backward()
    if not backward_inside:
        loss.backward()
    maps = {k: v.detach() for k, v in store.step_maps("cross", 8).items()}
    return z.grad, maps, store.num_steps, control.cur_step, counter


@pytest.mark.parametrize("backward_inside", [True, False])
@pytest.mark.parametrize("variant", ["sd15", "sd2"])
def test_nested_block_recompute_replays_an_editor_exactly(variant, backward_inside):
    parts = ap.load_diffusion(f"tiny-{variant}")

    def editor():
        return ap.ReweightCrossAttention([3, 4], 2.5, steps={0})  # edits step 0 only

    ref = _ddim_under_hijack(parts, "fast", editor(), backward_inside)
    bal = _ddim_under_hijack(parts, "balanced", editor(), backward_inside)
    low = _ddim_under_hijack(parts, "low", editor(), backward_inside)
    for got in (bal, low):
        assert got[2] == ref[2] == K and got[3] == ref[3] == K  # recorded once, steps right
        assert got[1].keys() == ref[1].keys() == set(range(K))
        for step in ref[1]:
            torch.testing.assert_close(got[1][step], ref[1][step], atol=1e-6, rtol=1e-5)
        assert ref[0].abs().sum() > 0
        torch.testing.assert_close(got[0], ref[0], atol=1e-6, rtol=1e-5)
    # forward calls are the same; each recompute level replays every controlled call once more
    assert low[4].forward == bal[4].forward == ref[4].forward > 0
    assert ref[4].recomputed == 0
    assert bal[4].recomputed == ref[4].forward
    assert low[4].recomputed == 2 * ref[4].forward  # the call's recompute, then the block's
    assert not any(getattr(m, "gradient_checkpointing", False) for m in parts.unet.modules())


def test_block_checkpointing_restores_previous_settings(deep):
    unet = deep.unet
    unet.enable_gradient_checkpointing()
    before = {
        id(m): m._gradient_checkpointing_func
        for m in unet.modules()
        if hasattr(m, "gradient_checkpointing")
    }
    try:
        with block_checkpointing(unet):
            funcs = [
                m._gradient_checkpointing_func
                for m in unet.modules()
                if hasattr(m, "gradient_checkpointing")
            ]
            assert all(
                f is not before[id(m)] for m, f in zip(unet.modules(), funcs) if id(m) in before
            )
        after = {
            id(m): m._gradient_checkpointing_func
            for m in unet.modules()
            if hasattr(m, "gradient_checkpointing")
        }
        assert after == before
        assert all(
            m.gradient_checkpointing for m in unet.modules() if hasattr(m, "gradient_checkpointing")
        )
    finally:
        unet.disable_gradient_checkpointing()


def test_vae_encode_checkpoint_equals_plain(deep):
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    grads = []
    for ckpt in (False, True):
        xi = x.clone().requires_grad_(True)
        z = vae_encode(deep.vae, xi, checkpoint=ckpt)
        z.square().mean().backward()
        grads.append((z.detach(), xi.grad))
    torch.testing.assert_close(grads[1][0], grads[0][0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grads[1][1], grads[0][1], atol=1e-6, rtol=1e-5)
    assert not any("forward" in m.__dict__ for m in deep.vae.modules())


def test_memory_argument_and_defaults(deep):
    kw = dict(num_inference_steps=N, num_steps=K, image_size=32)
    assert MEMORY_MODES == ("low", "balanced", "fast")
    assert ap.AttentionPipeline(deep, **kw).memory == "fast"  # the CPU's default
    assert ap.AttentionPipeline(deep, memory="low", **kw).memory == "low"
    with pytest.warns(FutureWarning, match=r"checkpoint=.*0\.3\.0.*memory='balanced'"):
        assert ap.AttentionPipeline(deep, checkpoint=True, **kw).memory == "balanced"
    with pytest.warns(FutureWarning):
        assert ap.AttentionPipeline(deep, checkpoint=False, **kw).checkpoint is False
    assert resolve_memory(None, None, torch.device("cuda")) == "low"
    assert resolve_memory(None, None, torch.device("meta")) == "low"
    with pytest.raises(AttnPatchError, match="memory must be one of"):
        ap.AttentionPipeline(deep, memory="tiny", **kw)
    with pytest.raises(AttnPatchError, match="contradicts"), pytest.warns(FutureWarning):
        ap.AttentionPipeline(deep, memory="fast", checkpoint=True, **kw)
    with pytest.raises(AttnPatchError, match="contradicts"), pytest.warns(FutureWarning):
        ap.AttentionPipeline(deep, memory="low", checkpoint=False, **kw)


# --------------------------------------------------------------------------- glibc's heaps

_RETAINED = """
import sys
import torch
from attnpatch.diffusion._memory import return_freed_memory

print(return_freed_memory() if sys.argv[1] == "1" else None)

def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

big = torch.ones(16 * 2**20 // 4)
del big  # a freed 16 MiB mapping: glibc's dynamic mmap threshold climbs to 16 MiB
base = rss_mib()
blocks = [torch.ones(4 * 2**20 // 4) for _ in range(50)]  # 50 x 4 MiB, touched
# From the heap's top, above them, so the heap cannot shrink: large enough that no hole left
# below by the imports can hold it (a 256 KiB pin landed in one now and then, varying with the
# hash seed), below the 16 MiB threshold, and untouched (torch.empty: no pages resident).
pin = torch.empty(12 * 2**20 // 4)
del blocks
print(round(rss_mib() - base))
"""


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_low_mode_on_the_cpu_returns_freed_blocks_to_the_os():
    """glibc's default keeps 200 MiB of freed 4 MiB blocks in its heap; after
    return_freed_memory() (what the low mode calls on the CPU) they go back to the OS."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.pop("ATTNPATCH_MALLOC", None)

    def retained(tuned: str) -> list[str]:
        done = subprocess.run(
            [sys.executable, "-c", _RETAINED, tuned], env=env, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout.split()

    default = retained("0")
    assert int(default[1]) >= 150  # the test can fail: glibc's default keeps them
    assert retained("1") == ["True", "0"]


def test_return_freed_memory_leaves_a_users_choice_alone(monkeypatch):
    """ATTNPATCH_MALLOC=0, or the user's own MALLOC_* variables: glibc is not touched; else
    one mallopt(M_MMAP_THRESHOLD, 64 KiB) call, once per process."""
    from attnpatch.diffusion import _memory

    calls = []

    class Libc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(_memory.ctypes, "CDLL", lambda name: Libc())
    monkeypatch.setattr(_memory, "_glibc", lambda: True)
    for env, expected in (
        ({"ATTNPATCH_MALLOC": "0"}, False),
        ({"ATTNPATCH_MALLOC": "1", "MALLOC_MMAP_THRESHOLD_": "1048576"}, False),
        ({"ATTNPATCH_MALLOC": "1", "MALLOC_TRIM_THRESHOLD_": "0"}, False),
        ({"ATTNPATCH_MALLOC": "1"}, True),
    ):
        monkeypatch.setattr(_memory, "_malloc_state", {})
        for key in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        assert _memory.return_freed_memory() is expected, env
        assert _memory.return_freed_memory() is expected  # once: the state is kept
    assert calls == [(-3, 64 * 1024)]


def test_the_low_mode_calls_it_on_the_cpu_only(monkeypatch, sd15):
    import attnpatch.diffusion.pipeline as pipeline_mod

    calls = []
    monkeypatch.setattr(pipeline_mod, "return_freed_memory", lambda: calls.append(1) or True)
    images = torch.rand(1, 3, 32, 32)
    for memory, expected in (("fast", 0), ("balanced", 0), ("low", 1)):
        pipe = AttentionPipeline(sd15, num_inference_steps=4, num_steps=1, memory=memory)
        with torch.no_grad():
            pipe(images, ["a photo of a cat"])
        assert len(calls) == expected, memory
