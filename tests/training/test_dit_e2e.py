"""Diffusion transformers end to end: ``attnpatch train`` / ``doctor`` / ``trace`` on the tiny SD3
and Flux stacks (issue 21), through the same CLI, trainer and losses as the UNet stacks.

What each test pins down:

* ``train`` runs the whole pipeline (every loss term, accumulation, checkpoints, figures,
  evaluation) and a run stopped at a checkpoint in the middle of an accumulation and resumed ends
  with the same patch bytes and metrics as an uninterrupted one;
* the attention pipeline's maps come from the flow loops of :mod:`attnpatch.diffusion.flow`
  (the hijack records without changing the denoised latents), its cross maps have one column per
  text token the transformer reads (SD3 77 CLIP + 256 T5, Flux 512 T5, not 77), and the label
  word's columns are the ones ``token_indices`` gives on the stack's tokenizers;
* the cross- and self-attention terms reach the patch pixels, and the frozen transformer gets no
  gradient;
* ``doctor`` reports the gradient flow through the attention maps; ``trace --model sd3 | flux``
  lists the public architectures' joint and single blocks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import attnpatch as ap
from attnpatch._util import num_threads
from attnpatch.cli import main
from attnpatch.diffusion import encode_prompt, flow_denoise, flow_invert, token_indices, vae_encode
from attnpatch.images import to_diffusion_input
from attnpatch.training.config import config_from_dict
from attnpatch.training.run import build_trainer

STACKS = ["tiny-sd3", "tiny-flux"]
#: text tokens of each stack's sequence: SD3 [CLIP 77; T5 256], Flux T5 512
TEXT_TOKENS = {"tiny-sd3": 77 + 256, "tiny-flux": 512}

FAST = [
    "--quiet",
    "--train.threads", "1",
    "--train.accumulate", "2",
    "--train.checkpoint_every", "3",
    "--attention.num_steps", "1",
    "--attention.num_inference_steps", "4",
    "--data.synthetic_per_class", "2",
    "--data.synthetic_eval_per_class", "1",
    "--eval.eot_samples", "1",
    "--eval.examples", "2",
]  # fmt: skip
TERMS = ("classifier", "cross_attention", "self_attention", "l2")


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread, as ``--train.threads 1`` gives the CLI runs (the CI has 2 cores)."""
    with num_threads(1):
        yield


def _train(out: Path, stack: str, iterations: int, *extra: str) -> int:
    args = ["train", "--models.diffusion", stack, "--train.out_dir", str(out), *FAST]
    return main([*args, "--train.iterations", str(iterations), *extra])


def _outcome(run: Path) -> tuple[bytes, list[dict]]:
    pixels = ap.AdversarialPatch.load(run / "patch.safetensors").pixels.detach()
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return pixels.numpy().tobytes(), records


@pytest.mark.parametrize("stack", [*STACKS, "shapes-sd3"])  # shapes-sd3: trained, shipped
def test_train_runs_the_pipeline_and_resumes_exactly(stack, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert _train(whole, stack, 6) == 0
    for name in ("patch.png", "loss_curves.png", "attention.png", "examples.png", "summary.json"):
        assert (whole / name).is_file(), name
    summary = json.loads((whole / "summary.json").read_text())
    assert summary["iterations"] == 6 and summary["optimizer_steps"] == 3  # K = 2
    assert 0 <= summary["success_rate"] <= 1 and summary["eligible"] > 0
    # stopped at iteration 3, a checkpoint in the middle of an accumulation (counter 1 of 2)
    assert _train(parts, stack, 3) == 0
    assert (parts / "checkpoints" / "it-000003").is_dir()
    assert _outcome(parts)[1][-1]["counter"] == 1
    assert _train(parts, stack, 6, "--resume") == 0
    patch_a, records_a = _outcome(whole)
    patch_b, records_b = _outcome(parts)
    assert patch_a == patch_b  # bit for bit
    assert records_a == records_b
    assert [r["iteration"] for r in records_a] == list(range(6))
    assert [r["counter"] for r in records_a] == [1, 0, 1, 0, 1, 0]
    for term in TERMS:  # every term computed, on the transformer's maps too
        values = [r[term] for r in records_a]
        assert all(v is not None for v in values), term
        assert len(set(values)) > 1, f"{term} never changed: {values}"


def _trainer(stack: str):
    cfg = config_from_dict(
        {
            "models": {"diffusion": stack},
            "train": {"progress": False, "threads": 1},
            "data": {"synthetic_per_class": 2, "synthetic_eval_per_class": 1},
            "attention": {"num_inference_steps": 4, "num_steps": 2, "guidance_scale": 2.0},
        }
    )
    torch.manual_seed(0)
    trainer, _ = build_trainer(cfg)
    return trainer


@pytest.fixture(scope="module", params=STACKS)
def dit_trainer(request):
    return request.param, _trainer(request.param)


def _batch(trainer, n: int = 2):
    images = torch.stack([trainer.data[i][0] for i in range(n)])
    labels = torch.tensor([trainer.data[i][1] for i in range(n)])
    return images, labels


def test_attention_terms_reach_the_patch_not_the_transformer(dit_trainer):
    stack, trainer = dit_trainer
    parts = trainer.parts
    assert trainer.attention.flow and trainer.attention.family.name == parts.variant
    images, labels = _batch(trainer)
    out = trainer.forward(images, labels, [0, 1])
    maps = out.inputs.cross_maps(trainer.attention.cross_resolution)
    grid = trainer.attention.cross_resolution
    assert maps.shape == (2, *grid, TEXT_TOKENS[stack])  # T_text columns, not 77
    assert maps.shape[-1] == trainer.class_embeds.cond.shape[1]
    # the label word's columns: token_indices on the stack's tokenizers
    prompt, word = trainer.prompts[int(labels[0])], trainer.classes[int(labels[0])]
    assert trainer.tokens[int(labels[0])] == token_indices(parts.tokenizers, prompt, word)
    pixels = trainer.patch.pixels
    for name in ("cross_attention", "self_attention"):
        value = out.terms.values()[name]
        (grad,) = torch.autograd.grad(value, [pixels], retain_graph=True)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    out.terms.total().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0
    for module in (parts.transformer, parts.vae, *parts.text_encoders):
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())
    pixels.grad = None


