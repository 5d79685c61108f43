"""The training layer: config, the patch trainer, checkpoints, evaluation, the run folder,
figures and the doctor.

* :class:`TrainConfig` / :func:`load_config` — a run's configuration (files and flags);
  :data:`LOGGERS` — the ``train.log`` choices.
* :class:`PatchTrainer` — the training loop with gradient accumulation and exact resume.
* :func:`evaluate_patch` — success rate next to a random-noise control;
  :func:`success_by_scale` — the same per patch scale (the figures use :mod:`attnpatch.viz`).
* :func:`run_training` / :func:`build_trainer` — what ``attnpatch train`` does.
* :func:`evaluate_transfer` — one patch on several victims in a :class:`TransferTable`;
  :func:`evaluate_transfer_file` — what ``attnpatch evaluate`` does.
* :class:`RunTracking` — ``train.log``: the run in TensorBoard or W&B (docs/logging.md).
* :func:`diagnose` / :func:`doctor` — the pipeline checklist, measured.
* :class:`Term` / :func:`register_term` / :func:`term_names` — the pipeline's loss terms, one
  registration each; ``weights.mode`` says how they become the update (:mod:`.weights`).
* :func:`environment` / :func:`describe_environment` — the versions and git commit a run
  records in summary.json (and the doctor prints).
"""

from .config import TrainConfig, add_config_flags, apply_flags, load_config
from .config_checks import LOGGERS
from .doctor import diagnose, doctor
from .environment import describe_environment, environment
from .evaluate import EvalResult, evaluate_patch, success_by_scale
from .run import RunResult, build_trainer, run_training
from .terms import Term, TermInputs, register_term, term_names
from .tracking import RunTracking
from .trainer import PatchTrainer
from .transfer import evaluate_transfer, evaluate_transfer_file
from .transfer_table import TransferRow, TransferTable

__all__ = [
    "TrainConfig",
    "load_config",
    "add_config_flags",
    "apply_flags",
    "PatchTrainer",
    "evaluate_patch",
    "EvalResult",
    "success_by_scale",
    "build_trainer",
    "run_training",
    "RunResult",
    "RunTracking",
    "evaluate_transfer",
    "evaluate_transfer_file",
    "TransferTable",
    "TransferRow",
    "diagnose",
    "doctor",
    "Term",
    "TermInputs",
    "register_term",
    "term_names",
    "LOGGERS",
    "environment",
    "describe_environment",
]
