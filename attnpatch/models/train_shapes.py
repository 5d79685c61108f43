"""Train the ``"shapes"`` diffusion stack: ``python -m attnpatch.models.train_shapes --out DIR``.

Two stages on one pool of rendered shapes images (32 px, the five demo classes), every random
draw from one seeded generator, so the same seed and thread count give the same bytes:

1. the VAE (reconstruction MSE + a small KL term), then its ``scaling_factor`` is set to
   1 / std of the pool's latents, as SD's 0.18215 was chosen;
2. the UNet and the text encoder together on the frozen VAE's latents: epsilon prediction
   under SD1.5's noise schedule, captions from :func:`~attnpatch.data.shape_captions` redrawn
   every step, 10 % empty captions (classifier-free guidance's unconditional prompt).

The run checkpoints every ``--checkpoint-every`` steps to ``DIR/checkpoint.pt`` (atomically)
and ``--resume`` continues from it exactly. At the end ``DIR`` is a diffusers model folder
(``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) plus
``train_info.json`` (settings, losses, seconds, sha256 of each weights file), which
``attnpatch.models.load_diffusion(DIR)`` reads. The shipped weights are this script's output
with its defaults (docs/models.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .._util import derive_seed, one_thread
from ..data import SHAPE_CLASSES, render_shapes
from ..diffusion import DiffusionParts
from ..errors import ConfigError
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
from .shapes_sd import SHAPES_IMAGE_SIZE, shapes_sd
from .tiny import save_tiny_sd

__all__ = ["ShapesTrainConfig", "render_pool", "train_shapes", "main"]


@dataclass(frozen=True)
class ShapesTrainConfig:
    """Everything the weights are a function of (with the thread count)."""

    seed: int = 0
    pool: int = 12800  #: rendered training images
    batch_size: int = 32
    vae_steps: int = 800
    vae_lr: float = 2e-3
    kl_weight: float = 1e-5
    unet_steps: int = 6000
    unet_lr: float = 2e-3
    warmup: int = 100  #: linear warm-up steps of the UNet stage, then cosine decay
    p_empty: float = 0.1
    p_colour: float = 0.5
    p_background: float = 0.5
    checkpoint_every: int = 500

    def __post_init__(self) -> None:
        check_sizes(self)
        if self.vae_steps < 0 or self.unet_steps < 0:
            raise ConfigError("vae_steps and unet_steps must be >= 0")


def render_pool(config: ShapesTrainConfig) -> dict[str, torch.Tensor]:
    """The training pool: ``images (P, 3, 32, 32)`` in [0, 1], ``masks (P, 1, 32, 32)``,
    ``labels (P,)`` and ``colours (P, 3, 3)``; its own seeded stream (no image of the
    classifier's shapes sets)."""
    g = torch.Generator().manual_seed(derive_seed("attnpatch-shapes-sd-pool", config.seed))
    labels = torch.randint(len(SHAPE_CLASSES), (config.pool,), generator=g)
    chunks = []
    with one_thread():
        for i in range(0, config.pool, 512):
            chunks.append(
                render_shapes(
                    labels[i : i + 512],
                    SHAPE_CLASSES,
                    SHAPES_IMAGE_SIZE,
                    generator=g,
                    return_masks=True,
                    return_colours=True,
                )
            )
    images, masks, colours = (torch.cat(c) for c in zip(*chunks))
    return {"images": images, "masks": masks, "labels": labels, "colours": colours}


class _Run(TrainRun):
    """The mutable state of a training run (what the checkpoint holds): the shared state, the
    VAE's ``scaling_factor``, the three networks and both stages' optimizers."""

    weights = ("vae", "unet", "text_encoder")
    optimizers = ("vae_opt", "unet_opt")

    def __init__(self, config: ShapesTrainConfig):
        super().__init__(config, shapes_sd(config.seed, trainable=True), "attnpatch-shapes-sd")
        # run.step is global: VAE steps first, then UNet steps
        p = self.parts
        self.vae_opt = torch.optim.Adam(p.vae.parameters(), lr=config.vae_lr)
        params = list(p.unet.parameters()) + list(p.text_encoder.parameters())
        self.unet_opt = torch.optim.AdamW(params, lr=config.unet_lr, weight_decay=1e-2)

    def _extra_state(self) -> dict[str, Any]:
        return {"scaling_factor": self.parts.vae.config.scaling_factor}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.parts.vae.register_to_config(scaling_factor=state["scaling_factor"])


def _vae_step(run: _Run, pool: dict[str, torch.Tensor]) -> float:
    c, g, vae = run.config, run.generator, run.parts.vae
    idx = torch.randint(c.pool, (c.batch_size,), generator=g)
    flip = torch.rand(c.batch_size, generator=g) < 0.5
    x = pool["images"][idx] * 2 - 1
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    posterior = vae.encode(x).latent_dist
    z = posterior.sample(generator=g)
    loss = F.mse_loss(vae.decode(z).sample, x) + c.kl_weight * posterior.kl().mean()
    run.vae_opt.zero_grad(set_to_none=True)
    loss.backward()
    run.vae_opt.step()
    return loss.item()


@torch.no_grad()
def _encode_pool(parts: DiffusionParts, images: torch.Tensor) -> torch.Tensor:
    """Posterior means of the pool, ``(P, 4, 16, 16)``, unscaled."""
    parts.vae.eval()
    return torch.cat(
        [
            parts.vae.encode(images[i : i + 256] * 2 - 1).latent_dist.mean
            for i in range(0, len(images), 256)
        ]
    )


def _unet_step(
    run: _Run, pool: dict[str, torch.Tensor], latents: torch.Tensor, noise_sched
) -> float:
    c, g, p = run.config, run.generator, run.parts
    k = run.step - c.vae_steps
    set_lr(run.unet_opt, c.unet_lr * lr_factor(k, c.unet_steps, c.warmup))
    idx, captions = draw_captions(run, pool)
    ids = p.tokenizer(
        captions,
        padding="max_length",
        max_length=p.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    z0 = latents[idx]
    t = torch.randint(noise_sched.config.num_train_timesteps, (c.batch_size,), generator=g)
    noise = torch.randn(z0.shape, generator=g)
    zt = noise_sched.add_noise(z0, noise, t)
    cond = p.text_encoder(ids)[0]
    loss = F.mse_loss(p.unet(zt, t, cond).sample, noise)
    return optimise(run.unet_opt, loss, run.unet_opt.param_groups[0]["params"])


def _train_steps(
    run: _Run,
    pool: dict[str, torch.Tensor],
    until: int,
    *,
    ckpt: Path | None = None,
    bar: Any = None,
) -> None:
    """Advance ``run`` to global step ``until`` (VAE steps first, then UNet steps), writing
    ``ckpt`` every ``checkpoint_every`` steps and at the last step."""
    from diffusers import DDPMScheduler

    c, p = run.config, run.parts
    noise_sched = DDPMScheduler.from_config(p.scheduler.config)
    latents = None

    def step() -> float:
        nonlocal latents
        if run.step < c.vae_steps:
            p.vae.train()
            return _vae_step(run, pool)
        if latents is None:
            raw = _encode_pool(p, pool["images"])
            if run.step == c.vae_steps:  # the VAE stage just ended: fix its scale
                p.vae.register_to_config(scaling_factor=float(1.0 / raw.std()))
            latents = raw * p.vae.config.scaling_factor
            p.vae.requires_grad_(False)
        p.unet.train()
        p.text_encoder.train()
        return _unet_step(run, pool, latents, noise_sched)

    def stage(done: int) -> str:
        return "vae" if done <= c.vae_steps else "unet"

    total = c.vae_steps + c.unet_steps
    train_steps(run, until, total, step, ckpt=ckpt, bar=bar, stage=stage)


def train_shapes(
    out: str | Path,
    config: ShapesTrainConfig | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train (or resume) into ``out``; returns the ``train_info.json`` contents."""
    from tqdm.auto import tqdm

    config = config or ShapesTrainConfig()
    run, out, ckpt = open_run(out, resume, lambda: _Run(config))
    pool = render_pool(config)
    total = config.vae_steps + config.unet_steps
    bar = tqdm(total=total, initial=run.step, disable=not progress, desc="train_shapes")
    _train_steps(run, pool, total, ckpt=ckpt, bar=bar)
    bar.close()
    return _write_model(run, out)


def _write_model(run: _Run, out: Path) -> dict[str, Any]:
    p, c = run.parts, run.config
    for net in (p.unet, p.vae, p.text_encoder):
        net.eval().requires_grad_(False)
    save_tiny_sd(p, out)
    fields = {
        "scaling_factor": p.vae.config.scaling_factor,
        "final_losses": {
            "vae": mean_tail(run.losses[: c.vae_steps]),
            "unet": mean_tail(run.losses[c.vae_steps :]),
        },
    }
    return write_train_info(run, out, fields)


def main(argv: list[str] | None = None) -> int:
    return run_main(
        "python -m attnpatch.models.train_shapes", ShapesTrainConfig, train_shapes, argv
    )


if __name__ == "__main__":
    raise SystemExit(main())
