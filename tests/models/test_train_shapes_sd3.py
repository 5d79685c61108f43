"""The "shapes-sd3" training script (attnpatch/models/train_shapes_sd3.py): it runs, it resumes
exactly, its compact text sequence is the full one in disguise, and it refuses what would lose
work. CI never retrains the shipped weights."""

from __future__ import annotations

import json

import pytest
import torch

from attnpatch.diffusion import encode_prompt
from attnpatch.errors import ConfigError, InputError, RunFolderError
from attnpatch.models import load_diffusion
from attnpatch.models import train_shapes_sd3 as ts
from attnpatch.models._sd3_compact import compact_condition, multiplicity_bias
from attnpatch.models.shapes_sd3 import shapes_sd3

_SMALL = dict(pool=64, batch_size=4, steps=5, warmup=1, checkpoint_every=2)
_CAPTIONS = ["a photo of a red star on a blue background", "", "a photo of a circle", "a square"]


def _state(folder) -> dict[str, torch.Tensor]:
    parts = load_diffusion(folder)
    out = {}
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        out.update({f"{name}.{k}": v for k, v in getattr(parts, name).state_dict().items()})
    return out


def _perturbed(seed: int = 0):
    """The architecture with weights moved off their init (adaLN etc. not near zero)."""
    parts = shapes_sd3(seed=0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in parts.transformer.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
        for enc in (parts.text_encoder, parts.text_encoder_2):
            w = enc.get_input_embeddings().weight
            w.add_(torch.randn(w.shape, generator=g))
    return parts


def test_the_training_condition_is_what_encode_prompt_and_the_pipeline_compute():
    parts = _perturbed()
    cond, pooled = ts.sd3_condition(parts, _CAPTIONS)
    ref = encode_prompt(parts.tokenizers, parts.text_encoders, _CAPTIONS)
    assert cond.shape == (4, 77 + 256, 32)
    assert torch.equal(cond, ref.cond) and torch.equal(pooled, ref.pooled)
    # and what diffusers' own StableDiffusion3Pipeline.encode_prompt gives
    pe, _, pp, _ = parts.pipeline().encode_prompt(
        _CAPTIONS, _CAPTIONS, _CAPTIONS, do_classifier_free_guidance=False
    )
    assert torch.allclose(cond, pe, atol=1e-6) and torch.allclose(pooled, pp, atol=1e-6)
    # the stack's design: pooled is zero, T5's part is zero, the CLIP padding is one token
    assert torch.count_nonzero(pooled) == 0
    assert torch.count_nonzero(cond[:, 77:]) == 0


def test_compact_training_sequence_equals_the_full_sequence():
    parts = _perturbed()
    cond, pooled, ids = ts.sd3_condition(parts, _CAPTIONS, return_ids=True)
    tokens, bias = compact_condition(cond, ids, parts.tokenizer.eos_token_id)
    assert tokens.shape[1] < 16  # [BOS, words, EOS, T5] instead of 333
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(4, 4, 16, 16, generator=g), torch.rand(4, generator=g) * 1000
    tr = parts.transformer
    with torch.no_grad():
        full = tr(
            hidden_states=x, timestep=t, encoder_hidden_states=cond, pooled_projections=pooled
        )
        with multiplicity_bias(tr, bias):
            compact = tr(
                hidden_states=x, timestep=t, encoder_hidden_states=tokens, pooled_projections=pooled
            )
        # without the multiplicities the short sequence is another function
        plain = tr(
            hidden_states=x, timestep=t, encoder_hidden_states=tokens, pooled_projections=pooled
        )
    scale = full.sample.abs().max()
    assert (full.sample - compact.sample).abs().max() < 1e-5 * scale
    assert (full.sample - plain.sample).abs().max() > 1e-2 * scale
    # the processors were put back
    assert {type(p).__name__ for p in tr.attn_processors.values()} == {"JointAttnProcessor2_0"}


@pytest.mark.filterwarnings("ignore:prompt .* was truncated")  # max_sequence_length=2
def test_a_drawn_t5_length_equals_encoding_with_that_max_sequence_length():
    # The trainer's T5-length draw: the compact row with multiplicity m is the sequence
    # encode_prompt(..., max_sequence_length=m) gives, exactly as run by the plain model.
    parts = _perturbed()
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(4, 4, 16, 16, generator=g), torch.rand(4, generator=g) * 1000
    cond, pooled, ids = ts.sd3_condition(parts, _CAPTIONS, return_ids=True)
    lengths = torch.tensor([2.0, 7.0, 40.0, 256.0])
    tokens, bias = compact_condition(cond, ids, parts.tokenizer.eos_token_id, lengths)
    tr = parts.transformer
    with torch.no_grad(), multiplicity_bias(tr, bias):
        compact = tr(x, tokens, pooled, t).sample
    for i, m in enumerate(lengths.int().tolist()):
        ref = encode_prompt(
            parts.tokenizers, parts.text_encoders, _CAPTIONS[i], max_sequence_length=m
        )
        assert ref.cond.shape[1] == 77 + m
        with torch.no_grad():
            full = tr(x[i : i + 1], ref.cond, ref.pooled, t[i : i + 1]).sample
        assert (full - compact[i : i + 1]).abs().max() < 1e-5 * full.abs().max(), m


def test_compact_condition_refuses_padding_copies_that_differ():
    parts = _perturbed()
    cond, _, ids = ts.sd3_condition(parts, _CAPTIONS, return_ids=True)
    cond = cond.clone()
    cond[0, 100] += 1.0  # a T5 position that is not a copy
    with pytest.raises(InputError, match="copies"):
        compact_condition(cond, ids, parts.tokenizer.eos_token_id)


def test_the_script_runs_and_writes_a_loadable_sd3_folder(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--out", str(out), "--no-progress"]
    args += [f"--{k.replace('_', '-')}={v}" for k, v in _SMALL.items()]
    assert ts.main(args) == 0
    info = json.loads((out / "train_info.json").read_text())
    assert info["config"]["steps"] == 5 and info["steps_done"] == 5 and info["threads"] == 1
    assert json.loads(capsys.readouterr().out) == info
    parts = load_diffusion(out)  # from_pretrained of a plain diffusers SD3 folder
    assert type(parts.transformer).__name__ == "SD3Transformer2DModel"
    assert parts.vae.config.shift_factor == 0.0
    assert all(not p.requires_grad for m in parts.modules() for p in m.parameters())
    assert sorted(info["sha256"]) == sorted(
        str(p.relative_to(out)) for p in out.glob("*/*.safetensors")
    )


def test_training_changes_the_transformer_and_the_clip_embeddings_only(tmp_path):
    start = shapes_sd3(seed=0)
    ts.train_shapes_sd3(tmp_path / "a", ts.ShapesSD3TrainConfig(**_SMALL), progress=False)
    trained = load_diffusion(tmp_path / "a")
    for name, should_change in (
        ("transformer", True),
        ("vae", False),
        ("text_encoder_3", False),
    ):
        before = getattr(start, name).state_dict()
        after = getattr(trained, name).state_dict()
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        assert bool(changed) == should_change, name
    for name in ("text_encoder", "text_encoder_2"):
        before = getattr(start, name).state_dict()
        after = getattr(trained, name).state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed == {"text_model.embeddings.token_embedding.weight"}, name


def test_same_seed_same_bytes_and_a_resumed_run_loses_nothing(tmp_path):
    config = ts.ShapesSD3TrainConfig(**_SMALL)
    ts.train_shapes_sd3(tmp_path / "straight", config, progress=False)
    # Interrupted after step 3, then resumed from its checkpoint.
    run = ts._Run(config)
    ts._train_steps(run, ts.render_pool(config), 3)
    (tmp_path / "resumed").mkdir()
    torch.save(run.state_dict(), tmp_path / "resumed" / "checkpoint.pt")
    ts.train_shapes_sd3(tmp_path / "resumed", config, resume=True, progress=False)
    a, b = _state(tmp_path / "straight"), _state(tmp_path / "resumed")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ts.train_shapes_sd3(tmp_path / "again", config, progress=False)
    c = _state(tmp_path / "again")
    assert all(torch.equal(a[k], c[k]) for k in a)
    # another seed gives other weights
    ts.train_shapes_sd3(
        tmp_path / "other", ts.ShapesSD3TrainConfig(**dict(_SMALL, seed=1)), progress=False
    )
    d = _state(tmp_path / "other")
    assert not torch.equal(a["transformer.proj_out.weight"], d["transformer.proj_out.weight"])


def test_refuses_to_overwrite_or_to_resume_with_other_settings(tmp_path):
    out = tmp_path / "run"
    ts.train_shapes_sd3(out, ts.ShapesSD3TrainConfig(**_SMALL), progress=False)
    with pytest.raises(RunFolderError, match="not empty; pass --resume"):
        ts.train_shapes_sd3(out, ts.ShapesSD3TrainConfig(**_SMALL), progress=False)
    other = ts.ShapesSD3TrainConfig(**dict(_SMALL, steps=7))
    with pytest.raises(RunFolderError, match="other settings"):
        ts.train_shapes_sd3(out, other, resume=True, progress=False)
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        ts.ShapesSD3TrainConfig(batch_size=0)
    with pytest.raises(ConfigError, match="steps must be >= 0"):
        ts.ShapesSD3TrainConfig(steps=-1)
    with pytest.raises(ConfigError, match="min_t5_length"):
        ts.ShapesSD3TrainConfig(min_t5_length=300)
