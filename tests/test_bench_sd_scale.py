"""benchmarks/bench_sd_scale.py's diffusion-transformer paths (``--model sd3`` /
``flux-reduced``) run, on the tiny SD3 and Flux stacks that share their code (seconds)."""

from __future__ import annotations

import json
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_sd_scale
    import dit_parts

    return bench_sd_scale, dit_parts


def _args(**kw) -> Namespace:
    base = dict(
        model="tiny-sd3", px=32, steps=[4, 2], guidance=2.5, memory="low", dtype="float32",
        device="cpu", autocast=False, floor=True, peers=False, weights_mode="sum",
        clock="cpu", flux_blocks="2,4", threads=1,
    )  # fmt: skip
    return Namespace(**{**base, **kw})


@pytest.mark.parametrize("memory", ["low", "fast"])
def test_tiny_sd3_iteration_in_process(bench, memory):
    """The child's DiT path: the SD3 stack's whole iteration and its bare floor, finite."""
    bench_sd_scale, _ = bench
    r = bench_sd_scale.child(_args(memory=memory))
    assert r["model"] == "tiny-sd3" and r["memory"] == memory
    assert r["blocks"] == [2, 0] and r["embedded_guidance"] is None
    assert r["seconds"] > 0 and r["floor_seconds"] > 0
    assert r["growth_gib"] >= 0 and r["parameters_b"] > 0


def test_real_size_builders_on_meta_shapes(bench):
    """``sd3`` / ``flux-reduced`` take the public configs (SD3-medium, Flux-dev at full width)
    and the embeddings their text encoders give: checked on the meta device (no memory)."""
    import torch

    _, dit_parts = bench
    parts = dit_parts.build_dit("flux-reduced", torch.bfloat16, "meta", (1, 2))
    net = parts.transformer
    assert dit_parts.dit_blocks(parts) == (1, 2)
    assert net.inner_dim == 3072 and net.dtype == torch.bfloat16
    assert parts.vae.config.latent_channels == 16 and parts.vae.dtype == torch.bfloat16
    e = dit_parts.dit_embeds(parts, "flux-reduced", "meta", torch.Generator().manual_seed(0))
    assert e.cond.shape == (1, 512, 4096) and e.pooled.shape == (1, 768)
    sd3 = dit_parts.build_dit("sd3", torch.float32, "meta")
    assert dit_parts.dit_blocks(sd3) == (24, 0)
    assert 2.0e9 < sum(p.numel() for p in sd3.transformer.parameters()) < 2.1e9
    e = dit_parts.dit_embeds(sd3, "sd3", "meta", torch.Generator().manual_seed(0))
    assert e.cond.shape == (1, 333, 4096) and e.pooled.shape == (1, 2048)


def test_flux_per_block_fit_and_computed_full(bench):
    """Two depths give the exact line through them, extrapolated to 19 + 38 blocks."""
    _, dit_parts = bench
    row = dict(model="flux-reduced", px=512, steps=[20, 5], guidance=1.0, memory="low",
               dtype="bfloat16")  # fmt: skip
    rows = [
        {**row, "blocks": [1, 2], "growth_gib": 1.0 + 3 * 0.1, "seconds": 10 + 3 * 2.0},
        {**row, "blocks": [2, 4], "growth_gib": 1.0 + 6 * 0.1, "seconds": 10 + 6 * 2.0},
    ]
    (line,) = dit_parts.flux_per_block(rows)
    assert "growth 1.00 + 0.100 GiB per block" in line and "10.0 + 2.0 s per block" in line
    weights = dit_parts._flux_dev_weights_gib("bfloat16")
    assert 22.0 < weights < 22.4  # 11.9 B parameters x 2 bytes
    assert f"growth {1.0 + 57 * 0.1:.2f} GiB" in line and "124 s" in line
    assert dit_parts.flux_per_block(rows[:1]) == []  # one depth: nothing to fit


@pytest.mark.slow
def test_tiny_flux_cli_two_depths(tmp_path):
    """The script end to end: child processes, two Flux depths, the JSON lines, the per-block
    line."""
    out = tmp_path / "r.jsonl"
    cmd = [sys.executable, str(BENCH / "bench_sd_scale.py"), "--model", "tiny-flux", "--px", "32"]
    cmd += ["--steps", "4", "2", "--guidance", "1", "--memory", "low", "--threads", "1"]
    cmd += ["--flux-blocks", "1,2", "1,3", "--clock", "cpu", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["blocks"] for r in rows] == [[1, 2], [1, 3]]
    assert all(r["embedded_guidance"] == 3.5 and r["guidance"] == 1.0 for r in rows)
    assert "tiny-flux 32 px N/k 4/2 CFG 1 low float32: growth" in done.stdout
    assert "per block" in done.stdout and "COMPUTED" not in done.stdout
