"""The shipped "shapes-sd3" stack (attnpatch/models/shapes_sd3.py): the files, the
architecture, loading through diffusers' own from_pretrained, and a save/load round trip."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from attnpatch.diffusion import encode_prompt, token_indices
from attnpatch.errors import ModelError
from attnpatch.models import SHAPES_SD3_WEIGHTS, SHAPES_WEIGHTS, load_diffusion
from attnpatch.models import registry as registry_mod
from attnpatch.models.shapes_sd3 import shapes_sd3_transformer_config
from attnpatch.testing import save_tiny_dit


def test_the_shipped_files_are_the_ones_the_training_run_recorded():
    info = json.loads((SHAPES_SD3_WEIGHTS / "train_info.json").read_text())
    assert len(info["sha256"]) == 5  # transformer, vae, three text encoders
    for name, digest in info["sha256"].items():
        got = hashlib.sha256((SHAPES_SD3_WEIGHTS / name).read_bytes()).hexdigest()
        assert got == digest, name
    assert info["steps_done"] == info["config"]["steps"]
    total = sum(f.stat().st_size for f in SHAPES_SD3_WEIGHTS.rglob("*") if f.is_file())
    assert total < 4 * 2**20  # a few MB at most
    # the VAE is the "shapes" stack's, byte for byte
    vae = "vae/diffusion_pytorch_model.safetensors"
    assert (SHAPES_SD3_WEIGHTS / vae).read_bytes() == (SHAPES_WEIGHTS / vae).read_bytes()


def test_loads_as_real_sd3_classes_with_the_documented_architecture():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    parts = load_diffusion("shapes-sd3")
    assert parts.variant == "sd3" and parts.unet is None
    assert isinstance(parts.transformer, SD3Transformer2DModel)
    assert isinstance(parts.vae, AutoencoderKL)
    assert isinstance(parts.scheduler, FlowMatchEulerDiscreteScheduler)
    assert isinstance(parts.text_encoder, CLIPTextModelWithProjection)
    assert isinstance(parts.text_encoder_2, CLIPTextModelWithProjection)
    assert isinstance(parts.text_encoder_3, T5EncoderModel)
    assert parts.vae_scale_factor == 2 and parts.vae.config.shift_factor == 0.0
    for key, value in shapes_sd3_transformer_config().items():
        assert parts.transformer.config[key] == value, key
    for enc in (parts.text_encoder, parts.text_encoder_2):
        pos = enc.text_model.embeddings.position_embedding.weight
        assert (
            torch.count_nonzero(pos) == 0 and torch.count_nonzero(enc.text_projection.weight) == 0
        )
    assert torch.count_nonzero(parts.text_encoder_3.get_input_embeddings().weight) == 0
    assert all(not p.requires_grad for m in parts.modules() for p in m.parameters())
    # the label word: one CLIP token at position 5 of SD3's [CLIP (77), T5 (256)] sequence
    e = encode_prompt(parts.tokenizers, parts.text_encoders, "a photo of a circle")
    assert e.cond.shape == (1, 333, 32)
    assert token_indices(parts.tokenizers, "a photo of a circle", "circle") == [5, 77 + 4]


def test_save_pretrained_and_from_pretrained_round_trip(tmp_path):
    parts = load_diffusion("shapes-sd3")
    again = load_diffusion(save_tiny_dit(parts, tmp_path / "copy"))
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    prompts = ["a photo of a star", ""]
    e1 = encode_prompt(parts.tokenizers, parts.text_encoders, prompts)
    e2 = encode_prompt(again.tokenizers, again.text_encoders, prompts)
    t = torch.tensor([500.0, 500.0])
    with torch.no_grad():
        out1 = parts.transformer(z, e1.cond, e1.pooled, t).sample
        out2 = again.transformer(z, e2.cond, e2.pooled, t).sample
    assert torch.equal(e1.cond, e2.cond) and torch.equal(out1, out2)


def test_missing_weights_are_a_typed_error_naming_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(registry_mod, "SHAPES_SD3_WEIGHTS", tmp_path / "nowhere")
    with pytest.raises(ModelError, match="train_shapes_sd3"):
        load_diffusion("shapes-sd3")
