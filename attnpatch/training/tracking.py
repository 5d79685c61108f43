"""``train.log``: a run's metrics and images in TensorBoard or Weights & Biases (docs/logging.md).

The loggers are accelerate's trackers (:class:`accelerate.tracking.TensorBoardTracker`,
:class:`accelerate.tracking.WandBTracker`), started on process 0 alone, in a plain run and in a
data-parallel one alike: the process that writes ``metrics.jsonl`` is the one that logs.

What goes out, and when:

* ``loss/<term>`` (every loss term of ``metrics.jsonl``, and ``loss/total``), ``share/<term>``
  (each term's measured share of the update, at measuring iterations), ``train/success``
  and ``train/lr``, at step = iteration, from :meth:`RunTracking.log_records`, which
  :meth:`~attnpatch.training.metrics_log.MetricsLog.flush` calls with the very records it writes
  to ``metrics.jsonl`` (in a data-parallel run: the global means, at the optimizer steps);
* ``images/patch`` (the patch, ``(3, h, w)``) and ``images/attention`` (the first image of the
  batch, patched, under its label tokens' cross-attention) every ``train.log_images_every``
  iterations and after the last one, sent out with that iteration's scalars;
* ``eval/clean_accuracy``, ``eval/success_rate``, ``eval/control_success_rate`` at the last
  iteration.

Files go under ``<train.out_dir>/logs/``: ``tensorboard/`` (event files) or ``wandb/`` (the
W&B run folders). A resumed TensorBoard log continues in the same folder with a new event file
that starts with a restart marker at the resumed iteration (``SummaryWriter(purge_step=...)``),
so TensorBoard's reader drops what the interrupted session logged at or after it, as
``metrics.jsonl`` drops those lines.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError
from ..images import to_pil
from .config import TrainConfig, config_to_dict
from .trainer import IterationOutputs, PatchTrainer, attention_pipeline

__all__ = ["RunTracking", "require_logger", "LOG_DIR"]

#: The run folder's sub-folder for the loggers' files.
LOG_DIR = "logs"

#: ``train.log`` -> the modules it imports (the ``attnpatch[...]`` extra of the same name).
_MODULES = {"tensorboard": ("tensorboard", "torch.utils.tensorboard"), "wandb": ("wandb",)}


def require_logger(kind: str) -> None:
    """Raise a :class:`~attnpatch.errors.ConfigError` naming the extra to install when
    ``kind``'s package (``"tensorboard"`` or ``"wandb"``) cannot be imported; ``"none"`` passes.

    >>> require_logger("none")
    """
    for module in _MODULES.get(kind, ()):
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ConfigError(
                f"train.log is {kind!r} but {module} cannot be imported ({e}); install it with "
                f"pip install 'attnpatch[{kind}]', or train with --log none"
            ) from None


def _batch(image: torch.Tensor) -> torch.Tensor:
    """``(3, H, W)`` in [0, 1] -> ``(1, 3, H, W)`` uint8, rounded as the run folder's PNGs are
    (TensorBoard and W&B both take 8-bit images as they are)."""
    return torch.from_numpy(np.array(to_pil(image))).permute(2, 0, 1)[None]


class RunTracking:
    """The logger of one ``attnpatch train`` session; a context manager that closes it.

    Created before anything is built (it checks that the logger's package imports: see
    :func:`require_logger`), started by :meth:`start` once the trainer exists and is resumed,
    closed when the ``with`` block ends, also on an error or Ctrl-C, so the files stay readable.

    Args:
        config: the run's config (``train.log``, ``train.log_images_every``).
    """

    def __init__(self, config: TrainConfig):
        self.config = config
        self.kind = config.train.log
        require_logger(self.kind)
        self.tracker: Any = None  #: the started accelerate tracker (``None``: not logging)
        self.trainer: PatchTrainer | None = None
        self._images: list[tuple[int, dict[str, torch.Tensor]]] = []  # waiting for their step
        self._pipeline = None  # for the heat maps when the attention losses are off

    def __enter__(self) -> RunTracking:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start(self, trainer: PatchTrainer) -> None:
        """Start the tracker on process 0 (no-op for ``train.log: none``, other processes, or
        a trainer without ``out_dir``), hand it to the trainer's :class:`MetricsLog`, and hook
        the image logging into the loop. ``trainer.iteration`` > 0 is a resumed run."""
        if self.kind == "none" or not trainer.dist.is_main or trainer.out_dir is None:
            return
        from accelerate import PartialState

        logs = trainer.out_dir / LOG_DIR
        logs.mkdir(parents=True, exist_ok=True)
        if self.kind == "tensorboard":
            from accelerate.tracking import TensorBoardTracker

            # a resumed session hides what the interrupted one logged from this iteration on
            purge = trainer.iteration if trainer.iteration else None
            tracker = TensorBoardTracker("tensorboard", logs, purge_step=purge)
        else:
            from accelerate.tracking import WandBTracker

            name = trainer.out_dir.name
            tracker = WandBTracker(
                os.environ.get("WANDB_PROJECT", "attnpatch"),
                dir=str(logs),
                name=name if not trainer.iteration else f"{name}@{trainer.iteration}",
                group=name,  # a resumed session is a new W&B run of the same group
                config=config_to_dict(self.config),
            )
        PartialState()  # accelerate's process state (the Accelerator's, in a data-parallel run)
        try:
            tracker.start()
        except Exception as e:  # wandb.errors.UsageError (no login), a network error, ...
            if self.kind != "wandb":
                raise
            raise ConfigError(
                f"W&B could not start a run ({type(e).__name__}: {e}); log in with `wandb "
                "login`, or set WANDB_MODE=offline to write the run locally (docs/logging.md)"
            ) from e
        self.tracker, self.trainer = tracker, trainer
        trainer.tracker = self
        trainer.hooks["iteration"].append(self._iteration)

    # -- what MetricsLog and the run send ----------------------------------------------------
    def log_records(self, records: list[dict[str, Any]]) -> None:
        """Log ``metrics.jsonl`` records (as :meth:`MetricsLog.flush` writes them): each loss
        term and the total as ``loss/<name>``, ``train/success``, ``train/lr``, at step =
        ``record["iteration"]``; then the images waiting for that iteration."""
        if self.tracker is None:
            return
        lr = float(self.trainer.optimizer.param_groups[0]["lr"])
        for record in records:
            step = int(record["iteration"])
            values = {
                (f"share/{k[6:]}" if k.startswith("share.") else f"loss/{k}"): v
                for k, v in record.items()
                if isinstance(v, float) and k != "success"
            }
            values["train/success"] = float(record["success"])
            values["train/lr"] = lr
            self.tracker.log(values, step=step)
            self._send_images(step)

    def log_evaluation(self, evaluation: dict[str, Any]) -> None:
        """The final evaluation's rates (``EvalResult.to_dict()``) as ``eval/<name>``, at the
        last iteration."""
        if self.tracker is None:
            return
        rates = {f"eval/{k}": v for k, v in evaluation.items() if isinstance(v, float)}
        self.tracker.log(rates, step=self.trainer.iteration - 1)

    def close(self) -> None:
        """Send the images still waiting, flush and close the tracker (idempotent)."""
        if self.tracker is None:
            return
        tracker, self.tracker = self.tracker, None
        try:
            for step, images in self._images:
                tracker.log_images(images, step=step)
            self._images = []
        finally:
            tracker.finish()

    # -- images --------------------------------------------------------------------------------
    def _iteration(self, trainer: PatchTrainer, out: IterationOutputs, stepped: bool) -> None:
        """The trainer's "iteration" hook: keep this iteration's images if they are due (every
        ``train.log_images_every`` iterations, and after the last)."""
        every, done = self.config.train.log_images_every, trainer.iteration
        due = done == self.config.train.iterations or (every and done % every == 0)
        if due and self.tracker is not None:
            self._images.append((done - 1, self.images(trainer, out)))

    def _send_images(self, step: int) -> None:
        while self._images and self._images[0][0] <= step:
            at, images = self._images.pop(0)
            self.tracker.log_images(images, step=at)

    def images(self, trainer: PatchTrainer, out: IterationOutputs) -> dict[str, torch.Tensor]:
        """``{"images/patch": (1, 3, h, w), "images/attention": (1, 3, H, W)}`` uint8: the
        patch, and the batch's first patched image under the mean cross-attention of its label
        tokens (:func:`attnpatch.viz.overlay`), from this iteration's attention maps (or, with
        the attention losses off, one extra pass of the attention pipeline, without gradient)."""
        from ..viz import overlay  # here: attnpatch.viz imports matplotlib

        label = int(out.labels[0])
        tokens = trainer.tokens[label]
        with torch.no_grad():
            result, pipe = out.attention, trainer.attention
            if result is None:
                if self._pipeline is None:
                    self._pipeline = attention_pipeline(trainer.config, trainer.parts)
                pipe = self._pipeline
                result = pipe(out.patched[:1].detach(), [trainer.prompts[label]])
            amap = result.cross_maps(pipe.cross_resolution)[0, ..., tokens].mean(-1)
            patched = out.patched[0].detach().float().cpu()
            heat = overlay(patched, amap.float().cpu())
        return {
            "images/patch": _batch(trainer.patch.pixels[0]),
            "images/attention": _batch(heat),
        }
