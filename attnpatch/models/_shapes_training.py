"""The machinery the two shapes training scripts share (:mod:`.train_shapes`, the UNet's DDPM
stack, and :mod:`.train_shapes_sd3`, the SD3 transformer's rectified flow): the learning-rate
schedule, the run state and its checkpoint, the step loop with its progress bar and atomic
checkpoints, the output folder's checks, ``train_info.json`` and the command line. Each script
keeps its own networks, optimizers and training step; nothing here draws a random number, so
the scripts' streams (and the shipped weights' bytes) are theirs alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .._util import atomic_write, derive_seed, num_threads
from ..data import SHAPE_CLASSES, shape_captions
from ..diffusion import DiffusionParts
from ..errors import ConfigError, RunFolderError

__all__ = [
    "TrainRun",
    "check_sizes",
    "draw_captions",
    "lr_factor",
    "mean_tail",
    "open_run",
    "optimise",
    "run_main",
    "set_lr",
    "train_steps",
    "write_train_info",
]


def lr_factor(step: int, total: int, warmup: int) -> float:
    """The learning rate's factor at ``step`` (0-based) of ``total``: linear warm-up over
    ``warmup`` steps to 1, then cosine decay to 0 at ``total``; in ``(0, 1]``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def mean_tail(values: list[float], n: int = 50) -> float | None:
    """The mean of the last ``n`` ``values``, rounded to 5 decimals (``None`` when empty)."""
    return round(sum(values[-n:]) / len(values[-n:]), 5) if values else None


def check_sizes(config: Any) -> None:
    """Raise :class:`ConfigError` unless ``config.pool``, ``.batch_size`` and
    ``.checkpoint_every`` are all >= 1."""
    for name in ("pool", "batch_size", "checkpoint_every"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(config, name)}")


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate of ``opt`` to ``lr``."""
    for group in opt.param_groups:
        group["lr"] = lr


def draw_captions(run: TrainRun, pool: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[str]]:
    """A batch from ``run.generator``: ``idx (batch_size,)`` into the pool and the images'
    captions from :func:`~attnpatch.data.shape_captions`, redrawn (colour and background words,
    empty captions) with the config's probabilities."""
    c, g = run.config, run.generator
    idx = torch.randint(c.pool, (c.batch_size,), generator=g)
    captions = shape_captions(
        pool["labels"][idx],
        SHAPE_CLASSES,
        pool["colours"][idx],
        generator=g,
        p_colour=c.p_colour,
        p_background=c.p_background,
        p_empty=c.p_empty,
    )
    return idx, captions


