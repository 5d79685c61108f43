"""AttentionControl, ComposeControl and ReweightCrossAttention."""

from __future__ import annotations

import pytest
import torch

import attnpatch as ap
from attnpatch.hooks.site import AttnSite

CROSS = AttnSite(
    "up_blocks.1.attentions.0.transformer_blocks.0.attn2", "up", 1, True, 2, 4, 6, (2, 2)
)
SELF = AttnSite(
    "up_blocks.1.attentions.0.transformer_blocks.0.attn1", "up", 1, False, 2, 4, 4, (2, 2)
)


def probs(site):
    return torch.softmax(torch.randn(1, site.heads, site.query_len, site.key_len), dim=-1)


def test_base_controller_observes_nothing_and_counts_steps():
    c = ap.AttentionControl()
    assert not c.needs(CROSS)
    c.step_end()
    c.step_end()
    assert c.cur_step == 2
    c.reset()
    assert c.cur_step == 0


def test_replay_freezes_step_and_store():
    store = ap.AttentionStore()
    store.step_end()
    with store.replaying(0):
        assert store.recomputing and store.cur_step == 0
        store.step_end()  # a recomputed UNet call must not advance the step
        store(probs(CROSS), CROSS)  # ... nor record
    assert not store.recomputing and store.cur_step == 1 and store.sites() == []


def test_reweight_scales_only_the_given_tokens():
    p = probs(CROSS)
    edit = ap.ReweightCrossAttention([2, 4], 3.0)
    out = edit(p, CROSS)
    expected = p.clone()
    expected[..., [2, 4]] *= 3.0
    torch.testing.assert_close(out, expected)
    renorm = ap.ReweightCrossAttention([2, 4], 3.0, renormalize=True)(p, CROSS)
    torch.testing.assert_close(renorm.sum(-1), torch.ones(1, 2, 4))
    assert edit.needs(CROSS) and not edit.needs(SELF)
    assert not ap.ReweightCrossAttention([1], 2.0, steps={3}).needs(CROSS)
    with pytest.raises(ap.AttnPatchError, match="out of range"):
        ap.ReweightCrossAttention([6], 2.0)(p, CROSS)


def test_compose_applies_children_in_order_and_propagates_steps():
    before = ap.AttentionStore()
    after = ap.AttentionStore()
    edit = ap.ReweightCrossAttention([1], 0.0)
    both = ap.ComposeControl(before, edit, [after])
    p = probs(CROSS)
    assert both.needs(CROSS)
    out = both(p, CROSS)
    assert out[..., 1].abs().max() == 0
    torch.testing.assert_close(before.maps("cross")[CROSS.name], p.mean(1).reshape(1, 2, 2, 6))
    assert after.maps("cross")[CROSS.name][..., 1].abs().max() == 0
    both.step_end()
    assert before.cur_step == after.cur_step == edit.cur_step == both.cur_step == 1
    with both.replaying(0):
        assert all(c.recomputing and c.cur_step == 0 for c in (before, edit, after, both))
    assert all(not c.recomputing and c.cur_step == 1 for c in (before, edit, after))
    both.reset()
    assert before.sites() == [] and edit.cur_step == 0
    with pytest.raises(ap.AttnPatchError, match="AttentionControl"):
        ap.ComposeControl(before, "store")
