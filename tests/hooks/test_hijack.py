"""hijack(): transparency, restoration on every exit path, nesting, gradients, checkpointing."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from torch.utils.checkpoint import checkpoint as torch_checkpoint

import attnpatch as ap
from attnpatch.hooks.processor import ControlledAttnProcessor
from attnpatch.testing import tiny_unet


class ObserveAll(ap.AttentionControl):
    """Needs every layer, edits nothing, counts calls."""

    def __init__(self):
        self.calls = 0

    def needs(self, site):
        return True

    def __call__(self, probs, site):
        self.calls += 1
        return probs


def unet_inputs(unet, batch=2, hw=(32, 32), requires_grad=False):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, *hw, generator=g).requires_grad_(requires_grad)
    e = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
    e.requires_grad_(requires_grad)
    kw = {}
    if unet.config.addition_embed_type == "text_time":
        kw["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, 16, generator=g),
            "time_ids": torch.randn(batch, 6, generator=g),
        }
    return x, e, kw


def processors(unet):
    return dict(unet.attn_processors)


def assert_restored(unet, before):
    after = unet.attn_processors
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)
    assert not ap.hooks.is_hijacked(unet)


@pytest.mark.parametrize("variant", ["sd15", "sd2", "sdxl"])
@pytest.mark.parametrize("hw", [(32, 32), (32, 24)])
def test_transparent_for_observers(variant, hw, request):
    unet = request.getfixturevalue(variant).unet
    x, e, kw = unet_inputs(unet, hw=hw)
    ref = unet(x, 10, e, **kw).sample
    with ap.hijack(unet, ap.AttentionControl()):
        nothing = unet(x, 10, e, **kw).sample
    observer = ObserveAll()
    with ap.hijack(unet, observer):
        everything = unet(x, 10, e, **kw).sample
    assert observer.calls == len(unet.attn_processors)
    assert torch.equal(nothing, ref)  # unobserved layers run the original processor
    assert (everything - ref).abs().max() <= 1e-5


def test_transparent_in_a_diffusers_pipeline(sd15):
    pipe = sd15.pipeline()
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe(
            ["a photo of a cat", "a red circle"],
            num_inference_steps=3,
            guidance_scale=3.0,
            height=32,
            width=32,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        ).images

    ref = run()
    store = ap.AttentionStore()
    before = processors(sd15.unet)
    with ap.hijack(sd15.unet, store):
        hooked = run()
    assert_restored(sd15.unet, before)
    assert hooked.shape == ref.shape == (2, 3, 32, 32)
    assert (hooked - ref).abs().max() <= 1e-5
    assert store.num_steps == 3  # one UNet call per step (CFG batched)
    assert store.aggregate("cross", 8).shape == (4, 8, 8, 77)  # [uncond; cond] x 2 prompts


def test_restores_on_normal_exit_and_exception(sd15):
    unet = sd15.unet
    before = processors(unet)
    with ap.hijack(unet, ap.AttentionStore()):
        assert ap.hooks.is_hijacked(unet)
        assert all(isinstance(p, ControlledAttnProcessor) for p in unet.attn_processors.values())
    assert_restored(unet, before)
    with pytest.raises(RuntimeError, match="boom"), ap.hijack(unet, ap.AttentionStore()):
        raise RuntimeError("boom")
    assert_restored(unet, before)


def test_restores_on_keyboard_interrupt(sd15):
    unet = sd15.unet
    before = processors(unet)
    with pytest.raises(KeyboardInterrupt), ap.hijack(unet, ap.AttentionStore()):
        raise KeyboardInterrupt
    assert_restored(unet, before)


def test_rolls_back_a_half_done_installation(sd15, monkeypatch):
    unet = sd15.unet
    before = processors(unet)
    real_init = ControlledAttnProcessor.__init__
    made = []

    def failing_init(self, *args, **kwargs):
        if len(made) == 3:
            raise RuntimeError("installation failed")
        made.append(self)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(ControlledAttnProcessor, "__init__", failing_init)
    with pytest.raises(RuntimeError, match="installation failed"):  # noqa: SIM117
        with ap.hijack(unet, ap.AttentionStore()):
            pytest.fail("the body must not run")
    assert_restored(unet, before)


def test_restores_hooks_too(sd15):
    unet = sd15.unet
    hooks = (len(unet._forward_pre_hooks), len(unet._forward_hooks))
    store = ap.AttentionStore()
    with ap.hijack(unet, store):
        pass
    assert (len(unet._forward_pre_hooks), len(unet._forward_hooks)) == hooks
    x, e, kw = unet_inputs(unet)
    unet(x, 1, e)
    assert store.cur_step == 0  # no step hook left behind


def test_nested_hijacks_chain_and_restore_the_outer_state(sd15):
    unet = sd15.unet
    x, e, kw = unet_inputs(unet)
    ref = unet(x, 10, e).sample
    before = processors(unet)
    outer = ap.AttentionStore(kinds=("cross",))
    inner = ap.AttentionStore(kinds=("self",))
    both = ap.AttentionStore()
    with ap.hijack(unet, outer):
        outer_procs = processors(unet)
        with ap.hijack(unet, inner), ap.hijack(unet, both):
            out = unet(x, 10, e).sample
        after_inner = unet.attn_processors
        assert all(after_inner[k] is outer_procs[k] for k in outer_procs)
        unet(x, 10, e)
    assert_restored(unet, before)
    assert (out - ref).abs().max() <= 1e-5
    assert inner.num_steps == both.num_steps == 1 and outer.num_steps == 2
    assert {s.kind for s in outer.sites()} == {"cross"}
    assert {s.kind for s in inner.sites()} == {"self"}
    torch.testing.assert_close(outer.aggregate("cross", 16), both.aggregate("cross", 16) * 1.0)


def test_nesting_the_same_controller_is_refused(sd15):
    store = ap.AttentionStore()
    before = processors(sd15.unet)
    with ap.hijack(sd15.unet, store), pytest.raises(ap.AttnPatchError, match="already hijacks"):  # noqa: SIM117
        with ap.hijack(sd15.unet, store):
            pass
    assert_restored(sd15.unet, before)


def test_bad_arguments(sd15):
    with pytest.raises(ap.AttnPatchError, match="AttentionControl"):  # noqa: SIM117
        with ap.hijack(sd15.unet, object()):
            pass
    with pytest.raises(ap.AttnPatchError, match="no attention modules"):  # noqa: SIM117
        with ap.hijack(torch.nn.Linear(2, 2), ap.AttentionStore()):
            pass


def test_step_counter_follows_unet_calls(sd15):
    unet = sd15.unet
    x, e, _ = unet_inputs(unet)
    store = ap.AttentionStore(steps={1, 2}, per_step=True)
    with ap.hijack(unet, store):
        for t in (30, 20, 10, 1):
            unet(x, t, e)
    assert store.cur_step == 4
    assert list(store.step_maps("cross", 16)) == [1, 2]


@pytest.mark.parametrize("variant", ["sd15", "sd2", "sdxl"])
def test_gradients_flow_from_stored_maps_to_latent_and_text(variant, request):
    unet = request.getfixturevalue(variant).unet
    x, e, kw = unet_inputs(unet, requires_grad=True)
    store = ap.AttentionStore()
    with ap.hijack(unet, store):
        unet(x, 10, e, **kw)
    loss = store.aggregate("cross", 16)[..., 5].pow(2).sum() + store.aggregate("self", 16).var()
    loss.backward()
    for t in (x, e):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
    assert all(p.grad is None for p in unet.parameters())  # frozen weights get nothing


def _run_two_steps(unet, controller, checkpointing, backward_inside):
    """Two UNet calls under hijack; loss on the stored maps; returns grads and maps."""
    x, e, kw = unet_inputs(unet, requires_grad=True)
    unet.zero_grad(set_to_none=True)
    store = ap.AttentionStore(per_step=True)
    control = ap.ComposeControl(controller, store) if controller else store
    if checkpointing:
        unet.enable_gradient_checkpointing()
    try:
        with ap.hijack(unet, control):
            h = unet(x, 20, e, **kw).sample
            out = unet(h, 10, e, **kw).sample
            loss = store.aggregate("cross", 16)[..., 3].pow(2).sum() + out.pow(2).mean()
            loss = loss + store.aggregate("self", 16).pow(2).sum()
            if backward_inside:
                loss.backward()
        if not backward_inside:
            loss.backward()  # the attack's order: hijack removed, then the loss processed
    finally:
        unet.disable_gradient_checkpointing()
    maps = {k: v.detach() for k, v in store.step_maps("cross", 16).items()}
    return x.grad, e.grad, maps, control.cur_step, store.num_steps, loss.detach()


@pytest.mark.parametrize("backward_inside", [True, False])
@pytest.mark.parametrize(
    "variant, editor",
    [
        ("sd15", None),
        ("sd15", lambda: ap.ReweightCrossAttention([3, 4], 2.5, steps={0})),
        ("sd2", lambda: ap.ReweightCrossAttention([3, 4], 2.5, steps={0})),
        ("sdxl", lambda: ap.ReweightCrossAttention([3, 4], 2.5, steps={0})),
    ],
    ids=["sd15-store", "sd15-step-edit", "sd2-step-edit", "sdxl-step-edit"],
)
def test_gradient_checkpointing_is_replayed_exactly(variant, backward_inside, editor):
    unet = tiny_unet(variant).train()  # train mode: dropout is 0, but checkpointing is active
    ref = _run_two_steps(unet, editor and editor(), False, backward_inside)
    got = _run_two_steps(unet, editor and editor(), True, backward_inside)
    assert got[3] == ref[3] == 2 and got[4] == ref[4] == 2  # steps not advanced by recomputes
    assert got[2].keys() == ref[2].keys() == {0, 1}  # maps stored once per step
    for step in ref[2]:
        torch.testing.assert_close(got[2][step], ref[2][step], rtol=0, atol=1e-6)
    torch.testing.assert_close(got[5], ref[5])
    for g, r in zip(got[:2], ref[:2]):
        assert r.abs().sum() > 0
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


def test_checkpointing_actually_recomputes_processors(sd15):
    unet = tiny_unet("sd15")
    x, e, _ = unet_inputs(unet, requires_grad=True)
    observer = ObserveAll()
    unet.enable_gradient_checkpointing()
    with ap.hijack(unet, observer):
        out = unet(x, 10, e).sample
    forward_calls = observer.calls
    out.sum().backward()
    assert forward_calls == len(unet.attn_processors)
    assert observer.calls == 2 * forward_calls  # every layer replayed once in backward
    assert observer.cur_step == 1


def test_unmanaged_checkpoint_recompute_is_an_error(sd15):
    unet = sd15.unet
    x, e, _ = unet_inputs(unet, requires_grad=True)
    with ap.hijack(unet, ap.AttentionStore()):
        out = torch_checkpoint(lambda a, b: unet(a, 10, b).sample, x, e, use_reentrant=False)
        with pytest.raises(ap.AttnPatchError, match="recomputed during backward"):
            out.sum().backward()


def test_edit_reaches_the_output(sd15):
    unet = sd15.unet
    x, e, _ = unet_inputs(unet)
    ref = unet(x, 10, e).sample
    with ap.hijack(unet, ap.ReweightCrossAttention([1, 2, 3], 1.0)):
        same = unet(x, 10, e).sample
    with ap.hijack(unet, ap.ReweightCrossAttention([1, 2, 3], 0.0)):
        edited = unet(x, 10, e).sample
    assert (same - ref).abs().max() <= 1e-5
    assert (edited - ref).abs().max() > 1e-3


def test_unobserved_layers_keep_a_custom_original_processor(sd15):
    """Layers a controller does not need run whatever processor the user had installed."""
    unet = tiny_unet("sd15")
    unet.set_attn_processor(AttnProcessor())
    x, e, _ = unet_inputs(unet)
    ref = unet(x, 10, e).sample
    with ap.hijack(unet, ap.AttentionStore(kinds=("cross",))):
        out = unet(x, 10, e).sample
        kinds = {type(p.original) for p in unet.attn_processors.values()}
    assert kinds == {AttnProcessor}
    assert (out - ref).abs().max() <= 1e-5
    assert all(type(p) is AttnProcessor for p in unet.attn_processors.values())
    unet.set_attn_processor(AttnProcessor2_0())


def test_checkpointing_enabled_inside_the_block_is_refused():
    unet = tiny_unet("sd15")
    x, e, _ = unet_inputs(unet, requires_grad=True)
    try:
        with ap.hijack(unet, ap.AttentionStore()):
            unet.enable_gradient_checkpointing()
            with pytest.raises(ap.AttnPatchError, match="before entering the block"):
                unet(x, 10, e)
            with torch.no_grad():
                unet(x, 10, e)  # without grad nothing is recomputed: allowed
    finally:
        unet.disable_gradient_checkpointing()


def test_diffusers_checkpoint_function_is_swapped_only_inside_the_block():
    """Pins the private diffusers attribute the replay swaps: the same object is back after."""
    unet = tiny_unet("sd15")
    unet.enable_gradient_checkpointing()
    try:
        blocks = [b for b in unet.modules() if getattr(b, "gradient_checkpointing", False)]
        before = [b._gradient_checkpointing_func for b in blocks]
        assert blocks
        with ap.hijack(unet, ap.AttentionStore()):
            assert all(b._gradient_checkpointing_func is not f for b, f in zip(blocks, before))
        assert all(b._gradient_checkpointing_func is f for b, f in zip(blocks, before))
    finally:
        unet.disable_gradient_checkpointing()
