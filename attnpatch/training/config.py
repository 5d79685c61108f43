"""Run configuration: nested dataclasses, read from YAML or TOML, every field a CLI flag.

A config file has the sections below (all optional; unknown keys are rejected with the
closest valid name). Every field is also a flag: ``--patch.size 16``, ``--train.lr 0.05``.

>>> cfg = TrainConfig()
>>> cfg.train.accumulate
4
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any

from ..diffusion import PROMPT_TEMPLATE
from ..errors import AttnPatchError
from ..patch import EOT

__all__ = [
    "TrainConfig",
    "ModelsConfig",
    "DataConfig",
    "PatchConfig",
    "AttackConfig",
    "AttentionConfig",
    "WeightsConfig",
    "TrainLoopConfig",
    "EvalConfig",
    "load_config",
    "add_config_flags",
    "apply_flags",
    "config_to_dict",
    "config_from_dict",
]


@dataclass
class ModelsConfig:
    """Which models (names resolved by ``attnpatch.models``)."""

    classifier: str = "tiny"  #: "tiny", "torchvision:resnet50", "timm:...", a registered name
    #: a local weights file (or a torchvision weights name such as "IMAGENET1K_V2"); "" = none
    classifier_weights: str = ""
    #: "shapes" (trained on the shapes world, shipped), "tiny", "tiny-sd2", "tiny-sdxl" (random
    #: weights), a registered name, a local diffusers folder, or a Hugging Face hub id
    #: ("org/name" or "org/name@revision": from the HF cache; HF_HUB_OFFLINE=1 never downloads)
    diffusion: str = "shapes"
    #: diffusers' weights variant of a folder or hub id ("fp16": *.fp16.safetensors); "" = none
    variant: str = ""
    device: str = "auto"  #: "auto" (cuda if available), "cpu", "cuda", "cuda:1"
    #: the diffusion stack's dtype: "float32", "float16" or "bfloat16" (load_diffusion's
    #: torch_dtype: the VAE stays float32 under float16; the patch and the maps stay float32)
    dtype: str = "float32"


@dataclass
class DataConfig:
    """Training and held-out images."""

    train: str = "synthetic"  #: "synthetic", an image folder, or a CSV of path,label
    eval: str = "synthetic"  #: same forms; "synthetic" uses the held-out synthetic split
    image_size: int = 32  #: images are resized to image_size x image_size
    batch_size: int = 1
    synthetic_per_class: int = 40  #: synthetic training images per class
    synthetic_eval_per_class: int = 20  #: synthetic held-out images per class
    prompt_template: str = PROMPT_TEMPLATE  #: the class prompt; {label} is the class name


@dataclass
class PatchConfig:
    """The patch, where it goes, and EOT (see docs/patch.md)."""

    size: int = 12  #: side of the square patch tensor, in pixels
    shape: str = "square"  #: "square" or "circle"
    init: str = "random"  #: "gray", "random", or an image path
    #: [low, high]: placed side / image side, drawn per image; []: the patch's own pixel size
    scale: list[float] = field(default_factory=lambda: [0.25, 0.35])
    position: str = "random"  #: "random" or "center"
    eot: bool = True  #: the EOT switch for training (evaluation always uses EOT)
    degrees: float = 20.0  #: rotation, +- degrees
    eot_scale: list[float] = field(default_factory=lambda: [0.9, 1.1])  #: extra scale factor
    translate: float = 0.05  #: +- fraction of the placed patch side
    distortion: float = 0.1  #: perspective corner jitter (fraction of the half side)
    contrast: list[float] = field(default_factory=lambda: [0.8, 1.2])
    brightness: float = 0.1  #: +- additive
    noise: float = 0.1  #: +- per-pixel uniform noise

    def transforms(self) -> EOT:
        """The :class:`~attnpatch.patch.EOT` these fields describe (it checks their ranges)."""
        return EOT(
            enabled=True,
            degrees=self.degrees,
            scale=tuple(self.eot_scale),
            translate=self.translate,
            distortion=self.distortion,
            contrast=tuple(self.contrast),
            brightness=self.brightness,
            noise=self.noise,
        )


@dataclass
class AttackConfig:
    """What the attack wants from the classifier."""

    targeted: bool = False
    target: str = ""  #: class name for targeted attacks
    loss: str = "ce"  #: "ce" or "cw"
    kappa: float = 0.0  #: CW confidence margin


@dataclass
class AttentionConfig:
    """The attention pipeline (image -> VAE -> DDIM inversion -> denoise under hijack)."""

    num_inference_steps: int = 10  #: N: the DDIM schedule
    num_steps: int = 2  #: k: differentiable inversion and denoise steps (last k of N)
    guidance_scale: float = 1.0  #: while denoising (1.0: conditional only)
    cross_loss: str = "variance"  #: "variance", "repel" or "attract"
    #: map side for cross-attention losses; 0 = the smallest side where down and up blocks attend
    cross_resolution: int = 0
    self_resolutions: list[int] = field(default_factory=list)  #: [] = the two smallest
    checkpoint: bool = False  #: recompute UNet calls in backward (flat memory in num_steps)
    #: "auto" (per device: "fast" on the CPU, "low" on CUDA; "balanced" if checkpoint is
    #: true), "low", "balanced" or "fast" (AttentionPipeline(memory=...), docs/performance.md)
    memory: str = "auto"
    diffusion_size: int = 0  #: image side fed to the VAE; 0 = the image size


@dataclass
class WeightsConfig:
    """Loss weights (docs/losses.md); 0 removes a term without computing it.

    Defaults: chosen on the embedded default (the "shapes" stack) so that every weighted term is
    of order 1 at the start, next to a classifier term of order 1-10 (docs/training.md): the
    label map's variance is ~3e-3 there, the self-attention MSE ~6e-5. DiffAttack's weights on
    SD at 224 px are 10 / 10000 / 100.
    """

    classifier: float = 10.0
    cross_attention: float = 1000.0
    self_attention: float = 10000.0
    l2: float = 0.01
    tv: float = 0.0


@dataclass
class TrainLoopConfig:
    """The optimisation loop."""

    iterations: int = 200
    accumulate: int = 4  #: K: optimizer.step() every K iterations (the accumulation counter)
    lr: float = 0.05
    optimizer: str = "adam"  #: "adam" or "sgd"
    seed: int = 0
    checkpoint_every: int = 50  #: iterations between checkpoints (0: only at the end)
    out_dir: str = "runs/tiny"
    progress: bool = True  #: tqdm progress bar
    #: CPU threads for the run (0: torch's default, every core). Bit-identical runs need the
    #: same count; 1 is also the fastest for the tiny models (docs/training.md)
    threads: int = 1
    #: "none", "tensorboard" or "wandb": also log metrics and images there (docs/logging.md);
    #: off by default: metrics.jsonl always holds every value, and a logger is an extra package
    log: str = "none"
    log_images_every: int = 50  #: iterations between logged images (0: only at the end)


@dataclass
class EvalConfig:
    """The final evaluation on held-out images (EOT on)."""

    eot_samples: int = 4  #: EOT draws per held-out image
    examples: int = 8  #: patched examples in examples.png


@dataclass
class TrainConfig:
    """Everything ``attnpatch train`` needs."""

    models: ModelsConfig = field(default_factory=ModelsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    patch: PatchConfig = field(default_factory=PatchConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> TrainConfig:
        """Raise on values that would fail later (before any work is done)."""
        t, a, p, d = self.train, self.attention, self.patch, self.data
        _require(
            t.accumulate >= 1, "train.accumulate (K) must be >= 1", "e.g. 1 for plain training"
        )
        _require(t.iterations >= 1, "train.iterations must be >= 1", "")
        _require(t.lr > 0, "train.lr must be > 0", "")
        _require(t.optimizer in ("adam", "sgd"), "train.optimizer must be 'adam' or 'sgd'", "")
        _require(t.checkpoint_every >= 0, "train.checkpoint_every must be >= 0", "0 = end only")
        _require(t.threads >= 0, "train.threads must be >= 0", "0 = torch's default")
        _require(
            t.log in ("none", "tensorboard", "wandb"),
            f"train.log must be 'none', 'tensorboard' or 'wandb', got {t.log!r}",
            "docs/logging.md",
        )
        _require(t.log_images_every >= 0, "train.log_images_every must be >= 0", "0 = end only")
        _require(d.batch_size >= 1, "data.batch_size must be >= 1", "")
        _require(d.image_size >= 8, "data.image_size must be >= 8", "")
        _require("{label}" in d.prompt_template, "data.prompt_template needs '{label}'", "")
        _require(a.num_inference_steps >= 1, "attention.num_inference_steps must be >= 1", "")
        _require(
            1 <= a.num_steps <= a.num_inference_steps,
            f"attention.num_steps ({a.num_steps}) must be in [1, num_inference_steps "
            f"({a.num_inference_steps})]",
            "lower num_steps or raise num_inference_steps",
        )
        _require(
            a.cross_loss in ("variance", "repel", "attract"),
            "attention.cross_loss must be 'variance', 'repel' or 'attract'",
            "",
        )
        _require(p.shape in ("square", "circle"), "patch.shape must be 'square' or 'circle'", "")
        _require(
            p.position in ("random", "center"), "patch.position must be 'random' or 'center'", ""
        )
        _require(
            not p.scale or (len(p.scale) == 2 and 0 < p.scale[0] <= p.scale[1] <= 1),
            f"patch.scale must be [low, high] with 0 < low <= high <= 1, or [] (native size), "
            f"got {p.scale}",
            "e.g. [0.3, 0.4]",
        )
        try:
            p.transforms()
        except AttnPatchError as e:
            raise AttnPatchError(f"patch: {e} (the patch.* EOT fields)") from None
        _require(p.size >= 1, f"patch.size must be >= 1, got {p.size}", "")
        _require(
            self.eval.eot_samples >= 1 and self.eval.examples >= 0,
            "eval.eot_samples must be >= 1 and eval.examples >= 0",
            "",
        )
        _require(self.attack.loss in ("ce", "cw"), "attack.loss must be 'ce' or 'cw'", "")
        _require(
            a.memory in ("auto", "low", "balanced", "fast"),
            f"attention.memory must be 'auto', 'low', 'balanced' or 'fast', got {a.memory!r}",
            "'auto' picks per device",
        )
        _require(
            not (a.checkpoint and a.memory == "fast"),
            "attention.checkpoint is true but attention.memory is 'fast'",
            "drop attention.checkpoint (memory: balanced is the same)",
        )
        _require(
            self.models.dtype in ("float32", "float16", "bfloat16"),
            f"models.dtype must be 'float32', 'float16' or 'bfloat16', got {self.models.dtype!r}",
            "",
        )
        _require(
            not self.attack.targeted or bool(self.attack.target),
            "attack.targeted is on but attack.target is empty",
            "set attack.target to a class name",
        )
        for name, w in dataclasses.asdict(self.weights).items():
            _require(w >= 0, f"weights.{name} must be >= 0, got {w}", "")
        return self


def _require(ok: bool, problem: str, fix: str) -> None:
    if not ok:
        raise AttnPatchError(problem + (f" ({fix})" if fix else ""))


# -- dict <-> dataclass ----------------------------------------------------------------------


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (JSON-serialisable)."""
    return dataclasses.asdict(cfg)


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _coerce(value: Any, typ: Any, where: str) -> Any:
    origin = typing.get_origin(typ)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        if not isinstance(value, (list, tuple)):
            raise AttnPatchError(f"{where} must be a list, got {value!r}")
        (item,) = typing.get_args(typ)[:1] or (Any,)
        return [_coerce(v, item, where) for v in value]
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise AttnPatchError(f"{where} must be true or false, got {value!r}")
    if typ in (int, float):
        if isinstance(value, bool):
            raise AttnPatchError(f"{where} must be a number, got {value!r}")
        try:
            number = typ(value)
        except (TypeError, ValueError):
            raise AttnPatchError(f"{where} must be {typ.__name__}, got {value!r}") from None
        if typ is int and float(value) != number:
            raise AttnPatchError(f"{where} must be an integer, got {value!r}")
        return number
    if typ is str:
        if not isinstance(value, str):
            raise AttnPatchError(f"{where} must be a string, got {value!r}")
        return value
    return value


