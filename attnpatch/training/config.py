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
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from ..diffusion import PROMPT_TEMPLATE
from ..errors import ConfigError
from ..patch import EOT
from .terms import describe
from .weights import WeightsConfig

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
    #: data class name -> the classifier's class name, for folders named otherwise (classes
    #: are matched by name; a name the classifier does not know is an error without this)
    class_map: dict[str, str] = field(default_factory=dict)


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
    #: "repel" (default: the label's attention mass on the patch down), "attract" or "variance"
    #: (DiffAttack's label-map variance); chosen by the sweep in docs/training.md
    cross_loss: str = "repel"
    #: map side for cross-attention losses; 0 = the smallest side where down and up blocks attend
    cross_resolution: int = 0
    self_resolutions: list[int] = field(default_factory=list)  #: [] = the two smallest
    checkpoint: bool = False  #: recompute UNet calls in backward (flat memory in num_steps)
    #: "auto" (per device: "fast" on the CPU, "low" on CUDA; "balanced" if checkpoint is
    #: true), "low", "balanced" or "fast" (AttentionPipeline(memory=...), docs/performance.md)
    memory: str = "auto"
    diffusion_size: int = 0  #: image side fed to the VAE; 0 = the image size


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
    #: data-parallel runs: minutes a process waits for the others at a collective before the
    #: run fails naming the process that stalled (docs/distributed.md)
    collective_timeout_minutes: float = 10.0


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
        """Raise :class:`~attnpatch.errors.ConfigError` on values that would fail later (before
        any work is done); the rules are in :mod:`attnpatch.training.config_checks`."""
        from .config_checks import validate_config

        validate_config(self)
        return self


# -- dict <-> dataclass ----------------------------------------------------------------------


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (JSON-serialisable)."""
    return dataclasses.asdict(cfg)


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


#: The largest integer a config field may hold (torch's int64 seeds and counters).
_INT_MAX = 2**63 - 1


def _coerce(value: Any, typ: Any, where: str) -> Any:
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):  # `float | None`: None keeps the default
        if value is None or (isinstance(value, str) and value.lower() in ("none", "default")):
            return None
        (inner,) = [a for a in typing.get_args(typ) if a is not type(None)]
        return _coerce(value, inner, where)
    if origin is dict:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, (list, tuple)):  # from the command line: KEY=VALUE words
            pairs = [str(v).partition("=") for v in value]
            bad = [str(v) for v, (k, eq, val) in zip(value, pairs) if not (k and eq and val)]
            if bad:
                raise ConfigError(f"{where} takes KEY=VALUE pairs, got {bad[0]!r}")
            value = {k: val for k, _, val in pairs}
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping (KEY: VALUE), got {value!r}")
        return {str(k): _coerce(v, str, f"{where}.{k}") for k, v in value.items()}
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (item,) = typing.get_args(typ)[:1] or (Any,)
        return [_coerce(v, item, where) for v in value]
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if typ in (int, float):
        return _number(value, typ, where)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    return value


def _number(value: Any, typ: type, where: str) -> int | float:
    """An int or a finite float field's value; ``.inf``, ``1e400`` and NaN are refused, and
    ints beyond int64."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{where} must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{where} must be {typ.__name__}, got {value!r}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{where} must be a finite number, got {value!r}; give a plain number")
    if typ is float:
        return number
    if isinstance(value, int):
        result = value
    elif number.is_integer():
        try:
            result = int(value)  # "12" exactly; "1e3" through the float
        except ValueError:
            result = int(number)
    else:
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if abs(result) > _INT_MAX:
        raise ConfigError(f"{where} is too large ({value!r}); it must be below 2**63")
    return result


def _unknown(key: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"unknown config key {where}{key!r}{hint}")


def config_from_dict(data: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """A validated :class:`TrainConfig` from nested dict ``data`` over ``base`` (defaults)."""
    cfg = base if base is not None else TrainConfig()
    cfg = dataclasses.replace(cfg)
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(data).__name__}")
    sections = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for sname, values in data.items():
        if sname not in sections:
            raise _unknown(sname, list(sections), "")
        if not isinstance(values, dict):
            raise ConfigError(f"config section [{sname}] must be a mapping, got {values!r}")
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