def optimise(opt: torch.optim.Optimizer, loss: torch.Tensor, params: list) -> float:
    """One step of ``opt`` on ``loss`` (gradients of ``params`` clipped to norm 1); returns the
    loss as a float."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return loss.item()


class TrainRun:
    """The mutable state of a training run (what the checkpoint holds): the step, the one
    seeded generator every draw comes from, the losses and seconds, the weights of the parts
    named in ``weights`` and the optimizers (attributes of the run) named in ``optimizers``.
    A script's subclass builds its optimizers after ``super().__init__`` and may add state
    through :meth:`_extra_state` / :meth:`_load_extra_state`."""

    weights: tuple[str, ...] = ()
    optimizers: tuple[str, ...] = ()

    def __init__(self, config: Any, parts: DiffusionParts, stream: str):
        self.config = config
        self.parts = parts
        self.step = 0
        self.generator = torch.Generator().manual_seed(derive_seed(stream, config.seed))
        self.losses: list[float] = []
        self.seconds = 0.0

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        p = self.parts
        return {
            "config": dataclasses.asdict(self.config),
            "step": self.step,
            "generator": self.generator.get_state(),
            "losses": self.losses,
            "seconds": self.seconds,
            **self._extra_state(),
            **{name: getattr(p, name).state_dict() for name in self.weights},
            **{name: getattr(self, name).state_dict() for name in self.optimizers},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["config"] != dataclasses.asdict(self.config):
            raise RunFolderError(
                "the checkpoint was written with other settings: "
                f"{state['config']} vs {dataclasses.asdict(self.config)}; resume with the same "
                "flags, or start a new --out folder"
            )
        p = self.parts
        self.step, self.losses, self.seconds = state["step"], state["losses"], state["seconds"]
        self.generator.set_state(state["generator"])
        self._load_extra_state(state)
        for name in self.weights:
            getattr(p, name).load_state_dict(state[name])
        for name in self.optimizers:
            getattr(self, name).load_state_dict(state[name])


def train_steps(
    run: TrainRun,
    until: int,
    total: int,
    step: Callable[[], float],
    *,
    ckpt: Path | None = None,
    bar: Any = None,
    stage: Callable[[int], str] | None = None,
) -> None:
    """Call ``step`` (one training step, returning its loss) until ``run.step == until``,
    recording losses and seconds; ``bar``: a tqdm bar to advance (with ``stage(run.step)`` in
    its postfix when given); ``ckpt``: written every ``checkpoint_every`` steps and at step
    ``total``, atomically."""
    c = run.config
    while run.step < until:
        t0 = time.perf_counter()
        loss = step()
        run.losses.append(loss)
        run.step += 1
        run.seconds += time.perf_counter() - t0
        if bar is not None:
            bar.update(1)
            if stage is None:
                bar.set_postfix(loss=f"{loss:.4f}")
            else:
                bar.set_postfix(stage=stage(run.step), loss=f"{loss:.4f}")
        if ckpt is not None and (run.step % c.checkpoint_every == 0 or run.step == total):
            with atomic_write(ckpt) as tmp:
                torch.save(run.state_dict(), tmp)


def open_run(
    out: str | Path, resume: bool, make_run: Callable[[], TrainRun]
) -> tuple[TrainRun, Path, Path]:
    """``(run, out, checkpoint path)``: refuse a non-empty ``out`` unless ``resume``, create it,
    build the run with ``make_run()`` and continue ``out/checkpoint.pt`` when resuming."""
    out = Path(out)
    ckpt = out / "checkpoint.pt"
    if out.exists() and any(out.iterdir()) and not resume:
        raise RunFolderError(
            f"{out} is not empty; pass --resume to continue its run, or choose a new --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    run = make_run()
    if resume and ckpt.is_file():
        run.load_state_dict(torch.load(ckpt, weights_only=False))
    return run, out, ckpt


def write_train_info(run: TrainRun, out: Path, fields: dict[str, Any]) -> dict[str, Any]:
    """Write ``out/train_info.json`` (settings, threads, torch, seconds, the script's
    ``fields``, sha256 of every ``*/*.safetensors``) atomically; returns its contents."""
    files = sorted(out.glob("*/*.safetensors"))
    info = {
        "config": dataclasses.asdict(run.config),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "train_seconds": round(run.seconds, 1),
        **fields,
        "sha256": {
            str(f.relative_to(out)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files
        },
    }
    with atomic_write(out / "train_info.json") as tmp:
        tmp.write_text(json.dumps(info, indent=2) + "\n")
    return info


def run_main(
    prog: str,
    config_type: type,
    train: Callable[..., dict[str, Any]],
    argv: list[str] | None,
    *,
    threads_flag: bool = False,
) -> int:
    """The scripts' command line: ``--out``, ``--resume``, ``--no-progress``, (``--threads``
    with ``threads_flag``) and one flag per field of ``config_type``; prints the info."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--out", required=True, help="the output folder (a diffusers model)")
    parser.add_argument("--resume", action="store_true", help="continue DIR/checkpoint.pt")
    parser.add_argument("--no-progress", action="store_true")
    if threads_flag:
        parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    for f in dataclasses.fields(config_type):
        parser.add_argument(
            "--" + f.name.replace("_", "-"), type=type(f.default), default=f.default
        )
    args = parser.parse_args(argv)
    config = config_type(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_type)})
    with num_threads(args.threads if threads_flag else 0):
        info = train(args.out, config, resume=args.resume, progress=not args.no_progress)
    print(json.dumps(info, indent=2))
    return 0