def _unknown(key: str, valid: list[str], where: str) -> AttnPatchError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"
    return AttnPatchError(f"unknown config key {where}{key!r}{hint}")


def config_from_dict(data: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """A validated :class:`TrainConfig` from nested dict ``data`` over ``base`` (defaults)."""
    cfg = base if base is not None else TrainConfig()
    cfg = dataclasses.replace(cfg)
    if not isinstance(data, dict):
        raise AttnPatchError(f"a config must be a mapping of sections, got {type(data).__name__}")
    sections = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for sname, values in data.items():
        if sname not in sections:
            raise _unknown(sname, list(sections), "")
        if not isinstance(values, dict):
            raise AttnPatchError(f"config section [{sname}] must be a mapping, got {values!r}")
        section = getattr(cfg, sname)
        cls = type(section)
        fields = {f.name for f in dataclasses.fields(cls)}
        updates = {}
        for key, value in values.items():
            if key not in fields:
                raise _unknown(key, sorted(fields), f"{sname}.")
            updates[key] = _coerce(value, _field_type(cls, key), f"{sname}.{key}")
        setattr(cfg, sname, dataclasses.replace(section, **updates))
    return cfg.validate()


def load_config(
    path: str | os.PathLike | None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """Read a YAML (``.yaml``/``.yml``), TOML (``.toml``) or JSON file, then ``overrides``
    (``{"section.key": value}``); ``path=None`` starts from the defaults."""
    data: dict[str, Any] = {}
    if path is not None:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise AttnPatchError(f"config file {path!r} does not exist")
        ext = os.path.splitext(path)[1].lower()
        if ext not in (".yaml", ".yml", ".toml", ".json"):
            raise AttnPatchError(f"config {path!r}: use a .yaml, .yml, .toml or .json file")
        with open(path, "rb") as f:
            raw = f.read()
        data = _parse(raw, ext, path)
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        data.setdefault(section, {})[key] = value
    return config_from_dict(data)


def _parse(raw: bytes, ext: str, path: str) -> Any:
    """The file's mapping; a syntax error names the file and the line."""
    try:
        if ext in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(raw) or {}
        if ext == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib

            return tomllib.loads(raw.decode())
        return json.loads(raw)
    except Exception as e:  # yaml.YAMLError, tomllib.TOMLDecodeError, ValueError, Unicode
        detail = " ".join(str(e).split())
        raise AttnPatchError(
            f"config {path!r} is not valid {ext[1:].upper()}: {detail[:300]}; fix the file "
            "(docs/training.md shows an example)"
        ) from None


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--section.key`` flag per config field (values parsed like file values)."""
    for sec in dataclasses.fields(TrainConfig):
        group = parser.add_argument_group(f"[{sec.name}]")
        section_cls = typing.get_type_hints(TrainConfig)[sec.name]
        defaults = section_cls()
        for f in dataclasses.fields(section_cls):
            typ = _field_type(section_cls, f.name)
            nargs = "+" if typing.get_origin(typ) in (list, tuple) else None
            group.add_argument(
                f"--{sec.name}.{f.name}",
                dest=f"cfg::{sec.name}.{f.name}",
                nargs=nargs,
                default=None,
                metavar=typ.__name__.upper() if isinstance(typ, type) else "V",
                help=f"(default: {getattr(defaults, f.name)!r})",
            )


def apply_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The ``{"section.key": value}`` overrides given on the command line."""
    return {
        k.removeprefix("cfg::"): v
        for k, v in vars(args).items()
        if k.startswith("cfg::") and v is not None
    }
