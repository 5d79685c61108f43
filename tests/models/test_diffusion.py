"""Tests for attnpatch.models.diffusion: local diffusers folders, conversion, checks."""

from __future__ import annotations

import types

import pytest
import torch

from attnpatch.diffusion import DiffusionParts
from attnpatch.errors import AttnPatchError, InputError, ModelError
from attnpatch.models import load_diffusion, register_diffusion
from attnpatch.testing import save_tiny_sd

# --------------------------------------------------------------------------- diffusion stacks


def _sdxl_kwargs(unet, batch: int) -> dict:
    pooled = (
        unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    )
    return {
        "added_cond_kwargs": {
            "text_embeds": torch.randn(batch, pooled),
            "time_ids": torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]).expand(batch, 6),
        }
    }


@pytest.mark.parametrize("variant", ["sd15", "sd2", "sdxl"])
def test_folder_round_trip_gives_identical_unet_outputs(variant, tmp_path):
    name = "tiny" if variant == "sd15" else f"tiny-{variant}"
    original = load_diffusion(name)
    assert original.variant == variant
    folder = save_tiny_sd(original, tmp_path / variant)
    loaded = load_diffusion(folder)
    assert isinstance(loaded, DiffusionParts) and loaded.variant == variant
    assert type(loaded.scheduler).__name__ == "DDIMScheduler"
    assert loaded.scheduler.config.prediction_type == original.scheduler.config.prediction_type
    assert loaded.text_encoder_2 is None and len(loaded.text_encoders) == 1
    for m in loaded.modules():
        assert not m.training and all(not p.requires_grad for p in m.parameters())
    x = torch.randn(2, 4, 16, 16)
    ids = original.tokenizer(["a photo of a star"] * 2, padding="max_length", return_tensors="pt")
    with torch.no_grad():
        h1 = original.text_encoder(ids.input_ids).last_hidden_state
        h2 = loaded.text_encoder(ids.input_ids).last_hidden_state
        torch.testing.assert_close(h1, h2, rtol=0, atol=0)
        kw = _sdxl_kwargs(original.unet, 2) if variant == "sdxl" else {}
        out1 = original.unet(x, 500, encoder_hidden_states=h1, **kw).sample
        out2 = loaded.unet(x, 500, encoder_hidden_states=h1, **kw).sample
    torch.testing.assert_close(out1, out2, rtol=0, atol=0)


def test_sdxl_folder_with_two_text_encoders(tmp_path):
    """Real SDXL layout: text_encoder (CLIPTextModel) + text_encoder_2 (with projection)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    sd = load_diffusion("tiny-sdxl")
    tok = sd.tokenizer
    common = dict(
        intermediate_size=16,
        num_attention_heads=2,
        num_hidden_layers=2,
        vocab_size=len(tok),
        max_position_embeddings=77,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    te1 = CLIPTextModel(CLIPTextConfig(hidden_size=8, **common))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=8, projection_dim=16, **common))
    folder = save_tiny_sd(sd, tmp_path / "xl")
    te1.save_pretrained(f"{folder}/text_encoder")  # replaces the projecting tiny encoder
    te2.save_pretrained(f"{folder}/text_encoder_2")
    tok.save_pretrained(f"{folder}/tokenizer_2")
    parts = load_diffusion(folder)
    assert parts.variant == "sdxl"
    assert type(parts.text_encoder).__name__ == "CLIPTextModel"
    assert type(parts.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert len(parts.tokenizers) == len(parts.text_encoders) == 2
    ids = tok(["a star"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        h = torch.cat(
            [te(ids, output_hidden_states=True).hidden_states[-2] for te in parts.text_encoders], -1
        )
        pooled = parts.text_encoder_2(ids).text_embeds
        kw = _sdxl_kwargs(parts.unet, 1)
        kw["added_cond_kwargs"]["text_embeds"] = pooled
        out = parts.unet(torch.randn(1, 4, 8, 8), 10, encoder_hidden_states=h, **kw).sample
    assert out.shape == (1, 4, 8, 8)


def test_diffusion_errors_and_custom_factories(tmp_path, sd15, sd2):
    (tmp_path / "half" / "unet").mkdir(parents=True)
    with pytest.raises(ModelError, match=r"\['vae', 'text_encoder'.*missing"):
        load_diffusion(tmp_path / "half")
    single = tmp_path / "model.safetensors"
    single.write_bytes(b"x")
    with pytest.raises(ModelError, match="single file.*from_single_file"):
        load_diffusion(single)

    # A tiny_sd stack is accepted; a mismatched text encoder is caught at load.
    register_diffusion("mine", lambda: sd15)
    parts = load_diffusion("mine")
    assert parts.unet is sd15.unet and parts.variant == "sd15"
    register_diffusion(
        "broken",
        lambda: DiffusionParts(
            sd15.unet, sd15.vae, sd2.text_encoder, sd15.tokenizer, sd15.scheduler
        ),
    )
    with pytest.raises(ModelError, match="cross_attention_dim is 8.*give \\[16\\]"):
        load_diffusion("broken")
    register_diffusion("incomplete", lambda: types.SimpleNamespace(unet=sd15.unet))
    with pytest.raises(ModelError, match="without \\['vae'"):
        load_diffusion("incomplete")
    with pytest.raises(InputError, match="already registered"):
        register_diffusion("mine", lambda: sd15)


def test_diffusion_scheduler_converted_and_dtype(tmp_path):
    from diffusers import EulerDiscreteScheduler

    sd = load_diffusion("tiny")
    folder = save_tiny_sd(sd, tmp_path / "m")
    # SD folders ship other scheduler classes; attnpatch reads the config as DDIM.
    EulerDiscreteScheduler.from_config(sd.scheduler.config).save_pretrained(f"{folder}/scheduler")
    with pytest.warns(FutureWarning, match=r"dtype=.*0\.3\.0.*torch_dtype="):
        parts = load_diffusion(folder, dtype=torch.float64)  # the older switch: still works
    assert type(parts.scheduler).__name__ == "DDIMScheduler"
    assert parts.scheduler.config.beta_schedule == "scaled_linear"
    assert all(p.dtype == torch.float64 for m in parts.modules() for p in m.parameters())
    assert parts.vae_scale_factor == 2


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
def test_torch_dtype_loads_each_part_in_its_dtype(tmp_path, name):
    dtype = getattr(torch, name)
    vae_dtype = torch.float32 if dtype == torch.float16 else dtype  # the SD VAE overflows fp16
    folder = save_tiny_sd(load_diffusion("tiny"), tmp_path / "sd")
    for parts in (
        load_diffusion(folder, torch_dtype=dtype),  # diffusers' own torch_dtype loading
        load_diffusion("tiny", torch_dtype=name),  # built in code: cast once
    ):
        assert parts.unet.dtype == dtype and parts.text_encoder.dtype == dtype
        assert parts.vae.dtype == vae_dtype


def test_torch_dtype_errors():
    with pytest.raises(InputError, match="not both"), pytest.warns(FutureWarning):
        load_diffusion("tiny", dtype=torch.float16, torch_dtype=torch.float16)
    with pytest.raises(AttnPatchError, match="torch_dtype must be"):
        load_diffusion("tiny", torch_dtype="float64")
    with pytest.raises(AttnPatchError, match="torch_dtype must be"):
        load_diffusion("tiny", torch_dtype=torch.int8)
