"""Every rule of :meth:`TrainConfig.validate`: each names the field, the rule and a fix, and
raises :class:`~attnpatch.errors.ConfigError` before any work is done.

The choices are read from the library's constants (:data:`~attnpatch.diffusion.MEMORY_MODES`,
:data:`~attnpatch.patch.MASK_SHAPES`, :data:`~attnpatch.patch.POSITIONS`,
:data:`~attnpatch.losses.CLASSIFIER_LOSSES`, :data:`~attnpatch.losses.REGION_MODES`, ...), so a
new choice there is a new choice here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from .._util import deprecated
from ..diffusion import MEMORY_MODES, part_dtypes
from ..errors import AttnPatchError, ConfigError
from ..losses import CLASSIFIER_LOSSES, REGION_MODES
from ..patch import MASK_SHAPES, POSITIONS

__all__ = [
    "validate_config",
    "pipeline_memory",
    "check_device",
    "OPTIMIZERS",
    "LOGGERS",
    "CROSS_LOSSES",
    "MAX_THREADS",
    "DTYPES",
]

#: ``train.optimizer`` choices.
OPTIMIZERS = ("adam", "sgd")
#: ``train.log`` choices (docs/logging.md).
LOGGERS = ("none", "tensorboard", "wandb")
#: ``attention.cross_loss`` choices: the label map's variance, or a region mode.
CROSS_LOSSES = ("variance", *REGION_MODES)
#: ``models.dtype`` choices (``load_diffusion(torch_dtype=...)``).
DTYPES = ("float32", "float16", "bfloat16")
#: The most CPU threads ``train.threads`` may ask for.
MAX_THREADS = 1024


def pipeline_memory(attention: Any) -> str | None:
    """``AttentionPipeline(memory=...)`` for an ``[attention]`` section: ``"auto"`` is ``None``
    (the device's default), or ``"balanced"`` with the deprecated ``checkpoint: true``."""
    if attention.memory == "auto":
        return "balanced" if attention.checkpoint else None
    return attention.memory


def _require(ok: bool, problem: str, fix: str = "") -> None:
    if not ok:
        raise ConfigError(problem + (f" ({fix})" if fix else ""))


def _one_of(value: Any, choices: tuple[str, ...], where: str, fix: str = "") -> None:
    shown = ", ".join(repr(c) for c in choices)
    _require(value in choices, f"{where} must be one of {shown}, got {value!r}", fix)


def check_device(name: str, where: str = "models.device") -> None:
    """Refuse a device name torch does not parse (``"gpu"``), or whose kind this torch build
    lacks (``"mps"`` without MPS); availability of a CUDA device is checked when the run
    starts (:func:`~attnpatch.training.run.resolve_device`)."""
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(
            f"{where} {name!r} is not a device torch knows; use 'auto', 'cpu', 'cuda' or 'cuda:N'"
        ) from None
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(
            f"{where} is 'mps' but this torch build or machine has no MPS; use 'auto' or 'cpu'"
        )
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(
            f"{where} {name!r}: attnpatch runs on 'cpu', 'cuda' or 'mps'; use 'auto' or one "
            "of those"
        )


def _finite(cfg: Any) -> None:
    """Every number finite (``.inf``, ``1e400`` and NaN are refused by name)."""
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            items = value if isinstance(value, (list, tuple)) else [value]
            for v in items:
                if isinstance(v, float) and not math.isfinite(v):
                    raise ConfigError(
                        f"{section.name}.{f.name} must be a finite number, got {value!r}; give "
                        "a plain number"
                    )


def validate_config(cfg: Any) -> None:
    """Raise :class:`ConfigError` on values of ``cfg`` (a ``TrainConfig``) that would fail
    later; warn (``FutureWarning``) on deprecated fields."""
    _finite(cfg)
    t, a, p, d, m = cfg.train, cfg.attention, cfg.patch, cfg.data, cfg.models
    _require(t.accumulate >= 1, "train.accumulate (K) must be >= 1", "e.g. 1 for plain training")
    _require(t.iterations >= 1, "train.iterations must be >= 1")
    _require(
        t.accumulate <= t.iterations,
        f"train.accumulate (K={t.accumulate}) is larger than train.iterations "
        f"({t.iterations}): the run would take no optimizer step and the patch would never "
        "change",
        "lower train.accumulate or raise train.iterations",
    )
    _require(t.lr > 0, "train.lr must be > 0")
    _one_of(t.optimizer, OPTIMIZERS, "train.optimizer")
    _require(t.checkpoint_every >= 0, "train.checkpoint_every must be >= 0", "0 = end only")
    _require(
        0 <= t.threads <= MAX_THREADS,
        f"train.threads must be in [0, {MAX_THREADS}], got {t.threads}",
        "0 = torch's default, 1 is the fastest for the tiny models",
    )
    _one_of(t.log, LOGGERS, "train.log", "docs/logging.md")
    _require(t.log_images_every >= 0, "train.log_images_every must be >= 0", "0 = end only")
    _require(
        bool(str(t.out_dir).strip()),
        "train.out_dir is empty",
        "name the run folder, e.g. runs/tiny ('.' means the current folder)",
    )
    _require(
        t.collective_timeout_minutes > 0,
        f"train.collective_timeout_minutes must be > 0, got {t.collective_timeout_minutes}",
        "e.g. 10; data-parallel runs only",
    )
    _require(d.batch_size >= 1, "data.batch_size must be >= 1")
    _require(d.image_size >= 8, "data.image_size must be >= 8")
    _require("{label}" in d.prompt_template, "data.prompt_template needs '{label}'")
    _require(
        all(isinstance(v, str) and v for v in d.class_map.values()),
        "data.class_map must map each data class name to a classifier class name",
        "e.g. --data.class_map cat=tabby dog=beagle",
    )
    _require(a.num_inference_steps >= 1, "attention.num_inference_steps must be >= 1")
    _require(
        1 <= a.num_steps <= a.num_inference_steps,
        f"attention.num_steps ({a.num_steps}) must be in [1, num_inference_steps "
        f"({a.num_inference_steps})]",
        "lower num_steps or raise num_inference_steps",
    )
    _one_of(a.cross_loss, CROSS_LOSSES, "attention.cross_loss")
    _require(
        a.diffusion_size >= 0,
        f"attention.diffusion_size must be >= 0, got {a.diffusion_size}",
        "0 = the image size",
    )
    _require(
        a.cross_resolution >= 0,
        f"attention.cross_resolution must be >= 0, got {a.cross_resolution}",
        "0 = the smallest side where down and up blocks attend",
    )
    _require(
        all(r >= 1 for r in a.self_resolutions),
        f"attention.self_resolutions must be map sides >= 1, got {a.self_resolutions}",
        "[] = the two smallest",
    )
    _one_of(p.shape, MASK_SHAPES, "patch.shape")
    _one_of(p.position, POSITIONS, "patch.position")
    _require(
        not p.scale or (len(p.scale) == 2 and 0 < p.scale[0] <= p.scale[1] <= 1),
        f"patch.scale must be [low, high] with 0 < low <= high <= 1, or [] (native size), got "
        f"{p.scale}",
        "e.g. [0.3, 0.4]",
    )
    try:
        p.transforms()
    except AttnPatchError as e:
        raise ConfigError(f"patch: {e} (the patch.* EOT fields)") from None
    _require(p.size >= 1, f"patch.size must be >= 1, got {p.size}")
    _require(
        cfg.eval.eot_samples >= 1 and cfg.eval.examples >= 0,
        "eval.eot_samples must be >= 1 and eval.examples >= 0",
    )
    _one_of(cfg.attack.loss, CLASSIFIER_LOSSES, "attack.loss")
    _one_of(a.memory, ("auto", *MEMORY_MODES), "attention.memory", "'auto' picks per device")
    if a.checkpoint:
        deprecated("attention.checkpoint: true", "attention.memory: balanced")
    _require(
        not (a.checkpoint and a.memory == "fast"),
        "attention.checkpoint is true but attention.memory is 'fast'",
        "drop attention.checkpoint (memory: balanced is the same)",
    )
    _one_of(m.dtype, DTYPES, "models.dtype")
    part_dtypes(m.dtype)  # the library's own check agrees
    check_device(m.device)
    _require(
        not cfg.attack.targeted or bool(cfg.attack.target),
        "attack.targeted is on but attack.target is empty",
        "set attack.target to a class name",
    )
    cfg.weights.check()  # the [weights] section checks itself (training/weights.py)
