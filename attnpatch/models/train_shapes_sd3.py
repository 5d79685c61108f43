"""Train the ``"shapes-sd3"`` stack: ``python -m attnpatch.models.train_shapes_sd3 --out DIR``.

Rectified flow (SD3's objective) on the shapes world, every random draw from one seeded
generator, so the same seed and thread count give the same bytes:

* the images: :func:`~attnpatch.models.train_shapes.render_pool` (the ``"shapes"`` stack's
  pool and stream), encoded once by the frozen shapes VAE (posterior means, ``(z - shift) *
  scale`` as ``StableDiffusion3Pipeline`` does);
* each step: a batch of latents ``x0``, noise ``e``, ``sigma = sigmoid(u)`` with ``u ~ N(0,
  1)`` (SD3's logit-normal sampling), ``x = (1 - sigma) x0 + sigma e``, the transformer at
  ``t = 1000 sigma`` predicts the velocity ``e - x0`` (MSE); captions from
  :func:`~attnpatch.data.shape_captions` redrawn every step, 10 % empty (classifier-free
  guidance's unconditional prompt), encoded as SD3's pipeline does (both CLIPs' penultimate
  states zero-padded to T5's width, then T5's positions, ``max_sequence_length`` drawn
  log-uniformly in [2, 256] per caption); the transformer and both CLIPs' token embeddings are
  trained (AdamW, warm-up then cosine decay, gradients clipped at 1). The transformer runs on
  the distinct text tokens with their multiplicities as attention biases, which is the same
  function (:mod:`._sd3_compact`).

The run checkpoints every ``--checkpoint-every`` steps to ``DIR/checkpoint.pt`` (atomically)
and ``--resume`` continues from it exactly. At the end ``DIR`` is a diffusers SD3 model folder
(``model_index.json``, ``transformer/``, ``vae/``, three text encoders and tokenizers,
``scheduler/``) plus ``train_info.json`` (settings, losses, seconds, sha256 of each weights
file), which ``attnpatch.models.load_diffusion(DIR)`` reads. The shipped weights are this
script's output with its defaults (docs/models.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..diffusion import DiffusionParts
from ..errors import ConfigError
from ._sd3_compact import compact_condition, multiplicity_bias
from ._shapes_training import (
    TrainRun,
    check_sizes,
    draw_captions,
    lr_factor,
    mean_tail,
    open_run,
    optimise,
    run_main,
    set_lr,
    train_steps,
    write_train_info,
)
from .shapes_sd3 import shapes_sd3, trainable_parameters
from .tiny_dit import save_tiny_dit
from .train_shapes import render_pool

__all__ = ["ShapesSD3TrainConfig", "sd3_condition", "train_shapes_sd3", "main"]

#: SD3's T5 length (the pipelines' ``max_sequence_length``), the one trained at.
T5_LENGTH = 256


@dataclass(frozen=True)
class ShapesSD3TrainConfig:
    """Everything the weights are a function of (with the thread count)."""

    seed: int = 0
    pool: int = 12800  #: rendered training images
    batch_size: int = 32
    steps: int = 8000
    lr: float = 2e-3
    warmup: int = 100  #: linear warm-up steps, then cosine decay
    p_empty: float = 0.1
    p_colour: float = 0.5
    p_background: float = 0.5
    checkpoint_every: int = 250
    #: the T5 length each caption stands for is drawn log-uniformly in [min_t5_length, 256]
    min_t5_length: int = 2

    def __post_init__(self) -> None:
        check_sizes(self)
        if self.steps < 0:
            raise ConfigError(f"steps must be >= 0, got {self.steps}")
        if not 1 <= self.min_t5_length <= T5_LENGTH:
            raise ConfigError(
                f"min_t5_length must be in [1, {T5_LENGTH}], got {self.min_t5_length}"
            )


def sd3_condition(
    parts: DiffusionParts,
    captions: list[str],
    *,
    return_ids: bool = False,
    t5_length: int = T5_LENGTH,
) -> tuple[torch.Tensor, ...]:
    """``(B, 77 + 256, 32)`` text sequence and ``(B, 32)`` pooled projection of ``captions``,
    computed as ``StableDiffusion3Pipeline.encode_prompt`` does, *with* gradients to the CLIPs'
    token embeddings (the library's ``encode_prompt`` runs under ``no_grad``); with
    ``return_ids`` also the ``(B, 77)`` CLIP token ids; ``t5_length``: ``max_sequence_length``."""
    hidden, pooled, all_ids = [], [], []
    for tok, enc in (
        (parts.tokenizer, parts.text_encoder),
        (parts.tokenizer_2, parts.text_encoder_2),
    ):
        ids = tok(
            captions,
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        all_ids.append(ids)
        out = enc(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled.append(out[0])
    t5_ids = parts.tokenizer_3(
        captions, padding="max_length", max_length=t5_length, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        t5 = parts.text_encoder_3(t5_ids)[0]
    clip = torch.cat(hidden, dim=-1)
    clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    out = (torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1))
    return (*out, all_ids[0]) if return_ids else out


class _Run(TrainRun):
    """The mutable state of a training run (what the checkpoint holds): the shared state, the
    transformer's and both CLIPs' weights and the optimizer."""

    weights = ("transformer", "text_encoder", "text_encoder_2")
    optimizers = ("opt",)

    def __init__(self, config: ShapesSD3TrainConfig):
        super().__init__(config, shapes_sd3(config.seed, trainable=True), "attnpatch-shapes-sd3")
        self.params = trainable_parameters(self.parts)
        self.opt = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=1e-2)


@torch.no_grad()
def encode_pool(parts: DiffusionParts, images: torch.Tensor) -> torch.Tensor:
    """SD3-scaled latents of the pool, ``(P, 4, 16, 16)``: posterior means, ``(z - shift) *
    scale``."""
    vae = parts.vae.eval()
    raw = torch.cat(
        [
            vae.encode(images[i : i + 256] * 2 - 1).latent_dist.mean
            for i in range(0, len(images), 256)
        ]
    )
    shift = vae.config.shift_factor or 0.0
    return (raw - shift) * vae.config.scaling_factor


def _step(run: _Run, pool: dict[str, torch.Tensor], latents: torch.Tensor) -> float:
    c, g, p = run.config, run.generator, run.parts
    set_lr(run.opt, c.lr * lr_factor(run.step, c.steps, c.warmup))
    idx, captions = draw_captions(run, pool)
    x0 = latents[idx]
    noise = torch.randn(x0.shape, generator=g)
    sigma = torch.sigmoid(torch.randn(c.batch_size, generator=g))
    s = sigma[:, None, None, None]
    xt = (1 - s) * x0 + s * noise
    cond, pooled, ids = sd3_condition(p, captions, return_ids=True)
    lo, hi = math.log(c.min_t5_length), math.log(T5_LENGTH)
    t5_lengths = torch.exp(lo + (hi - lo) * torch.rand(c.batch_size, generator=g)).round()
    tokens, bias = compact_condition(cond, ids, p.tokenizer.eos_token_id, t5_lengths)
    with multiplicity_bias(p.transformer, bias):  # = the full 333-token sequence, cheaper
        v = p.transformer(
            hidden_states=xt,
            timestep=sigma * 1000,
            encoder_hidden_states=tokens,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
    loss = F.mse_loss(v, noise - x0)
    return optimise(run.opt, loss, run.params)


def _train_steps(
    run: _Run,
    pool: dict[str, torch.Tensor],
    until: int,
    *,
    ckpt: Path | None = None,
    bar: Any = None,
) -> None:
    """Advance ``run`` to step ``until``, writing ``ckpt`` every ``checkpoint_every`` steps and
    at the last step."""
    c, p = run.config, run.parts
    latents = encode_pool(p, pool["images"])
    p.transformer.train()
    train_steps(run, until, c.steps, lambda: _step(run, pool, latents), ckpt=ckpt, bar=bar)


def train_shapes_sd3(
    out: str | Path,
    config: ShapesSD3TrainConfig | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train (or resume) into ``out``; returns the ``train_info.json`` contents."""
    from tqdm.auto import tqdm

    config = config or ShapesSD3TrainConfig()
    run, out, ckpt = open_run(out, resume, lambda: _Run(config))
    pool = render_pool(config)  # reads .seed and .pool: the "shapes" stack's pool
    bar = tqdm(total=config.steps, initial=run.step, disable=not progress, desc="shapes-sd3")
    _train_steps(run, pool, config.steps, ckpt=ckpt, bar=bar)
    bar.close()
    return _write_model(run, out)


def _write_model(run: _Run, out: Path) -> dict[str, Any]:
    p = run.parts
    for net in p.modules():
        net.eval().requires_grad_(False)
    save_tiny_dit(p, out)
    fields = {
        "steps_done": run.step,
        "final_loss": mean_tail(run.losses),
        "loss_curve": [
            mean_tail(run.losses[: i + 1], 100) for i in range(99, len(run.losses), 500)
        ],
    }
    return write_train_info(run, out, fields)


def main(argv: list[str] | None = None) -> int:
    return run_main(
        "python -m attnpatch.models.train_shapes_sd3",
        ShapesSD3TrainConfig,
        train_shapes_sd3,
        argv,
        threads_flag=True,
    )


if __name__ == "__main__":
    raise SystemExit(main())
