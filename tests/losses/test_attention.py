"""attnpatch.losses.attention: cross-attention variance and region, self-attention structure."""

from __future__ import annotations

import doctest

import pytest
import torch
import torch.nn.functional as F

from attnpatch.errors import InputError
from attnpatch.losses import attention as attention_mod
from attnpatch.losses.attention import (
    CrossAttentionRegion,
    CrossAttentionVariance,
    SelfAttentionStructure,
    cross_attention_region,
    cross_attention_variance,
    label_map,
    self_attention_structure,
)

K = 77


def _cross(b=2, h=4, w=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(b, h, w, K, generator=g, dtype=dtype), dim=-1)


def _self(b=2, h=2, w=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(b, h, w, h * w, generator=g, dtype=dtype), dim=-1)


def test_docstring_examples_run():
    result = doctest.testmod(attention_mod, extraglobs={"torch": torch})
    assert result.attempted > 0 and result.failed == 0


# -- tokens ----------------------------------------------------------------------------------
def test_label_map_is_token_mean():
    maps = _cross()
    ref = maps[..., [3, 5, 9]].mean(dim=-1)  # independent: indexing, not weights
    torch.testing.assert_close(label_map(maps, [3, 5, 9]), ref)


@pytest.mark.parametrize(
    "tokens",
    [[3, 5], (3, 5), torch.tensor([3, 5]), [[3, 5], [3, 5]], torch.tensor([[3, 5], [3, 5]])],
)
def test_token_forms_agree(tokens):
    maps = _cross()
    torch.testing.assert_close(label_map(maps, tokens), maps[..., [3, 5]].mean(-1))


def test_per_image_tokens():
    maps = _cross()
    got = label_map(maps, [[1], [2, 4, 6]])
    torch.testing.assert_close(got[0], maps[0, ..., 1])
    torch.testing.assert_close(got[1], maps[1, ..., [2, 4, 6]].mean(-1))
    got = label_map(maps, [torch.tensor([1]), torch.tensor([2, 4, 6])])
    torch.testing.assert_close(got[1], maps[1, ..., [2, 4, 6]].mean(-1))
    torch.testing.assert_close(label_map(maps, 7), maps[..., 7])


@pytest.mark.parametrize(
    "tokens, match",
    [
        ([77], r"token position 77 is out of range for maps with 77 text tokens \(valid: 0..76\)"),
        ([-1], "token position -1 is out of range"),
        ([], "no token positions"),
        ([3, 3], "given twice"),
        ([[1], [2], [3]], "3 per-image lists but the maps have batch 2"),
        ([[1], []], r"no token positions given \(image 1\)"),
        (torch.tensor([1.0]), "integer tensor"),
        ([1.5], "must be ints"),
        ("cat", "tokens must be"),
        ([True], "must be ints"),
    ],
)
def test_bad_tokens(tokens, match):
    with pytest.raises(InputError, match=match):
        cross_attention_variance(_cross(), tokens)


def test_bad_cross_maps():
    with pytest.raises(InputError, match=r"unflatten\(1, \(h, w\)\)"):
        cross_attention_variance(torch.rand(2, 16, K), [1])
    with pytest.raises(InputError, match="floating point"):
        cross_attention_variance(torch.ones(2, 4, 4, K, dtype=torch.long), [1])
    with pytest.raises(InputError, match="AttentionStore.aggregate"):
        cross_attention_variance([[0.0]], [1])


# -- variance --------------------------------------------------------------------------------
def test_variance_by_hand():
    maps = torch.zeros(1, 1, 2, K)
    maps[0, 0, 0, 1], maps[0, 0, 1, 1] = 0.2, 0.6  # label token 1: values 0.2 and 0.6
    maps[0, 0, 0, 2], maps[0, 0, 1, 2] = 0.4, 0.0  # token 2: 0.4 and 0.0
    # one token: mean 0.4, variance ((0.2-0.4)^2 + (0.6-0.4)^2) / 2 = 0.04
    assert cross_attention_variance(maps, [1]).item() == pytest.approx(0.04)
    # tokens 1 and 2 averaged first: A = (0.3, 0.3), variance 0
    assert cross_attention_variance(maps, [1, 2]).item() == pytest.approx(0.0)


