"""The training layer: config, the patch trainer, checkpoints, evaluation, the run folder,
figures and the doctor.

* :class:`TrainConfig` / :func:`load_config` — a run's configuration (files and flags).
* :class:`PatchTrainer` — the training loop with gradient accumulation and exact resume.
* :func:`evaluate_patch` — success rate next to a random-noise control.
* :func:`run_training` / :func:`build_trainer` — what ``attnpatch train`` does.
* :func:`diagnose` / :func:`doctor` — the pipeline checklist, measured.
"""

from .config import TrainConfig, add_config_flags, apply_flags, load_config
from .doctor import diagnose, doctor
from .evaluate import EvalResult, evaluate_patch
from .run import RunResult, build_trainer, run_training
from .trainer import PatchTrainer

__all__ = [
    "TrainConfig",
    "load_config",
    "add_config_flags",
    "apply_flags",
    "PatchTrainer",
    "evaluate_patch",
    "EvalResult",
    "build_trainer",
    "run_training",
    "RunResult",
    "diagnose",
    "doctor",
]
