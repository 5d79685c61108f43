"""AttentionStore: filters, aggregation against manual averages, per-step maps, errors."""

from __future__ import annotations

import pytest
import torch

import attnpatch as ap
from attnpatch.errors import InputError
from attnpatch.testing import tiny_unet


@pytest.fixture(scope="module")
def deep_unet():
    return tiny_unet("sd15", deep=True)  # attention at 16x16 and 8x8 for a 32x32 latent


def run(unet, store, steps=(30, 20), hw=(32, 32), batch=2):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(batch, 4, *hw, generator=g)
    e = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
    with ap.hijack(unet, store):
        for t in steps:
            unet(x, t, e)
    return store


class Raw(ap.AttentionControl):
    """Keeps every raw probability tensor, for reference computations."""

    def __init__(self):
        self.seen = []

    def needs(self, site):
        return True

    def __call__(self, probs, site):
        self.seen.append((self.cur_step, site, probs.detach()))
        return probs


def test_aggregate_equals_manual_average_over_heads_layers_steps(deep_unet):
    raw = run(deep_unet, Raw())
    store = run(deep_unet, ap.AttentionStore())
    for kind, res in [("cross", 8), ("self", 8), ("cross", 16), ("self", 16)]:
        picked = [p for _, s, p in raw.seen if s.kind == kind and s.resolution == (res, res)]
        expected = torch.stack(picked).mean(dim=(0, 2))  # layers x steps, then heads
        expected = expected.reshape(2, res, res, -1)
        got = store.aggregate(kind, res)
        assert got.shape == (2, res, res, 77 if kind == "cross" else res * res)
        torch.testing.assert_close(got, expected)


def test_place_filter_in_aggregate(deep_unet):
    raw = run(deep_unet, Raw())
    store = run(deep_unet, ap.AttentionStore())
    picked = [
        p
        for _, s, p in raw.seen
        if s.kind == "cross" and s.resolution == (8, 8) and s.place in ("down", "mid")
    ]
    expected = torch.stack(picked).mean(dim=(0, 2)).reshape(2, 8, 8, 77)
    torch.testing.assert_close(store.aggregate("cross", 8, places=("down", "mid")), expected)


def test_constructor_filters_decide_what_is_recorded(deep_unet):
    store = run(deep_unet, ap.AttentionStore(kinds=("cross",), places=("up",), resolutions=[16]))
    sites = store.sites()
    assert sites and all(s.kind == "cross" and s.place == "up" for s in sites)
    assert {s.resolution for s in sites} == {(16, 16)}
    with pytest.raises(ap.AttnPatchError, match="recorded"):
        store.aggregate("self", 16)


def test_sites_are_in_execution_order_not_dict_order(deep_unet):
    store = run(deep_unet, ap.AttentionStore(), steps=(5,))
    places = [s.place for s in store.sites()]
    assert places == sorted(places, key=["down", "mid", "up"].index)
    assert list(deep_unet.attn_processors)[-1].startswith("mid_block")  # dict order differs


def test_per_step_maps_and_step_filter(deep_unet):
    store = run(deep_unet, ap.AttentionStore(per_step=True, steps=range(1, 3)), steps=(30, 20, 10))
    per_step = store.step_maps("cross", 8)
    assert list(per_step) == [1, 2]
    torch.testing.assert_close(
        torch.stack(list(per_step.values())).mean(0), store.aggregate("cross", 8)
    )
    with pytest.raises(ap.AttnPatchError, match="per_step=True"):
        run(deep_unet, ap.AttentionStore()).step_maps("cross", 8)


def test_non_square_latent_resolution(deep_unet):
    store = run(deep_unet, ap.AttentionStore(), hw=(32, 24), steps=(5,))
    assert {s.resolution for s in store.sites()} == {(16, 12), (8, 6)}
    assert store.aggregate("cross", (8, 6)).shape == (2, 8, 6, 77)
    assert store.aggregate("self", (16, 12)).shape == (2, 16, 12, 192)


def test_maps_carry_gradients_and_sum_out_of_place(deep_unet):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 32, 32, generator=g, requires_grad=True)
    e = torch.randn(1, 77, 8, generator=g)
    store = ap.AttentionStore(kinds=("cross",))
    with ap.hijack(deep_unet, store):
        deep_unet(x, 20, e)
        deep_unet(x * 0.5, 10, e)
    store.aggregate("cross", 8)[..., 1].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_reset_and_size_change(deep_unet):
    store = run(deep_unet, ap.AttentionStore(), steps=(5,))
    assert store.cur_step == 1 and store.num_steps == 1
    with pytest.raises(ap.AttnPatchError, match="reset"):
        run(deep_unet, store, hw=(16, 16), steps=(5,))
    store.reset()
    assert store.cur_step == 0 and store.sites() == []
    run(deep_unet, store, hw=(16, 16), steps=(5,))
    assert {s.resolution for s in store.sites()} == {(8, 8), (4, 4)}


def test_bad_filters_are_refused():
    with pytest.raises(ap.AttnPatchError, match="kinds"):
        ap.AttentionStore(kinds=("crosss",))
    with pytest.raises(ap.AttnPatchError, match="places"):
        ap.AttentionStore(places=("middle",))
    with pytest.raises(ap.AttnPatchError, match="resolution"):
        ap.AttentionStore(resolutions=["16"])
    with pytest.raises(ap.AttnPatchError, match="kind"):
        ap.AttentionStore().aggregate("both", 16)


def test_aggregate_without_a_resolution_is_a_typed_error(deep_unet):
    """Issue 22: ``aggregate("cross", None)`` raised torch's stack error (two sizes recorded)."""
    store = run(deep_unet, ap.AttentionStore(per_step=True), steps=(5,))
    for call in (store.aggregate, store.step_maps):
        with pytest.raises(InputError, match=r"one resolution.*\(8, 8\), \(16, 16\)"):
            call("cross", None)
    with pytest.raises(InputError, match="none recorded yet"):
        ap.AttentionStore().aggregate("self", None)
