"""``attnpatch train``: build everything a config names, train, evaluate, write the run folder.

Run folder (``train.out_dir``)::

    config.json          the resolved config
    metrics.jsonl        one line per iteration: every loss term separately, the total, success
    patch.safetensors    the patch (apply it later with `attnpatch apply` or AdversarialPatch.load)
    patch.png            the patch as an image
    loss_curves.png      per loss term: raw values beside weighted ones (they sum to the total)
    attention.png        the clean and the patched image, the label word's cross-attention
    examples.png         patched held-out images (EOT on), the classifier's prediction under each
    success_vs_scale.png success rate vs patch scale, patch and random-noise control
    summary.json         the evaluation: clean accuracy, success rate, random-patch control,
                         and the environment (package versions, attnpatch's git commit)
    checkpoints/         the latest checkpoint (resume with --resume)
    logs/                with train.log: TensorBoard event files or W&B runs (docs/logging.md)
    .attnpatch-run       the marker: this folder is attnpatch's; locked while a run uses it

Only these names are ever deleted or replaced, and only in a folder with the marker
(:mod:`attnpatch.training.run_folder`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._util import atomic_write, num_threads
from ..data import ImageFolder, ShapesConfig, shapes_dataset
from ..errors import AttnPatchError, ConfigError, DataError, RunFolderError
from ..models import TINY_CLASSIFIERS, load_classifier, load_diffusion
from ..patch import AdversarialPatch
from .config import TrainConfig, config_to_dict
from .config_checks import check_device
from .distributed import SINGLE, Dist, from_environment
from .environment import environment
from .evaluate import EvalResult, evaluate_patch
from .figures import scale_curve, write_figures, write_patch_figure
from .run_folder import MARKER, RunFolder, check_out_dir, last_checkpoint, out_dir_path
from .tracking import RunTracking
from .trainer import PatchTrainer

__all__ = [
    "build_trainer",
    "run_training",
    "RunResult",
    "resolve_device",
    "check_out_dir",
]


@dataclass
class RunResult:
    """What :func:`run_training` produced."""

    out_dir: Path
    evaluation: EvalResult
    seconds: float
    trainer: PatchTrainer


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; a name torch does not know, or a device
    this machine lacks, is a :class:`~attnpatch.errors.ConfigError`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device(name)
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"models.device is {name!r} but CUDA is not available; use 'cpu' or 'auto'"
        )
    return device


def _shapes_config(cfg: TrainConfig, seed: int) -> ShapesConfig:
    d = cfg.data
    return ShapesConfig(
        size=d.image_size,
        train_per_class=d.synthetic_per_class,
        heldout_per_class=d.synthetic_eval_per_class,
        seed=seed,
    )


def load_datasets(cfg: TrainConfig) -> tuple[Any, Any]:
    """(training data, held-out data) as the config names them.

    ``"synthetic"``: the package's shapes, drawn with seed ``train.seed + 1`` so they share no
    image with the set the tiny classifier was trained on (seed 0).
    """
    d = cfg.data
    shapes = _shapes_config(cfg, cfg.train.seed + 1)
    train = (
        shapes_dataset(shapes, "train")
        if d.train == "synthetic"
        else ImageFolder(d.train, d.image_size)
    )
    held = (
        shapes_dataset(shapes, "heldout")
        if d.eval == "synthetic"
        else ImageFolder(d.eval, d.image_size)
    )
    if list(train.classes) != list(held.classes):
        raise DataError(
            f"training classes {list(train.classes)} differ from held-out classes "
            f"{list(held.classes)}; use folders with the same class subfolders"
        )
    if len(train) == 0 or len(held) == 0:
        raise DataError("a data set is empty; check data.train and data.eval")
    return train, held


def build_patch(cfg: TrainConfig, device: torch.device) -> AdversarialPatch:
    """The patch the config describes, initialised from ``train.seed``."""
    p = cfg.patch
    return AdversarialPatch(
        p.size,
        shape=p.shape,
        init=p.init,
        scale=tuple(p.scale) if p.scale else None,
        position=p.position,
        eot=p.transforms(),
        generator=torch.Generator().manual_seed(cfg.train.seed),
    ).to(device)


def build_trainer(
    cfg: TrainConfig, out_dir: str | os.PathLike | None = None, dist: Dist = SINGLE
) -> tuple[PatchTrainer, Any]:
    """Models, data and patch from the config; returns ``(trainer, held-out data)``. In a
    data-parallel run (``dist``) every process builds the same frozen models on its device."""
    device = dist.accelerator.device if dist.world > 1 else resolve_device(cfg.models.device)
    train, held = load_datasets(cfg)
    weights = cfg.models.classifier_weights or None
    if cfg.models.classifier in TINY_CLASSIFIERS:  # built for the run's image size
        shapes = ShapesConfig(size=cfg.data.image_size)
        classifier = load_classifier("tiny", weights=weights, config=shapes, device=device)
    else:
        classifier = load_classifier(cfg.models.classifier, weights=weights, device=device)
    variant = {"variant": cfg.models.variant} if cfg.models.variant else {}  # weights files
    parts = load_diffusion(
        cfg.models.diffusion, device=device, torch_dtype=cfg.models.dtype, **variant
    )
    patch = build_patch(cfg, device)
    trainer = PatchTrainer(
        cfg,
        classifier=classifier,
        parts=parts,
        patch=patch,
        train_data=train,
        out_dir=out_dir,
        dist=dist,
    )
    return trainer, held


def _held_tensors(held: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(held, "get_batch"):
        return held.get_batch(list(range(len(held))))
    items = [held[i] for i in range(len(held))]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def run_training(
    cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, log: Any = print
) -> RunResult:
    """Train, evaluate and write the run folder (see the module docstring).

    An existing run in ``train.out_dir`` is continued with ``resume=True``, replaced with
    ``overwrite=True``, and otherwise left alone (an error says so before any work); a folder
    attnpatch did not make is never emptied, and a folder in use by another run is refused
    (:mod:`attnpatch.training.run_folder`). Runs on ``train.threads`` CPU threads. Launched by
    ``accelerate launch`` / ``torchrun`` with more than one process, it trains data-parallel
    (docs/distributed.md); process 0 writes. A write that fails mid-run (a full disk, a
    read-only folder) raises :class:`~attnpatch.errors.RunFolderError` saying what was saved
    and how to resume.
    """
    cfg.validate()
    out = out_dir_path(cfg.train.out_dir)
    if not (resume or overwrite) and _finished_here(out, cfg):
        if os.environ.get("RANK", "0") == "0":  # process 0 speaks (before the process group)
            log(
                f"{out} already holds this run, finished ({cfg.train.iterations} iterations, the "
                "same config): its result is evaluated again, nothing is trained; pass "
                "--overwrite to train it again, or choose another train.out_dir"
            )
        resume = True
    with num_threads(cfg.train.threads), RunTracking(cfg) as tracking:  # checks its package
        dist = from_environment(cfg.models.device, cfg.train.collective_timeout_minutes)
        try:
            with _claim(out, resume, overwrite, dist) as folder:
                try:
                    return _run(cfg, out, resume, log, dist, tracking, folder)
                except OSError as e:
                    if e.errno not in WRITE_ERRORS:
                        raise
                    raise RunFolderError(_write_failure(out, e, dist)) from e
        finally:
            dist.close()


def _finished_here(out: Path, cfg: TrainConfig) -> bool:
    """``out`` is attnpatch's run folder of a finished run of exactly ``cfg``: the last
    checkpoint is at ``train.iterations`` and ``config.json`` equals ``cfg``. Running the same
    command again then shows that run's result (as ``--resume`` does) instead of refusing."""
    if not (out / MARKER).is_file() or not (out / "summary.json").is_file():
        return False
    if last_checkpoint(out) != f"it-{cfg.train.iterations:06d}":
        return False
    try:
        saved = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return saved == json.loads(json.dumps(config_to_dict(cfg)))