def test_variance_matches_torch_var_and_reductions():
    maps = _cross(b=3)
    ref = torch.stack([maps[b, ..., [4, 8]].mean(-1).var(unbiased=False) for b in range(3)])
    torch.testing.assert_close(cross_attention_variance(maps, [4, 8], reduction="none"), ref)
    torch.testing.assert_close(cross_attention_variance(maps, [4, 8]), ref.mean())
    torch.testing.assert_close(cross_attention_variance(maps, [4, 8], reduction="sum"), ref.sum())
    torch.testing.assert_close(CrossAttentionVariance("none")(maps, [4, 8]), ref)
    # A 1x1 map is defined (no NaN) and constant.
    assert cross_attention_variance(_cross(h=1, w=1), [4]).item() == 0.0


def test_variance_gradcheck():
    maps = _cross(b=2, h=3, w=2).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda m: cross_attention_variance(m, [[1, 2], [5]]), (maps,))


# -- region ----------------------------------------------------------------------------------
def _mask_top_left(b=1, size=8):
    mask = torch.zeros(b, 1, size, size, dtype=torch.float64)
    mask[..., : size // 2, : size // 2] = 1.0
    return mask


def test_region_by_hand():
    maps = torch.zeros(1, 2, 2, K, dtype=torch.float64)
    maps[..., 0] = 1.0  # everything on BOS ...
    label = torch.tensor([[0.5, 0.1], [0.3, 0.1]], dtype=torch.float64)
    maps[0, :, :, 9] = label  # ... except the label token 9
    maps[0, :, :, 0] -= label
    mask = _mask_top_left(size=8)  # at image resolution: factor 4, covers map cell (0, 0)
    share = 0.5 / (0.5 + 0.1 + 0.3 + 0.1)
    assert cross_attention_region(maps, mask, [9]).item() == pytest.approx(share)
    assert cross_attention_region(maps, mask, [9], mode="attract").item() == pytest.approx(
        1 - share
    )
    # A soft mask: half of cell (0, 1) covered too.
    mask[..., :4, 4:6] = 1.0
    share = (0.5 + 0.5 * 0.1) / 1.0
    assert cross_attention_region(maps, mask[:, 0], [9]).item() == pytest.approx(share)


def test_region_moves_with_attention_mass():
    base = _cross(b=1, h=4, w=4, seed=3)
    mask = _mask_top_left(size=16)  # covers map cells [0:2, 0:2]
    tokens = [6]

    def moved(y, x, delta):
        # Shift `delta` of probability between the label token and token 20 at cell (y, x);
        # rows still sum to 1.
        m = base.clone()
        m[0, y, x, 6] += delta
        m[0, y, x, 20] -= delta
        return m

    loss0 = cross_attention_region(base, mask, tokens)
    delta = 0.5 * float(min(base[0, 0, 0, 6], base[0, 3, 3, 6], base[0, 0, 0, 20]))
    out_of_mask = moved(0, 0, -delta)  # less label attention inside
    into_mask = moved(0, 0, +delta)
    outside_more = moved(3, 3, +delta)  # more label attention outside
    assert cross_attention_region(out_of_mask, mask, tokens) < loss0
    assert cross_attention_region(outside_more, mask, tokens) < loss0
    assert cross_attention_region(into_mask, mask, tokens) > loss0
    attract = CrossAttentionRegion("attract")
    assert attract(out_of_mask, mask, tokens) > attract(base, mask, tokens)
    assert attract(into_mask, mask, tokens) < attract(base, mask, tokens)


def test_region_batch_and_broadcast_mask():
    maps = _cross(b=3)
    mask = _mask_top_left(b=1, size=8)
    per = cross_attention_region(maps, mask, [2], reduction="none")
    assert per.shape == (3,)
    for b in range(3):
        a = maps[b, ..., 2]
        torch.testing.assert_close(per[b], a[:2, :2].sum() / a.sum())
    torch.testing.assert_close(
        cross_attention_region(maps, mask.expand(3, -1, -1, -1), [2], reduction="none"), per
    )


def test_region_gradcheck_maps_and_mask():
    maps = _cross(b=2, h=2, w=2).requires_grad_(True)
    g = torch.Generator().manual_seed(4)
    mask = torch.rand(2, 1, 4, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    for mode in ("repel", "attract"):
        assert torch.autograd.gradcheck(
            lambda m, k, mode=mode: cross_attention_region(m, k, [3, 4], mode=mode), (maps, mask)
        )


@pytest.mark.parametrize(
    "mask, match",
    [
        (torch.ones(2, 1, 10, 10), "does not match maps of resolution 4x4"),
        (torch.ones(2, 1, 16, 8), "one integer factor on both axes"),
        (torch.ones(2, 1, 2, 2), "does not match maps of resolution 4x4"),
        (torch.ones(3, 1, 8, 8), "mask has batch 3 but the maps have batch 2"),
        (torch.full((2, 1, 8, 8), 2.0), r"\[0, 1\]"),
        (torch.ones(2, 3, 8, 8), "one channel"),
    ],
)
def test_region_bad_mask(mask, match):
    with pytest.raises(InputError, match=match):
        cross_attention_region(_cross(), mask, [1])


def test_region_bad_mode():
    with pytest.raises(InputError, match="'repel'.*'attract'"):
        cross_attention_region(_cross(), torch.ones(2, 1, 4, 4), [1], mode="hide")
    with pytest.raises(InputError, match="'repel'.*'attract'"):
        CrossAttentionRegion("hide")


# -- self-attention structure ----------------------------------------------------------------
def test_structure_by_hand():
    ref = torch.zeros(1, 1, 2, 2)
    adv = ref.clone()
    adv[0, 0, 0] = torch.tensor([0.5, -0.5])  # squared errors 0.25, 0.25, 0, 0
    assert self_attention_structure(adv, ref).item() == pytest.approx(0.5 / 4)


def test_structure_dict_and_list_average_layers():
    maps = {"down": _self(h=2, w=2, seed=1), "up": _self(h=3, w=2, seed=2)}
    ref = {"up": _self(h=3, w=2, seed=3), "down": _self(h=2, w=2, seed=4)}
    per_layer = [F.mse_loss(maps[k], ref[k]) for k in ("down", "up")]
    torch.testing.assert_close(self_attention_structure(maps, ref), sum(per_layer) / 2)
    as_list = self_attention_structure(
        [maps["down"], maps["up"]], (ref["down"], ref["up"]), reduction="none"
    )
    per_image = torch.stack(
        [
            (F.mse_loss(maps["down"][b], ref["down"][b]) + F.mse_loss(maps["up"][b], ref["up"][b]))
            / 2
            for b in range(2)
        ]
    )
    torch.testing.assert_close(as_list, per_image)


def test_structure_reference_batch_one_broadcasts():
    maps, ref = _self(b=3), _self(b=1, seed=5)
    torch.testing.assert_close(
        self_attention_structure(maps, ref), F.mse_loss(maps, ref.expand(3, -1, -1, -1))
    )


def test_structure_reference_gets_no_grad_and_no_grad_reference_works():
    maps = _self().requires_grad_(True)
    ref = _self(seed=9).requires_grad_(True)
    self_attention_structure(maps, ref).backward()
    assert maps.grad is not None and maps.grad.abs().sum() > 0
    assert ref.grad is None
    with torch.no_grad():
        frozen_ref = _self(seed=9) * 1.0
    adv = _self().requires_grad_(True)
    for _ in range(2):  # reused across iterations
        self_attention_structure({"a": adv}, {"a": frozen_ref}).backward()
    torch.testing.assert_close(adv.grad, 2 * maps.grad)


def test_structure_gradcheck():
    maps = {"a": _self(h=2, w=2).requires_grad_(True), "b": _self(h=1, w=3).requires_grad_(True)}
    ref = {"a": _self(h=2, w=2, seed=1), "b": _self(h=1, w=3, seed=2)}
    assert torch.autograd.gradcheck(
        lambda a, b: self_attention_structure({"a": a, "b": b}, ref), (maps["a"], maps["b"])
    )


@pytest.mark.parametrize(
    "maps, ref, match",
    [
        (
            {"a": _self()},
            {"b": _self()},
            r"missing from reference \['a'\].*only in reference \['b'\]",
        ),
        ([_self(), _self()], [_self()], "2 layers but reference has 1"),
        (_self(h=2, w=3), _self(h=3, w=2), "same layers at the same resolution"),
        (_self(b=2), _self(b=3), "same layers at the same resolution"),
        (_self(), {"a": _self()}, "maps is one tensor but reference is a dict"),
        ({"a": _self()}, [_self()], "maps is a dict but reference is a list"),
        ([_self()], _self(), "maps is a list but reference is a Tensor"),
        (_cross(), _cross(), r"must be self-attention \(B, h, w, h\*w\)"),
        ({}, {}, "no self-attention maps"),
        ("maps", "maps", "tensor"),
    ],
)
def test_structure_errors(maps, ref, match):
    with pytest.raises(InputError, match=match):
        self_attention_structure(maps, ref)


def test_structure_module_stores_reference():
    ref = {"a": _self(seed=1).requires_grad_(True)}
    loss = SelfAttentionStructure(reference=ref)
    assert not loss.reference["a"].requires_grad
    maps = {"a": _self(seed=2)}
    torch.testing.assert_close(loss(maps), self_attention_structure(maps, ref))
    other = {"a": _self(seed=3)}
    torch.testing.assert_close(loss(maps, other), self_attention_structure(maps, other))
    with pytest.raises(InputError, match="no reference"):
        SelfAttentionStructure()(maps)


# -- through a real (tiny) UNet --------------------------------------------------------------
class _RecordingProcessor:
    """A classic attention processor that also keeps its probabilities (batch, heads, q, k)."""

    def __init__(self, name: str, store: dict):
        self.name, self.store = name, store

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None
    ):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(context))
        v = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(q, k, None)  # (B*heads, q, k)
        self.store[self.name] = probs.unflatten(0, (hidden_states.shape[0], attn.heads))
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        return attn.to_out[1](attn.to_out[0](out))


