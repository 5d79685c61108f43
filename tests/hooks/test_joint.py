"""Joint attention under hijack (SD3, SD3.5's dual attention, Flux's double- and single-stream
blocks): exact when observing, the blocks where the family says they are, edits, stores,
restoration and gradients, as tests/hooks/test_hijack.py checks them for UNets."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

import attnpatch as ap
from attnpatch.families import CallInfo, predict
from attnpatch.hooks import ControlledAttnProcessor, ControlledRotaryProcessor
from attnpatch.hooks.processor import HijackState

VARIANTS = ["sd3", "sd35", "flux", "flux-dev"]
#: latent (h, w) -> token grid: SD3 patch 2, Flux 2x2 packing; non-square on purpose
LATENT, GRID, TEXT = (8, 6), (4, 3), 7


@pytest.fixture(scope="module")
def models(dit_builders):
    return {v: dit_builders[v]() for v in VARIANTS}


def inputs(model, batch=2, latent=LATENT, text=TEXT, requires_grad=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    channels = model.config.in_channels if "SD3" in type(model).__name__ else 4
    x = torch.randn(batch, channels, *latent, generator=g).requires_grad_(requires_grad)
    cond = torch.randn(batch, text, 16, generator=g).requires_grad_(requires_grad)
    pooled = torch.randn(batch, 12, generator=g)
    guidance = 3.5 if model.config.get("guidance_embeds") else None
    return x, cond, pooled, guidance


def run(model, x, cond, pooled, guidance, t=500.0):
    return predict(model, x, t, cond, pooled, guidance=guidance)


class ObserveAll(ap.AttentionControl):
    """Needs every site (all five blocks of a joint layer), edits nothing."""

    def __init__(self):
        self.seen = []

    def needs(self, site):
        return True

    def __call__(self, probs, site):
        self.seen.append((site, probs.detach()))
        return probs


def processors(model):
    return dict(model.attn_processors)


def assert_restored(model, before):
    after = model.attn_processors
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)
    assert not ap.hooks.is_hijacked(model)


@pytest.mark.parametrize("variant", VARIANTS)
def test_transparent_for_observers(models, variant):
    model = models[variant]
    args = inputs(model)
    ref = run(model, *args)
    with ap.hijack(model, ap.AttentionControl()):
        nothing = run(model, *args)
    observer = ObserveAll()
    with ap.hijack(model, observer):
        everything = run(model, *args)
    assert torch.equal(nothing, ref)  # unobserved layers run the original processor
    assert (everything - ref).abs().max() <= 1e-5
    joint = [s for s, _ in observer.seen if s.joint is not None]
    layers = {s.name for s, _ in observer.seen}
    assert len(layers) == len(model.attn_processors)
    assert len(joint) == 5 * len({s.name for s in joint})  # full, cross, self, text_*
    for site, probs in observer.seen:
        assert probs.shape == (2, *site.probs_shape)
        assert site.resolution == GRID
        if site.kind == "full":
            torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))


@pytest.mark.parametrize("variant", VARIANTS)
def test_blocks_are_the_image_and_text_parts_of_one_softmax(models, variant):
    model = models[variant]
    observer = ObserveAll()
    with ap.hijack(model, observer):
        run(model, *inputs(model))
    n = GRID[0] * GRID[1]
    by_layer = {}
    for site, probs in observer.seen:
        by_layer.setdefault(site.name, {})[site.kind] = (site, probs)
    text_first = variant.startswith("flux")
    for name, parts in by_layer.items():
        if "full" not in parts:
            assert set(parts) == {"self"} and name.endswith("attn2")  # SD3.5's image-only attn
            continue
        site, full = parts["full"]
        img = slice(TEXT, TEXT + n) if text_first else slice(0, n)
        txt = slice(0, TEXT) if text_first else slice(n, n + TEXT)
        assert (site.joint.image_slice, site.joint.text_slice) == (img, txt)
        assert parts["cross"][0].is_cross and parts["cross"][1].shape == (2, 2, n, TEXT)
        torch.testing.assert_close(parts["cross"][1], full[:, :, img, txt])
        torch.testing.assert_close(parts["self"][1], full[:, :, img, img])
        torch.testing.assert_close(parts["text_cross"][1], full[:, :, txt, img])
        torch.testing.assert_close(parts["text_self"][1], full[:, :, txt, txt])
        rows = parts["text_cross"][1].sum(-1) + parts["text_self"][1].sum(-1)
        torch.testing.assert_close(rows, torch.ones_like(rows))


def _image_only_reference(attn, image, rotary=None):
    """The module's attention over the image tokens alone (no text keys): SD3's processor runs
    it itself (``encoder_hidden_states=None``); Flux's double-stream processor cannot, so its
    image-only attention is written out from the module's own projections and diffusers'
    rotary embedding."""
    if not hasattr(attn, "head_dim"):  # SD3's Attention
        return attn(hidden_states=image)
    from diffusers.models.embeddings import apply_rotary_emb

    def heads(x):
        return x.unflatten(-1, (-1, attn.head_dim))

    q, k = attn.norm_q(heads(attn.to_q(image))), attn.norm_k(heads(attn.to_k(image)))
    v = heads(attn.to_v(image))
    q = apply_rotary_emb(q, rotary, sequence_dim=1)
    k = apply_rotary_emb(k, rotary, sequence_dim=1)
    o = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    )
    return attn.to_out[1](attn.to_out[0](o.transpose(1, 2).flatten(2)))


def _drop_text(site_kind="full"):
    """Zero the text columns of the image rows and renormalise: image tokens then attend to
    image tokens only, whatever the order of the sequence."""
    return ap.ReweightCrossAttention(list(range(TEXT)), 0.0, renormalize=True)


@pytest.mark.parametrize("variant", ["sd3", "flux"])
def test_an_edit_of_the_text_columns_lands_on_the_image_rows(models, variant):
    """Exact reference for where image and text sit: removing the text keys of the image rows
    must give the module's own image-only attention."""
    model = models[variant]
    g = torch.Generator().manual_seed(0)
    n = GRID[0] * GRID[1]
    image = torch.randn(2, n, 16, generator=g)
    text = torch.randn(2, TEXT, 16, generator=g)
    block = model.transformer_blocks[0]
    attn = block.attn
    state = HijackState(_drop_text(), ap.families.family_of(model))
    state.call = CallInfo(grid=GRID, text=TEXT)
    rotary = None
    if variant == "flux":
        ids = torch.cat([torch.zeros(TEXT, 3), ap.families.image_ids(GRID, "cpu", torch.float32)])
        rotary = model.pos_embed(ids)
    kind = ControlledRotaryProcessor if variant == "flux" else ControlledAttnProcessor
    original = attn.processor
    attn.set_processor(
        kind(state.controller, name="transformer_blocks.0.attn", state=state, original=original)
    )
    try:
        if variant == "flux":
            got, _ = attn(hidden_states=image, encoder_hidden_states=text, image_rotary_emb=rotary)
        else:
            got, _ = attn(hidden_states=image, encoder_hidden_states=text)
    finally:
        attn.set_processor(original)
    image_rotary = None if rotary is None else tuple(r[TEXT:] for r in rotary)
    ref = _image_only_reference(attn, image, image_rotary)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_flux_single_stream_text_length_comes_from_the_call(models):
    model = models["flux"]
    single = model.single_transformer_blocks[0]
    observer = ObserveAll()
    with ap.hijack(model, observer):
        run(model, *inputs(model, text=5))
    sites = [s for s, _ in observer.seen if s.name.startswith("single_transformer_blocks.0.")]
    cross = next(s for s in sites if s.kind == "cross")
    assert (cross.place, cross.block, cross.key_len, cross.query_len) == ("single", 0, 5, 12)
    assert cross.joint.text == (0, 5) and cross.joint.image == (5, 17)
    # outside hijack nobody records the call: observing refuses with the fix
    processor = ControlledRotaryProcessor(ObserveAll(), name="single_transformer_blocks.0.attn")
    original = single.attn.processor
    single.attn.set_processor(processor)
    try:
        with pytest.raises(ap.errors.HookError, match="under attnpatch.hijack"):
            single.attn(hidden_states=torch.randn(1, 17, 16))
    finally:
        single.attn.set_processor(original)


