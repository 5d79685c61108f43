"""ControlledAttnProcessor against diffusers' own processors, on bare Attention modules."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

import attnpatch as ap
from attnpatch.hooks.processor import ControlledAttnProcessor, attention_probs


class Record(ap.AttentionControl):
    def __init__(self):
        self.seen = []

    def needs(self, site):
        return True

    def __call__(self, probs, site):
        self.seen.append((site, probs))
        return probs


def make_attention(**kwargs):
    torch.manual_seed(0)
    defaults = dict(query_dim=8, heads=2, dim_head=4)
    return Attention(**{**defaults, **kwargs}).eval()


CASES = {
    "self": dict(),
    "cross": dict(cross_attention_dim=6),
    "custom-scale": dict(scale_qk=False),  # attn.scale = 1.0, which SDPA would ignore
    "upcast": dict(upcast_attention=True, upcast_softmax=True),
    "residual-rescale-groupnorm": dict(
        residual_connection=True, rescale_output_factor=2.0, norm_num_groups=2
    ),
    "norm-cross": dict(cross_attention_dim=6, cross_attention_norm="layer_norm"),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("masked", [False, True])
def test_matches_classic_attention_processor(case, masked):
    """diffusers' classic AttnProcessor honours attn.scale, upcasting and masks: the reference."""
    attn = make_attention(**CASES[case])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 12, 8, generator=g)
    if case == "residual-rescale-groupnorm":
        x = torch.randn(2, 8, 3, 4, generator=g)  # the VAE's 4-D call convention
    ehs = torch.randn(2, 5, 6, generator=g) if "cross_attention_dim" in CASES[case] else None
    keys = 5 if ehs is not None else 12
    mask = None
    if masked:
        mask = torch.zeros(2, 1, keys)
        mask[0, 0, -2:] = -10000.0
    attn.set_processor(AttnProcessor())
    ref = attn(x, encoder_hidden_states=ehs, attention_mask=mask)
    record = Record()
    attn.set_processor(ControlledAttnProcessor(record, name="mid_block.attn1"))
    out = attn(x, encoder_hidden_states=ehs, attention_mask=mask)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    (site, probs) = record.seen[0]
    assert probs.shape == (2, 2, 12, keys) == (2, *site.probs_shape)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 12))
    if masked:
        assert probs[0, :, :, -2:].max() < 1e-4  # masked keys get no attention
    assert site.place == "mid" and site.is_cross == (ehs is not None)


def test_unneeded_layers_run_the_original_processor_bit_for_bit():
    attn = make_attention()
    x = torch.randn(2, 12, 8)
    attn.set_processor(AttnProcessor2_0())
    ref = attn(x)
    calls = []

    class Never(ap.AttentionControl):
        def needs(self, site):
            calls.append(site)
            return False

    attn.set_processor(ControlledAttnProcessor(Never(), name="down_blocks.0.attn1"))
    assert torch.equal(attn(x), ref)
    assert calls[0].query_len == 12 and calls[0].resolution is None  # no latent size known


def test_attention_probs_reference():
    attn = make_attention(upcast_attention=True)
    q, k = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 7, 4)
    expected = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1)
    torch.testing.assert_close(attention_probs(attn, q, k), expected)
    mask = torch.zeros(1, 1, 1, 7)
    mask[..., 0] = float("-inf")
    assert attention_probs(attn, q, k, mask)[..., 0].abs().max() == 0


def test_gradient_reaches_inputs_through_observed_path():
    attn = make_attention(cross_attention_dim=6).requires_grad_(False)
    x = torch.randn(1, 12, 8, requires_grad=True)
    ehs = torch.randn(1, 5, 6, requires_grad=True)
    record = Record()
    attn.set_processor(ControlledAttnProcessor(record, name="up_blocks.1.attn2"))
    attn(x, encoder_hidden_states=ehs)
    record.seen[0][1][..., 2].sum().backward()
    assert x.grad.abs().sum() > 0 and ehs.grad.abs().sum() > 0
    assert all(p.grad is None for p in attn.parameters())


def test_tuple_encoder_states_are_refused_when_observed():
    attn = make_attention(cross_attention_dim=6)
    attn.set_processor(ControlledAttnProcessor(Record(), name="down_blocks.0.attn2"))
    ehs = (torch.randn(1, 5, 6), [torch.randn(1, 4, 6)])
    with pytest.raises(ap.AttnPatchError, match="IP-Adapter"):
        attn.processor(attn, torch.randn(1, 12, 8), encoder_hidden_states=ehs)


def test_unknown_original_processor_is_refused_when_observed():
    class Exotic:
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
            return hidden_states

    attn = make_attention()
    proc = ControlledAttnProcessor(Record(), name="down_blocks.0.attn1", original=Exotic())
    attn.set_processor(proc)
    with pytest.raises(ap.AttnPatchError, match="Exotic"):
        attn(torch.randn(1, 12, 8))
    # ...but it keeps running when nobody observes the layer:
    attn.set_processor(
        ControlledAttnProcessor(ap.AttentionControl(), name="x.attn1", original=Exotic())
    )
    x = torch.randn(1, 12, 8)
    assert torch.equal(attn(x), x)


def test_controller_returning_a_wrong_shape_is_an_error():
    class Bad(ap.AttentionControl):
        def needs(self, site):
            return True

        def __call__(self, probs, site):
            return probs.mean(dim=1)

    attn = make_attention()
    attn.set_processor(ControlledAttnProcessor(Bad(), name="down_blocks.0.attn1"))
    with pytest.raises(ap.AttnPatchError, match="must return probabilities of the shape"):
        attn(torch.randn(1, 12, 8))
