"""trace_attention, its tables, and the choice of map resolutions, against what the UNet runs."""

from __future__ import annotations

import pytest
import torch

import attnpatch as ap
from attnpatch.hooks import (
    attention_modules,
    format_sites,
    pick_cross_resolution,
    pick_self_resolutions,
    summarize_sites,
)
from attnpatch.testing import reference_unet, tiny_unet


def _observed(unet, hw):
    """Independent: forward hooks on every attention module record its name, query length and
    whether it got text, in the order the UNet runs them."""
    seen, handles = [], []
    for name, module in attention_modules(unet):

        def hook(mod, args, kwargs, name=name):
            q = args[0] if args else kwargs["hidden_states"]
            text = kwargs.get("encoder_hidden_states")
            seen.append((name, q.shape[1], text is not None))

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            unet(torch.zeros(1, 4, *hw), 1, torch.zeros(1, 77, unet.config.cross_attention_dim))
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("hw", [(32, 32), (32, 24), (24, 40)])
def test_sites_are_what_the_unet_runs(hw):
    unet = tiny_unet("sd15", deep=True)
    sites = ap.trace_attention(unet, hw)
    assert [(s.name, s.query_len, s.is_cross) for s in sites] == _observed(unet, hw)
    for s in sites:
        h, w = s.resolution
        assert h * w == s.query_len
        assert s.key_len == (77 if s.is_cross else s.query_len)
        level = {"down": s.block, "mid": 2, "up": 2 - s.block}[s.place]  # 3 levels
        assert (h, w) == (-(-hw[0] // 2**level), -(-hw[1] // 2**level))
    assert not ap.hooks.is_hijacked(unet)


def test_real_architectures_on_the_meta_device():
    sd15 = ap.trace_attention(reference_unet("sd15"), 64)
    assert len(sd15) == 32 and sum(not s.is_cross for s in sd15) == 16
    assert {s.resolution for s in sd15} == {(64, 64), (32, 32), (16, 16), (8, 8)}
    assert sd15[0].heads == 8 and sd15[0].probs_shape == (8, 4096, 4096)
    sdxl = ap.trace_attention(reference_unet("sdxl"))  # sample_size 128 from the config
    assert len(sdxl) == 140 and {s.resolution for s in sdxl} == {(64, 64), (32, 32)}


def test_tables():
    sites = ap.trace_attention(tiny_unet("sd15", deep=True), 32)
    table = format_sites(sites).splitlines()
    assert table[0].startswith("| # | layer | place |") and len(table) == 2 + len(sites)
    assert "| (B, 2, 256, 77) |" in table[2 + [s.is_cross for s in sites].index(True)]
    plain = format_sites(sites, markdown=False).splitlines()
    assert len(plain) == 1 + len(sites) and "|" not in plain[0]
    col = plain[0].index("place")  # columns are aligned: every row's place starts there
    assert [row[col:].split()[0] for row in plain[1:]] == [s.place for s in sites]
    summary = summarize_sites(sites).splitlines()
    groups = {(s.place, s.kind, s.resolution) for s in sites}
    assert len(summary) == 2 + len(groups)
    counts = sum(int(line.split("|")[4]) for line in summary[2:])
    assert counts == len(sites)


def test_pick_resolutions():
    deep = ap.trace_attention(tiny_unet("sd15", deep=True), 32)  # attention at 16x16 and 8x8
    assert pick_cross_resolution(deep) == pick_cross_resolution(deep, 0) == (8, 8)
    assert pick_cross_resolution(deep, 16) == (16, 16)
    with pytest.raises(ap.AttnPatchError, match=r"no cross-attention at resolution \(4, 4\)"):
        pick_cross_resolution(deep, 4)
    assert pick_self_resolutions(deep) == [(8, 8), (16, 16)]
    assert pick_self_resolutions(deep, [16]) == [(16, 16)]
    with pytest.raises(ap.AttnPatchError, match="no self-attention at"):
        pick_self_resolutions(deep, [16, 5])
    shallow = ap.trace_attention(tiny_unet("sd15"), 32)  # one attention level: 16x16
    assert pick_cross_resolution(shallow) == (16, 16) and pick_self_resolutions(shallow) == [
        (16, 16)
    ]
    self_only = [s for s in shallow if not s.is_cross]
    with pytest.raises(ap.AttnPatchError, match="no cross-attention layers"):
        pick_cross_resolution(self_only)


def test_bad_sample_size():
    with pytest.raises(ap.AttnPatchError, match="sample_size must be a positive int"):
        ap.trace_attention(tiny_unet("sd15"), (0, 8))