#: The config file endings :func:`load_config` reads.
CONFIG_EXTENSIONS = (".yaml", ".yml", ".toml", ".json")


def load_config(
    path: str | os.PathLike | None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """Read a YAML (``.yaml``/``.yml``), TOML (``.toml``) or JSON file, then ``overrides``
    (``{"section.key": value}``); ``path=None`` starts from the defaults. A byte-order mark is
    allowed; a key given twice in one mapping is refused (as TOML does), naming its line."""
    data: dict[str, Any] = {}
    if path is not None:
        path = os.path.expanduser(os.fspath(path))
        if os.path.isdir(path):
            raise ConfigError(
                f"config {path!r} is a folder; pass a config file "
                f"({', '.join(CONFIG_EXTENSIONS)}) with --config"
            )
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path!r} does not exist")
        ext = os.path.splitext(path)[1].lower()
        if ext not in CONFIG_EXTENSIONS:
            raise ConfigError(f"config {path!r}: use a .yaml, .yml, .toml or .json file")
        with open(path, "rb") as f:
            raw = f.read()
        data = _parse(raw, ext, path)
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if not isinstance(data.get(section, {}), dict):
            continue  # config_from_dict names the section that is not a mapping
        data.setdefault(section, {})[key] = value
    return config_from_dict(data)


class _Duplicate(ValueError):
    """A key given twice in one mapping of a config file."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads``'s ``object_pairs_hook``: a dict, refusing a key given twice."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Duplicate(f"key {key!r} is given twice in one mapping")
        out[key] = value
    return out


def _yaml_loader() -> type:
    """PyYAML's safe loader, refusing a key given twice in one mapping (it keeps the last)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):  # noqa: ANN001
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise _Duplicate(
                        f"key {key!r} is given twice in one mapping (line "
                        f"{seen[key].start_mark.line + 1} and line "
                        f"{key_node.start_mark.line + 1})"
                    )
                seen[key] = key_node
            return super().construct_mapping(node, deep=deep)

    return Loader


def _parse(raw: bytes, ext: str, path: str) -> Any:
    """The file's mapping; a syntax error or a duplicated key names the file and the line."""
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark is not part of the text
        if ext in (".yaml", ".yml"):
            import yaml

            return yaml.load(text, Loader=_yaml_loader()) or {}  # noqa: S506 - a SafeLoader
        if ext == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib

            return tomllib.loads(text)
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except _Duplicate as e:
        raise ConfigError(
            f"config {path!r}: {e}; the first one would be ignored: merge them into one"
        ) from None
    except Exception as e:  # yaml.YAMLError, tomllib.TOMLDecodeError, ValueError, Unicode
        detail = " ".join(str(e).split())
        raise ConfigError(
            f"config {path!r} is not valid {ext[1:].upper()}: {detail[:300]}; fix the file "
            "(docs/training.md shows an example)"
        ) from None


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--section.key`` flag per config field (values parsed like file values; a mapping
    field takes ``KEY=VALUE`` words)."""
    for sec in dataclasses.fields(TrainConfig):
        group = parser.add_argument_group(f"[{sec.name}]")
        section_cls = typing.get_type_hints(TrainConfig)[sec.name]
        defaults = section_cls()
        for f in dataclasses.fields(section_cls):
            typ = _field_type(section_cls, f.name)
            many = typing.get_origin(typ) in (list, tuple, dict)
            default = f"{getattr(defaults, f.name)!r}"
            if sec.name == "weights" and f.name in describe("share"):
                default = f"share {describe('share')[f.name]:g} / sum {describe('sum')[f.name]:g}"
            group.add_argument(
                f"--{sec.name}.{f.name}",
                dest=f"cfg::{sec.name}.{f.name}",
                nargs="+" if many else None,
                default=None,
                metavar=typ.__name__.upper() if isinstance(typ, type) else "V",
                help=f"(default: {default})",
            )


def apply_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The ``{"section.key": value}`` overrides given on the command line."""
    return {
        k.removeprefix("cfg::"): v
        for k, v in vars(args).items()
        if k.startswith("cfg::") and v is not None
    }
