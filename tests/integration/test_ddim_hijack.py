"""ddim_denoise under hijack, with checkpoint=True: maps stored once, with the right gradients,
even when backward() runs after the hijack block has exited (the attack's natural order)."""

from __future__ import annotations

import pytest
import torch

import attnpatch as ap


def run(sd, *, checkpoint, backward_after_exit, editor=None, guidance=1.0):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 32, 32, generator=g, requires_grad=True)
    z0 = ap.vae_encode(sd.vae, ap.to_diffusion_input(images, multiple=2))
    embeds = ap.encode_prompt(sd.tokenizer, sd.text_encoder, ["a photo of a cat", "a red star"])
    kw = dict(num_inference_steps=6, num_steps=3, checkpoint=checkpoint)
    zT = ap.ddim_invert(sd.unet, sd.scheduler, z0, embeds.cond, **kw)
    store = ap.AttentionStore(per_step=True)
    control = ap.ComposeControl(editor, store) if editor is not None else store
    with ap.hijack(sd.unet, control):
        out = ap.ddim_denoise(
            sd.unet,
            sd.scheduler,
            zT,
            embeds.cond,
            uncond=embeds.uncond,
            guidance_scale=guidance,
            **kw,
        )
        loss = (
            store.aggregate("cross", 8)[..., 4].var() + store.aggregate("self", 8).square().mean()
        )
        loss = loss + out.square().mean()
        if not backward_after_exit:
            loss.backward()
    assert not ap.hooks.is_hijacked(sd.unet)
    if backward_after_exit:
        loss.backward()
    assert not ap.hooks.is_hijacked(sd.unet)  # the recompute put the originals back
    steps = {k: v.detach() for k, v in store.step_maps("cross", 8).items()}
    return images.grad, steps, control.cur_step, loss.detach()


@pytest.mark.parametrize("backward_after_exit", [True, False])
@pytest.mark.parametrize(
    "editor, guidance",
    [(None, 1.0), (lambda: ap.ReweightCrossAttention([4], 3.0, steps={1}), 2.5)],
    ids=["store", "step-edit+cfg"],
)
def test_checkpointed_denoise_under_hijack(sd15, backward_after_exit, editor, guidance):
    ref = run(
        sd15,
        checkpoint=False,
        backward_after_exit=backward_after_exit,
        editor=editor and editor(),
        guidance=guidance,
    )
    got = run(
        sd15,
        checkpoint=True,
        backward_after_exit=backward_after_exit,
        editor=editor and editor(),
        guidance=guidance,
    )
    assert got[2] == ref[2] == 3  # three denoising calls; recomputes advance nothing
    assert list(got[1]) == list(ref[1]) == [0, 1, 2]  # stored once per step
    for step in ref[1]:
        torch.testing.assert_close(got[1][step], ref[1][step], rtol=0, atol=1e-6)
    torch.testing.assert_close(got[3], ref[3])
    assert ref[0].abs().sum() > 0
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-8)


def test_checkpointed_maps_carry_gradients(sd15):
    grad, steps, _, _ = run(sd15, checkpoint=True, backward_after_exit=True)
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