@pytest.mark.parametrize("variant", VARIANTS)
def test_store_aggregates_cross_maps_at_the_token_grid(models, variant):
    model = models[variant]
    raw, store = ObserveAll(), ap.AttentionStore(per_step=True)
    args = inputs(model)
    with ap.hijack(model, ap.ComposeControl(raw, store)):
        run(model, *args, t=700.0)
        run(model, *args, t=300.0)
    assert ap.hooks.pick_cross_resolution(store.sites()) == GRID
    for kind, keys in (("cross", TEXT), ("self", GRID[0] * GRID[1])):
        picked = [p for s, p in raw.seen if s.kind == kind]
        expected = torch.stack(picked).mean(dim=(0, 2)).reshape(2, *GRID, keys)
        got = store.aggregate(kind, GRID)
        assert got.shape == (2, *GRID, keys)
        torch.testing.assert_close(got, expected)
    assert list(store.step_maps("cross", GRID)) == [0, 1] and store.num_steps == 2
    places = {s.place for s in store.sites()}
    assert places == ({"joint", "single"} if variant.startswith("flux") else {"joint"})
    # the existing losses take the maps unchanged
    loss = ap.losses.cross_attention_variance(store.aggregate("cross", GRID), [2, 3])
    assert torch.isfinite(loss)