def _run(unet, latent, text):
    store: dict = {}
    for name, module in unet.named_modules():
        if hasattr(module, "set_processor") and hasattr(module, "processor"):
            module.set_processor(_RecordingProcessor(name, store))
    unet(latent, 10, encoder_hidden_states=text)
    cross, selfs = [], {}
    for name, probs in store.items():
        side = int(probs.shape[2] ** 0.5)
        maps = probs.mean(dim=1).unflatten(1, (side, side))  # heads averaged: (B, h, w, key)
        if name.endswith("attn2"):
            cross.append(maps)
        else:
            selfs[name] = maps
    return torch.stack(cross).mean(dim=0), selfs


def test_losses_reach_latent_through_tiny_unet_and_not_its_weights():
    from attnpatch.testing import tiny_unet

    unet = tiny_unet("sd15")  # frozen weights
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(1, 4, 16, 16, generator=g)
    text = torch.randn(1, K, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        _, reference = _run(unet, clean, text)
    delta = torch.zeros_like(clean, requires_grad=True)
    cross, selfs = _run(unet, clean + 0.1 * torch.randn(clean.shape, generator=g) + delta, text)
    assert cross.shape == (1, 8, 8, K) and selfs
    assert all(m.shape == (1, 8, 8, 64) for m in selfs.values())
    mask = torch.zeros(1, 1, 32, 32)  # image resolution: tiny VAE factor 2, map factor 4
    mask[..., 8:20, 4:16] = 1.0
    losses = {
        "variance": cross_attention_variance(cross, [1, 2]),
        "region": cross_attention_region(cross, mask, [1, 2]),
        "structure": self_attention_structure(selfs, reference),
    }
    for name, loss in losses.items():
        (grad,) = torch.autograd.grad(loss, delta, retain_graph=True)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    sum(losses.values()).backward()
    assert all(p.grad is None for p in unet.parameters())