#: errno values of a write that failed for lack of space or permission.
WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


def _write_failure(out: Path, e: OSError, dist: Dist) -> str:
    """The one line for a write that failed mid-run: what, what is saved, how to go on."""
    where = f" ({e.filename})" if e.filename else ""
    saved = last_checkpoint(out)
    if saved:
        kept = f"the last good checkpoint is {out / 'checkpoints' / saved}"
        fix = "then --resume continues from it"
    else:
        kept = "no checkpoint was written yet"
        fix = "then run again with --overwrite"
    who = f"process {dist.rank}: " if dist.world > 1 else ""
    return (
        f"{who}cannot write in {out}: {e.strerror or e}{where}; {kept}; free space or make the "
        f"folder writable, {fix}"
    )


@contextlib.contextmanager
def _claim(out: Path, resume: bool, overwrite: bool, dist: Dist) -> Iterator[RunFolder | None]:
    """Process 0 claims the run folder (ownership, lock); every process learns the outcome
    (one collective), so a refusal ends all of them at once."""
    folder, error = None, None
    if dist.is_main:
        try:
            folder = RunFolder(out, resume=resume, overwrite=overwrite).__enter__()
        except AttnPatchError as e:
            error = e
    if dist.world > 1 and dist.sum(torch.tensor([float(error is not None)])).item():
        error = error or RunFolderError(
            f"process 0 refused train.out_dir {str(out)!r} (its message says why)"
        )
    if error is not None:
        if folder is not None:
            folder.__exit__(None, None, None)
        raise error
    if folder is None:
        yield None
        return
    try:
        yield folder
    finally:
        folder.__exit__(None, None, None)