def test_sd35_attn2_shares_one_processor_object_and_gets_it_back(models):
    model = models["sd35"]
    block = model.transformer_blocks[0]
    assert block.attn.processor is block.attn2.processor  # diffusers' sharing
    before = processors(model)
    store = ap.AttentionStore(kinds=("self",))
    with ap.hijack(model, store):
        assert block.attn.processor is not block.attn2.processor  # one controller each
        assert block.attn.processor.original is block.attn2.processor.original
        run(model, *inputs(model))
    assert_restored(model, before)
    assert block.attn.processor is block.attn2.processor
    names = {s.name for s in store.sites("self")}
    assert "transformer_blocks.0.attn2" in names and "transformer_blocks.0.attn" in names
    assert all(s.place == "joint" for s in store.sites())


@pytest.mark.parametrize("variant", ["sd35", "flux"])
def test_restores_on_every_exit_path(models, variant, monkeypatch):
    model = models[variant]
    before = processors(model)
    with ap.hijack(model, ap.AttentionStore()):
        assert ap.hooks.is_hijacked(model)
    assert_restored(model, before)
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)), ap.hijack(model, ap.AttentionStore()):
            raise exc
        assert_restored(model, before)
    kind = ControlledRotaryProcessor if variant == "flux" else ControlledAttnProcessor
    real_init, made = kind.__init__, []

    def failing_init(self, *args, **kwargs):
        if len(made) == 2:
            raise RuntimeError("installation failed")
        made.append(self)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(kind, "__init__", failing_init)
    with pytest.raises(RuntimeError, match="installation failed"):  # noqa: SIM117
        with ap.hijack(model, ap.AttentionStore()):
            pytest.fail("the body must not run")
    assert_restored(model, before)


@pytest.mark.parametrize("variant", ["sd3", "flux"])
def test_nested_hijacks_chain(models, variant):
    model = models[variant]
    args = inputs(model)
    ref = run(model, *args)
    before = processors(model)
    outer, inner = ap.AttentionStore(kinds=("cross",)), ap.AttentionStore(kinds=("self",))
    with ap.hijack(model, outer):
        outer_procs = processors(model)
        with ap.hijack(model, inner):
            out = run(model, *args)
        assert all(model.attn_processors[k] is outer_procs[k] for k in outer_procs)
    assert_restored(model, before)
    assert (out - ref).abs().max() <= 1e-5
    assert {s.kind for s in outer.sites()} == {"cross"} and {s.kind for s in inner.sites()} == {
        "self"
    }


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_flow_from_stored_maps_to_latents_and_text(models, variant):
    model = models[variant].requires_grad_(False)
    x, cond, pooled, guidance = inputs(model, requires_grad=True)
    store = ap.AttentionStore()
    with ap.hijack(model, store):
        run(model, x, cond, pooled, guidance)
    loss = store.aggregate("cross", GRID)[..., 2].pow(2).sum() + store.aggregate("self", GRID).var()
    loss.backward()
    for t in (x, cond):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("variant", ["sd3", "flux"])
def test_edits_reach_the_output(models, variant):
    model = models[variant]
    args = inputs(model)
    ref = run(model, *args)
    with ap.hijack(model, ap.ReweightCrossAttention([1, 2, 3], 1.0)):
        same = run(model, *args)
    with ap.hijack(model, ap.ReweightCrossAttention([1, 2, 3], 0.0)):
        edited = run(model, *args)
    with ap.hijack(model, ap.ReweightCrossAttention([1, 2, 3], 3.0, renormalize=True)):
        renormalized = run(model, *args)
    assert (same - ref).abs().max() <= 1e-5
    assert (edited - ref).abs().max() > 1e-4
    assert (renormalized - ref).abs().max() > 1e-4


