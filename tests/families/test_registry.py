"""The family registry: lookups, registration rules, the cached layer index and what each
family reads from a model call."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attnpatch.families as fam
from attnpatch.errors import ModelError
from attnpatch.families import (
    CallInfo,
    Family,
    attention_layers,
    family_of,
    get_family,
    image_ids,
    register_family,
    unregister_family,
)
from attnpatch.testing import tiny_unet


def test_lookup_by_class_and_fallbacks(dit_builders):
    assert family_of(tiny_unet()).name == "unet"
    assert family_of(dit_builders["sd3"]()).name == "sd3"
    flux = dit_builders["flux"]()
    assert family_of(flux).name == "flux" and family_of(flux).scheduler == "flow"
    # a block alone: found by its processor
    assert family_of(flux.single_transformer_blocks[0]).name == "flux"
    assert family_of(dit_builders["sd3"]().transformer_blocks[0]).name == "sd3"
    assert family_of(nn.Linear(2, 2)).name == "unet"  # nothing to go by: diffusers' defaults
    with pytest.raises(ModelError, match="no attnpatch model family serves Linear"):
        family_of(nn.Linear(2, 2), strict=True)


def test_a_subclass_is_served_by_its_base_class_family(dit_builders):
    from diffusers import SD3Transformer2DModel

    class MySD3(SD3Transformer2DModel):
        pass

    assert fam.registry._by_type(MySD3).name == "sd3"


def test_registering_a_family():
    class Mine(Family):
        name, places, model_classes = "mine", ("stage",), ("MyNet",)

    class MyNet(nn.Module):
        pass

    before = fam.family_names()
    try:
        register_family(Mine())
        assert family_of(MyNet()).name == "mine" and "stage" in fam.all_places()
        with pytest.raises(ModelError, match="already registered"):
            register_family(Mine())
        with pytest.raises(ModelError, match="already belong"):

            class Other(Family):
                name, model_classes = "other", ("MyNet",)

            register_family(Other())
        with pytest.raises(ModelError, match="Family instance"):
            register_family(Mine)
    finally:
        unregister_family("mine")
    assert fam.family_names() == before
    with pytest.raises(ModelError, match="registered"):
        get_family("mine")


def test_places_of_each_family(dit_builders):
    sd35 = {(x.name, x.place, x.block) for x in attention_layers(dit_builders["sd35"]())}
    assert ("transformer_blocks.0.attn", "joint", 0) in sd35
    assert ("transformer_blocks.1.attn2", "joint", 1) in sd35
    assert len(sd35) == 3 + 2  # three joint attentions, two dual-attention attn2
    flux = [(x.place, x.block) for x in attention_layers(dit_builders["flux"]())]
    assert flux == [("joint", 0), ("joint", 1), ("single", 0), ("single", 1)]
    unet = {x.place for x in attention_layers(tiny_unet("sd15", deep=True))}
    assert unet == {"down", "mid", "up"}


def test_the_layer_index_is_cached_and_invalidated_when_modules_change(dit_builders):
    model = dit_builders["sd3"]()
    first = attention_layers(model)
    assert attention_layers(model) is first  # no second walk
    model.extra = nn.Linear(2, 2)  # any module registration invalidates
    second = attention_layers(model)
    assert second is not first and [x.name for x in second] == [x.name for x in first]
    # surgery that fires no hook: forget() drops the entry
    del model.transformer_blocks[2]
    fam.forget(model)
    assert len(attention_layers(model)) == 2


def test_call_info_of_each_family(dit_builders, sd15):
    sd3 = dit_builders["sd3"]()
    info = get_family("sd3").call_info(
        sd3,
        (),
        {"hidden_states": torch.zeros(1, 4, 8, 6), "encoder_hidden_states": torch.zeros(1, 9, 16)},
    )
    assert info == CallInfo(latent=(8, 6), grid=(4, 3), text=9)
    flux = dit_builders["flux"]()
    packed = torch.zeros(1, 6 * 4, 16)
    ids = image_ids((6, 4), "cpu", torch.float32)
    kw = {"hidden_states": packed, "encoder_hidden_states": torch.zeros(1, 5, 16), "img_ids": ids}
    assert get_family("flux").call_info(flux, (), kw) == CallInfo((12, 8), (6, 4), 5)
    # ids the family did not make are read once from the tensor (the pipeline's own)
    fresh = ids.clone()
    assert get_family("flux").call_info(flux, (), {**kw, "img_ids": fresh}).grid == (6, 4)
    unet_info = get_family("unet").call_info(
        sd15.unet, (torch.zeros(1, 4, 16, 12), 1, torch.zeros(1, 77, 8)), {}
    )
    assert unet_info == CallInfo((16, 12), (16, 12), 77)