def _run(
    cfg: TrainConfig,
    out: Path,
    resume: bool,
    log: Any,
    dist: Dist,
    tracking: RunTracking,
    folder: RunFolder | None,
) -> RunResult:
    start = time.perf_counter()
    trainer, held = build_trainer(cfg, out, dist)  # every check, before anything is deleted
    main = dist.is_main
    if resume:
        trainer.load_checkpoint()  # also checks the data's fingerprint and metrics.jsonl
        if main:
            log(f"resumed {out} at iteration {trainer.iteration} (counter {trainer.counter})")
            for line in trainer.notes:
                log(line)
    elif folder is not None:
        folder.clear()  # the earlier run's outputs: only in attnpatch's own folder
    if folder is not None:
        folder.started()
        _write_json(out / "config.json", config_to_dict(cfg))
    dist.barrier()
    tracking.start(trainer)  # process 0, with train.log; closed when run_training returns
    t_train = time.perf_counter()
    trainer.train()
    t_train = time.perf_counter() - t_train
    trainer.save_checkpoint()
    if trainer.steps == 0:  # a validated config cannot get here; a hand-made one can
        raise ConfigError(
            f"the run ended after {trainer.iteration} iteration(s) without an optimizer step "
            f"(train.accumulate K={cfg.train.accumulate}, train.iterations="
            f"{cfg.train.iterations}): the patch is its random initial value, so no attack "
            "success is reported; lower train.accumulate or raise train.iterations"
        )
    patch = trainer.patch
    if main:
        patch.save(out / "patch.safetensors", extra={"config": json.dumps(config_to_dict(cfg))})
    images, labels = _held_tensors(held)
    target = trainer.target
    result = evaluate_patch(
        trainer.classifier,
        patch,
        images,
        trainer.logit_index[labels],  # classifier output indices
        target=target,
        eot_samples=cfg.eval.eot_samples,
        seed=cfg.train.seed,
        dist=dist,
    )
    if not main:
        return RunResult(out, result, time.perf_counter() - start, trainer)
    by_scale = scale_curve(trainer, images, labels)  # {"by_scale": [...]}
    seconds = time.perf_counter() - start
    summary = {
        **result.to_dict(),
        "iterations": trainer.iteration,
        "optimizer_steps": trainer.steps,
        **by_scale,
    }
    if dist.world > 1:  # the data-parallel bookkeeping (docs/distributed.md)
        summary["processes"] = dist.world
        summary["gradient_reductions"] = dist.reductions
    summary["train_seconds"] = round(t_train, 3)  # the loop alone, this session's iterations
    summary["seconds"] = round(seconds, 2)
    summary["classes"] = trainer.classes
    summary["environment"] = environment()  # versions and the git commit (environment.py)
    _write_json(out / "summary.json", summary)  # before the figures: a figure cannot lose it
    tracking.log_evaluation(result.to_dict())
    try:
        write_patch_figure(patch.pixels, out / "patch.png")
        write_figures(trainer, images, labels, out, by_scale)
    except OSError as e:
        if e.errno not in WRITE_ERRORS:
            raise
        raise RunFolderError(
            f"the run finished and its patch.safetensors, summary.json and checkpoints are "
            f"saved in {out}, but a figure could not be written ({e.strerror}: {e.filename}); "
            "free space or make the folder writable (the numbers are in summary.json)"
        ) from e
    return RunResult(out, result, seconds, trainer)


def _write_json(path: Path, data: Any) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2))
