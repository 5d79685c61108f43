"""The shipped "shapes" stack (attnpatch/models/shapes_sd.py): the files, the architecture,
loading through diffusers' own from_pretrained, and a save/load round trip."""

from __future__ import annotations

import hashlib
import json

import torch

from attnpatch.models import SHAPES_WEIGHTS, load_diffusion, shapes_sd
from attnpatch.testing import save_tiny_sd


def test_the_shipped_files_are_the_ones_the_training_run_recorded():
    info = json.loads((SHAPES_WEIGHTS / "train_info.json").read_text())
    assert len(info["sha256"]) == 3
    for name, digest in info["sha256"].items():
        assert hashlib.sha256((SHAPES_WEIGHTS / name).read_bytes()).hexdigest() == digest, name
    total = sum(f.stat().st_size for f in SHAPES_WEIGHTS.rglob("*") if f.is_file())
    assert total < 4 * 2**20  # a few MB at most


def test_loads_as_real_sd_classes_with_the_documented_architecture():
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    parts = load_diffusion("shapes")
    assert isinstance(parts.unet, UNet2DConditionModel)
    assert isinstance(parts.vae, AutoencoderKL)
    assert isinstance(parts.text_encoder, CLIPTextModel)
    assert isinstance(parts.tokenizer, CLIPTokenizer)
    assert isinstance(parts.scheduler, DDIMScheduler)
    assert parts.vae_scale_factor == 2 and parts.variant == "sd15"
    assert parts.text_encoder.config.num_hidden_layers == 0
    # a bag of words: the position embeddings are zero, so a token means the same anywhere
    pos = dict(parts.text_encoder.named_parameters())["embeddings.position_embedding.weight"]
    assert torch.count_nonzero(pos) == 0
    # the trainer's default prompt: the shape word is one token, where token_indices finds it
    assert parts.tokenizer.tokenize("a photo of a circle")[-1] == "circle</w>"
    untrained = shapes_sd(seed=0)
    assert list(untrained.unet.config.block_out_channels) == list(
        parts.unet.config.block_out_channels
    )
    assert all(not p.requires_grad for m in parts.modules() for p in m.parameters())


def test_save_pretrained_and_from_pretrained_round_trip(tmp_path):
    parts = load_diffusion("shapes")
    again = load_diffusion(save_tiny_sd(parts, tmp_path / "copy"))
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ids = parts.tokenizer(["a photo of a star", ""], padding="max_length", return_tensors="pt")
    with torch.no_grad():
        e1, e2 = parts.text_encoder(ids.input_ids)[0], again.text_encoder(ids.input_ids)[0]
        out1 = parts.unet(z, 500, e1).sample
        out2 = again.unet(z, 500, e2).sample
    assert torch.equal(e1, e2) and torch.equal(out1, out2)
    assert again.vae.config.scaling_factor == parts.vae.config.scaling_factor