def test_text_rows_for_a_controller_that_asks(models):
    """A controller asks for the text rows through needs(): here it damps what the text tokens
    attend to among the image tokens, and the image-only parts are untouched."""

    class TextToImage(ap.AttentionControl):
        def __init__(self):
            self.seen = []

        def needs(self, site):
            return site.kind == "text_cross"

        def __call__(self, probs, site):  # (B, heads, T, N)
            self.seen.append(probs.shape)
            return probs * 0.5

    model = models["sd3"]
    args = inputs(model)
    ref = run(model, *args)
    control = TextToImage()
    with ap.hijack(model, control):
        out = run(model, *args)
    assert control.seen and all(s == (2, 2, TEXT, GRID[0] * GRID[1]) for s in control.seen)
    assert (out - ref).abs().max() > 1e-5  # the text stream carries the edit to later blocks


def test_unobserved_layers_keep_their_processors_and_backend(models):
    model = models["flux"]
    for p in model.attn_processors.values():
        p._attention_backend = "native"  # what set_attention_backend("native") sets
    args = inputs(model)
    ref = run(model, *args)
    before = processors(model)
    with ap.hijack(model, ap.AttentionStore(places=("single",))):
        originals = [p.original for p in model.attn_processors.values()]
        out = run(model, *args)
    assert [id(p) for p in originals] == [id(p) for p in before.values()]
    assert_restored(model, before)
    assert all(p._attention_backend == "native" for p in model.attn_processors.values())
    assert (out - ref).abs().max() <= 1e-5
    for p in model.attn_processors.values():
        p._attention_backend = None


def test_observing_a_layer_whose_processor_cannot_be_reproduced_is_refused(dit_builders):
    model = dit_builders["sd3"]()
    model.transformer_blocks[0].attn.set_processor(AttnProcessor2_0())  # not joint maths
    with (
        ap.hijack(model, ap.AttentionStore()),
        pytest.raises(ap.errors.HookError, match="reproduce"),
    ):
        run(model, *inputs(model))


@pytest.mark.parametrize("variant", ["sd3", "flux"])
def test_in_a_diffusers_pipeline(models, variant):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    model = models[variant]
    names = ["vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"]
    if variant == "sd3":
        names += ["text_encoder_3", "tokenizer_3"]
        cls = StableDiffusion3Pipeline
    else:
        cls = FluxPipeline
    pipe = cls(
        transformer=model, scheduler=FlowMatchEulerDiscreteScheduler(), **dict.fromkeys(names)
    )
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    kw = dict(
        prompt_embeds=torch.randn(1, TEXT, 16, generator=g),
        pooled_prompt_embeds=torch.randn(1, 12, generator=g),
    )
    if variant == "sd3":
        kw.update(
            negative_prompt_embeds=torch.zeros(1, TEXT, 16),
            negative_pooled_prompt_embeds=torch.zeros(1, 12),
            guidance_scale=2.0,
        )
    size = dict(
        height=8 * LATENT[0], width=8 * LATENT[1], num_inference_steps=3, output_type="latent"
    )

    def call():
        return pipe(**kw, **size, generator=torch.Generator().manual_seed(1)).images

    ref = call()
    store = ap.AttentionStore()
    before = processors(model)
    with ap.hijack(model, store):
        hooked = call()
    assert_restored(model, before)
    assert (hooked - ref).abs().max() <= 1e-5
    assert store.num_steps == 3
    rows = 2 if variant == "sd3" else 1  # SD3's CFG batch [uncond; cond]
    assert store.aggregate("cross", GRID).shape == (rows, *GRID, TEXT)


@pytest.mark.parametrize("variant", ["sd3", "flux"])
def test_half_precision_gives_float32_maps_and_gradients(dit_builders, variant):
    model = dit_builders[variant]().to(torch.bfloat16).requires_grad_(False)
    x, cond, pooled, guidance = (
        t.to(torch.bfloat16) if isinstance(t, torch.Tensor) else t for t in inputs(model)
    )
    x.requires_grad_(True)
    ref = run(model, x, cond, pooled, guidance)
    store = ap.AttentionStore()
    with ap.hijack(model, store):
        out = run(model, x, cond, pooled, guidance)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref.float()).abs().max() <= 0.05 * ref.float().abs().max()
    maps = store.aggregate("cross", GRID)
    assert maps.dtype == torch.float32  # what a controller reads keeps float32 precision
    maps[..., 2].var().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