def test_the_maps_come_from_the_flow_loops_unchanged(dit_trainer):
    """The pipeline's denoised latents are those of flow_invert -> flow_denoise run by hand
    without any hijack: recording the maps changes nothing the transformer computes."""
    stack, trainer = dit_trainer
    pipe, parts = trainer.attention, trainer.parts
    images, labels = _batch(trainer)
    prompts = [trainer.prompts[int(y)] for y in labels]
    with torch.no_grad():
        result = pipe(images, prompts)
        x = to_diffusion_input(images, pipe.image_size, multiple=pipe.factor)
        z0 = vae_encode(parts.vae, x)
        embeds = encode_prompt(parts.tokenizers, parts.text_encoders, prompts)
        kw = dict(num_inference_steps=4, num_steps=2, guidance=pipe.guidance)
        zt = flow_invert(parts.transformer, parts.scheduler, z0, embeds, **kw)
        denoised = flow_denoise(
            parts.transformer, parts.scheduler, zt, embeds, guidance_scale=2.0, **kw
        )
    assert pipe.guidance == (3.5 if stack == "tiny-flux" else None)  # Flux-dev's default
    torch.testing.assert_close(result.zT, zt, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(result.denoised, denoised, rtol=1e-4, atol=1e-5)
    # one map per denoising call, rows of the conditional half
    assert result.cross.num_steps == 2
    assert set(result.self_maps()) >= {"transformer_blocks.0.attn"}


@pytest.mark.parametrize("stack", STACKS)
def test_doctor_reports_gradient_through_the_attention(stack, capsys):
    code = main(
        ["doctor", "--models.diffusion", stack, "--train.accumulate", "2", "--train.threads", "1",
         "--attention.num_steps", "1", "--attention.num_inference_steps", "4"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "0 failed" in out
    for line in (
        "PASS  gradient flow: cross-attention maps",
        "PASS  gradient flow: self-attention maps",
        "PASS  gradient flow: inverted latent",
        "PASS  gradient flow: patch",
        "PASS  hijack removed after the maps",
    ):
        assert line in out, out
    frozen = next(x for x in out.splitlines() if "frozen models" in x)
    assert "PASS" in frozen and "transformer" in frozen and "unet" not in frozen


@pytest.mark.parametrize(
    ("model", "lines"),
    [
        ("sd3", ["24 attention layers (24 joint", "| joint | cross | 8x8 | 24 | 24 | (B, 8, 8, 333) |"]),
        ("flux", ["| joint | cross | 8x8 | 19 | 24 | (B, 8, 8, 512) |",
                  "| single | cross | 8x8 | 38 | 24 | (B, 8, 8, 512) |"]),
    ],
)  # fmt: skip
def test_trace_lists_the_public_transformers(model, lines, capsys):
    assert main(["trace", "--model", model, "--latent", "16", "--summary"]) == 0
    out = capsys.readouterr().out
    for line in lines:
        assert line in out, out


def test_the_diffusion_input_is_a_multiple_of_vae_factor_times_patch(dit_trainer):
    stack, trainer = dit_trainer
    parts = trainer.parts
    pipe = ap.AttentionPipeline(parts, num_inference_steps=4, num_steps=1, image_size=34)
    assert pipe.family.latent_multiple(parts.transformer) == 2  # SD3's patch, Flux's packing
    assert pipe.factor == 2 * 2 and pipe.image_size == (36, 36)  # tiny VAE factor 2
    assert pipe.cross_resolution == (9, 9)  # 36 px / 2 / 2
