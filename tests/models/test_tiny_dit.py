"""The "tiny-sd3" / "tiny-flux" stacks: real diffusers classes, their pipelines, local folders
written by save_pretrained and read back through from_pretrained, and the checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

import attnpatch as ap
from attnpatch.diffusion import DiffusionParts, encode_prompt, flow_denoise
from attnpatch.errors import ModelError
from attnpatch.testing import save_tiny_dit, tiny_flux, tiny_sd3

PIPELINES = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}


@pytest.fixture(scope="module", params=["sd3", "flux"])
def stack(request):
    return ap.load_diffusion(f"tiny-{request.param}")


@pytest.fixture(scope="module")
def folder(stack, tmp_path_factory):
    return save_tiny_dit(stack, tmp_path_factory.mktemp(stack.variant))


def test_the_stacks_parts(stack):
    assert stack.is_dit and stack.unet is None and stack.denoiser is stack.transformer
    assert isinstance(stack.scheduler, FlowMatchEulerDiscreteScheduler)
    assert len(stack.tokenizers) == len(stack.text_encoders) == (3 if stack.variant == "sd3" else 2)
    for m in stack.modules():
        assert not m.training and not any(p.requires_grad for p in m.parameters())
    pipe = stack.pipeline()
    assert isinstance(pipe, PIPELINES[stack.variant])
    assert pipe.transformer is stack.transformer and pipe.vae is stack.vae
    assert pipe.text_encoder_2 is stack.text_encoder_2 and pipe.tokenizer_2 is stack.tokenizer_2


def test_the_pipeline_runs_and_flow_denoise_equals_it(stack):
    """``parts.pipeline()(prompt, num_inference_steps=2, output_type="latent")`` at the
    pipeline's default size, and flow_denoise from the same initial noise."""
    prompt, n = "a photo of a circle", 2
    pipe = stack.pipeline()
    ref = pipe(prompt, num_inference_steps=n, output_type="latent",
               generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    side = 2 * (pipe.default_sample_size * pipe.vae_scale_factor // (2 * pipe.vae_scale_factor))
    x = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(0))  # its noise
    extra = {"guidance_scale": 7.0}  # StableDiffusion3Pipeline's default: CFG on ""
    if stack.variant == "flux":  # FluxPipeline returns its packed latents; guidance 3.5
        ref = FluxPipeline._unpack_latents(ref, side * 2, side * 2, 2)
        extra = {"guidance": 3.5}
    assert ref.shape == x.shape and torch.isfinite(ref).all()
    e = encode_prompt(stack.tokenizers, stack.text_encoders, prompt)
    got = flow_denoise(stack.transformer, stack.scheduler, x, e, num_inference_steps=n,
                       num_steps=n, **extra)  # fmt: skip
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_a_saved_folder_loads_through_from_pretrained(stack, folder):
    index = json.loads((Path(folder) / "model_index.json").read_text())
    assert index["_class_name"] == PIPELINES[stack.variant].__name__
    loaded = ap.load_diffusion(Path(folder))
    assert loaded.variant == stack.variant and loaded.unet is None
    assert type(loaded.transformer) is type(stack.transformer)
    for a, b in zip(stack.modules(), loaded.modules()):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
        assert not any(p.requires_grad for p in b.parameters())
    prompt = "a red star on a blue background"
    e1 = encode_prompt(stack.tokenizers, stack.text_encoders, prompt)
    e2 = encode_prompt(loaded.tokenizers, loaded.text_encoders, prompt)
    for x, y in zip(e1, e2):
        torch.testing.assert_close(x, y, atol=0, rtol=0)
    assert ap.token_indices(loaded.tokenizers, prompt, "star") == ap.token_indices(
        stack.tokenizers, prompt, "star"
    )
    public = [{k: v for k, v in s.config.items() if not k.startswith("_")} for s in
              (loaded.scheduler, stack.scheduler)]  # fmt: skip
    assert public[0] == public[1]


def test_folders_load_in_half_precision(stack, folder):
    half = ap.load_diffusion(folder, torch_dtype="bfloat16")
    assert half.transformer.dtype == torch.bfloat16
    assert all(e.dtype == torch.bfloat16 for e in half.text_encoders)
    built = ap.load_diffusion(f"tiny-{stack.variant}", torch_dtype=torch.float16)
    assert built.transformer.dtype == torch.float16 and built.vae.dtype == torch.float32


def test_incomplete_and_foreign_folders_are_refused(stack, folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(ModelError, match=r"not a complete .* folder: \['text_encoder_2'\]"):
        ap.load_diffusion(broken)
    config = broken / "transformer" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "_class_name": "PixArt"}))
    with pytest.raises(ModelError, match="holds a PixArt transformer"):
        ap.load_diffusion(broken)


def test_pipelines_and_objects_convert_and_are_checked(stack):
    pipe = stack.pipeline()
    parts = ap.load_diffusion(pipe)  # a diffusers pipeline has the same fields
    assert parts.variant == stack.variant and parts.transformer is stack.transformer
    other = tiny_flux() if stack.variant == "sd3" else tiny_sd3()
    fields = {f: getattr(stack, f) for f in DiffusionParts.__dataclass_fields__}
    with pytest.raises(ModelError, match="does not match its"):
        ap.load_diffusion(DiffusionParts(**{**fields, "transformer": other.transformer}))
    with pytest.raises(ModelError, match="needs parts.transformer"):
        ap.load_diffusion(DiffusionParts(**{**fields, "transformer": None}))
    wrong_t5 = tiny_sd3().text_encoder_3.__class__(
        type(stack.text_encoders[-1].config)(
            **{**stack.text_encoders[-1].config.to_dict(), "d_model": 16, "num_heads": 2}
        )  # fmt: skip
    )
    t5_field = "text_encoder_3" if stack.variant == "sd3" else "text_encoder_2"
    with pytest.raises(ModelError, match="joint_attention_dim is 32 but the T5 encoder is 16"):
        ap.load_diffusion(DiffusionParts(**{**fields, t5_field: wrong_t5}))
    with pytest.raises(ModelError, match="pooled_projection_dim"):
        ap.load_diffusion(DiffusionParts(**{**fields, "text_encoder": tiny_sd3().text_encoder_2}))


def test_unet_stacks_are_unchanged(sd15):
    parts = ap.load_diffusion("tiny")
    assert parts.denoiser is parts.unet and not parts.is_dit and parts.transformer is None
    assert parts.tokenizers == (parts.tokenizer,)
    assert parts.modules()[0] is parts.unet
