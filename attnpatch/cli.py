"""The ``attnpatch`` command line: ``train``, ``apply``, ``evaluate``, ``doctor``, ``trace``.

Each verb is a ``_cmd_<verb>(args)`` function and a ``_add_<verb>(subparsers)`` that declares
its flags; :func:`build_parser` lists them. A new verb is one more such pair.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys

from .errors import AttnPatchError, ConfigError, DataError, ModelError, RunFolderError

__all__ = ["main"]

#: errno values of a write that failed for lack of space or permission.
_WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _trace_unet(spec: str):
    from . import testing
    from .families import REFERENCE_TRANSFORMER_CONFIGS, reference_transformer

    aliases = {"sd3": "sd3-medium", "sd35": "sd35-large", "flux": "flux-dev"}
    if aliases.get(spec, spec) in REFERENCE_TRANSFORMER_CONFIGS:
        return reference_transformer(aliases.get(spec, spec), device="meta")
    tiny = {"tiny": ("sd15", False), "tiny-deep": ("sd15", True), "tiny-sd2": ("sd2", False)}
    tiny["tiny-sdxl"] = ("sdxl", False)
    if spec == "shapes":
        from .models import load_diffusion

        return load_diffusion("shapes").unet
    if spec in tiny:
        variant, deep = tiny[spec]
        return testing.tiny_unet(variant, deep=deep)
    if spec in testing.REFERENCE_UNET_CONFIGS:
        return testing.reference_unet(spec, device="meta")
    if os.path.isdir(spec):
        from diffusers import UNet2DConditionModel

        sub = os.path.join(spec, "unet") if os.path.isdir(os.path.join(spec, "unet")) else spec
        return UNet2DConditionModel.from_pretrained(sub, local_files_only=True)
    raise ModelError(
        f"unknown model {spec!r} for trace: use shapes, tiny, tiny-deep, tiny-sd2, tiny-sdxl, "
        f"{', '.join(testing.REFERENCE_UNET_CONFIGS)}, sd3, sd35, flux, "
        f"{', '.join(REFERENCE_TRANSFORMER_CONFIGS)} (architectures on the meta device), or a "
        "local diffusers UNet folder"
    )


def _latent_size(text: str | None) -> int | tuple[int, int] | None:
    """``"64"`` -> 64, ``"64x48"`` -> (64, 48); anything else is a clear error."""
    if text is None:
        return None
    try:
        values = [int(v) for v in text.lower().split("x")]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values, default=0) < 1:
        raise ConfigError(
            f"--latent must be a positive side or HxW (e.g. 64 or 64x48), got {text!r}"
        )
    return values[0] if len(values) == 1 else (values[0], values[1])


def _cmd_trace(args: argparse.Namespace) -> int:
    from .families import REFERENCE_TEXT_LENGTHS
    from .hooks import format_sites, summarize_sites, trace_attention

    model = _trace_unet(args.model)
    size = _latent_size(args.latent)
    aliases = {"sd3": "sd3-medium", "sd35": "sd35-large", "flux": "flux-dev"}
    text_len = args.text_len or REFERENCE_TEXT_LENGTHS.get(aliases.get(args.model, args.model), 77)
    sites = trace_attention(model, size, text_len=text_len)
    layers = {s.name: s for s in sites}
    joint = sum(s.kind == "full" for s in sites)
    only_self = sum(s.part is None and not s.is_cross for s in layers.values())
    if joint:
        print(
            f"{len(layers)} attention layers ({joint} joint image+text, {only_self} image-only; "
            f"{text_len} text tokens)"
        )
    else:
        print(f"{len(sites)} attention layers ({only_self} self)")
    print(summarize_sites(sites))
    if not args.summary:
        print()
        print(format_sites(sites, markdown=args.markdown))
    return 0


def _add_trace(sub) -> None:
    trace = sub.add_parser("trace", help="table of every attention site of a UNet or DiT")
    trace.add_argument(
        "--model",
        default="tiny",
        help="shapes | tiny | tiny-deep | tiny-sd2 | tiny-sdxl | sd15 | sd21 | sdxl | sd3 | "
        "sd35 | flux | sd3-medium | sd35-medium | sd35-large | flux-dev | flux-schnell | PATH "
        "(default: tiny)",
    )
    trace.add_argument(
        "--latent",
        default=None,
        help="latent size: 64 or 64x48 (default: the model's sample_size; Flux 128)",
    )
    trace.add_argument(
        "--text-len",
        type=int,
        default=None,
        help="text tokens (default 77; SD3 333 = 77 CLIP + 256 T5; Flux-dev 512, schnell 256)",
    )
    trace.add_argument("--summary", action="store_true", help="only the per-resolution summary")
    trace.add_argument("--markdown", action="store_true", help="markdown table")
    trace.set_defaults(func=_cmd_trace)


def _one_config(paths: list[str] | None) -> str | None:
    """The ``--config`` file; given twice or more, an error (the first would be ignored)."""
    if not paths:
        return None
    if len(paths) > 1:
        raise ConfigError(
            f"--config is given {len(paths)} times ({', '.join(paths)}); pass one file (merge "
            "them into one), and override single fields with --section.key VALUE"
        )
    return paths[0]


def _cmd_train(args: argparse.Namespace) -> int:
    from .training import apply_flags, load_config, run_training

    overrides = apply_flags(args)
    if args.log:  # the fixed spelling of --train.log
        overrides["train.log"] = args.log
    cfg = load_config(_one_config(args.config), overrides)
    if args.quiet:
        cfg.train.progress = False
    if int(os.environ.get("RANK", "0")) != 0:  # a data-parallel launch: process 0 reports
        run_training(cfg, resume=args.resume, overwrite=args.overwrite)
        return 0
    print(
        f"attnpatch train: out_dir={cfg.train.out_dir} models={cfg.models.classifier}/"
        f"{cfg.models.diffusion} iterations={cfg.train.iterations} K={cfg.train.accumulate}"
    )
    result = run_training(cfg, resume=args.resume, overwrite=args.overwrite)
    print(f"done in {result.seconds:.1f} s; outputs in {result.out_dir}/")
    for name in (
        "patch.png",
        "patch.safetensors",
        "metrics.jsonl",
        "loss_curves.png",
        "attention.png",
        "examples.png",
        "success_vs_scale.png",
        "summary.json",
    ):
        print(f"  {result.out_dir / name}")
    if cfg.train.log != "none":
        print(f"{cfg.train.log} logs in {result.out_dir / 'logs'}/ (docs/logging.md)")
    print(result.evaluation)
    return 0


def _add_train(sub) -> None:
    from .training import LOGGERS, add_config_flags

    train = sub.add_parser(
        "train",
        help="train a patch (no config: the embedded tiny default)",
        description="Train an adversarial patch. Every config field is a flag: --section.key VALUE.",
    )
    train.add_argument(
        "--config", action="append", default=None, help="YAML, TOML or JSON config file (one)"
    )
    train.add_argument("--resume", action="store_true", help="continue the run in train.out_dir")
    train.add_argument(
        "--overwrite", action="store_true", help="replace a run already in train.out_dir"
    )
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument(
        "--log",
        choices=LOGGERS,
        default=None,
        help="also log metrics and images to TensorBoard or W&B, under train.out_dir/logs "
        "(same as --train.log; default: the config's, 'none'; docs/logging.md)",
    )
    add_config_flags(train)
    train.set_defaults(func=_cmd_train)


def _image_files(paths: list[str]) -> list[str]:
    from .data import IMAGE_EXTENSIONS as exts

    files: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            for root, _, names in sorted(os.walk(p)):
                files += [os.path.join(root, n) for n in sorted(names) if n.lower().endswith(exts)]
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise DataError(f"no image file or folder at {p!r}; pass image files or folders")
    if not files:
        raise DataError(f"no images found in {paths}; pass folders holding image files")
    return files


def _cmd_apply(args: argparse.Namespace) -> int:
    import torch

    from .data import read_image
    from .images import save_image
    from .patch import AdversarialPatch

    patch = AdversarialPatch.load(args.patch)
    _check_out_outside_inputs(args.out, args.images)
    files = _image_files(args.images)
    plan = _apply_plan(files, args.out)  # every check before the first image is written
    g = torch.Generator().manual_seed(args.seed)
    for path, dest in plan:
        x = read_image(path)[None]
        with torch.no_grad():
            patched, _ = patch(x, eot=args.eot, generator=g)
        save_image(patched[0], dest)
        print(dest)
    return 0


def _check_out_outside_inputs(out: str, inputs: list[str]) -> None:
    """Refuse an ``--out`` that is an input folder or lies inside one: a second run would
    patch the first run's outputs."""
    target = os.path.realpath(out)
    for p in inputs:
        if not os.path.isdir(p):
            continue
        folder = os.path.realpath(p)
        if target == folder or target.startswith(folder.rstrip(os.sep) + os.sep):
            raise RunFolderError(
                f"--out {out!r} lies inside the input folder {p!r}: its *_patched.png files "
                "would be patched again by the next run; choose an --out outside the inputs"
            )


def _apply_plan(files: list[str], out: str) -> list[tuple[str, str]]:
    """``(image, destination)`` pairs, after checking that every image reads and every
    destination can be written (so a bad file fails the command before any output)."""
    from PIL import Image

    if os.path.exists(out) and not os.path.isdir(out):
        raise RunFolderError(f"--out {out!r} is a file; pass a folder (it is created if needed)")
    bad = []
    for path in files:
        try:
            with Image.open(path) as im:
                im.load()
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ...
            bad.append(f"{path} ({type(e).__name__})")
    if bad:
        raise DataError(
            f"{len(bad)} of {len(files)} images cannot be read: {', '.join(bad[:5])}; delete or "
            "re-save them, nothing was written"
        )
    plan, seen = [], set()
    for path in files:
        name = os.path.splitext(os.path.basename(path))[0] + "_patched.png"
        dest = os.path.join(out, name)
        if name in seen or os.path.isdir(dest):
            why = "two inputs share this name" if name in seen else "it is a folder"
            raise RunFolderError(f"cannot write {dest!r}: {why}; choose another --out")
        seen.add(name)
        plan.append((path, dest))
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise RunFolderError(f"cannot create --out {out!r} ({e}); choose another folder") from None
    if not os.access(out, os.W_OK):
        raise RunFolderError(f"--out {out!r} is not writable; choose another folder")
    return plan


def _add_apply(sub) -> None:
    apply = sub.add_parser(
        "apply", help="apply a saved patch to images (needs only the patch file)"
    )
    apply.add_argument("patch", help="patch.safetensors written by attnpatch train")
    apply.add_argument("images", nargs="+", help="image files or folders")
    apply.add_argument("--out", default="patched", help="output folder (default: patched/)")
    apply.add_argument("--seed", type=int, default=0, help="placement/EOT seed (default 0)")
    apply.add_argument("--eot", action="store_true", help="apply with EOT transforms")
    apply.set_defaults(func=_cmd_apply)


def _cmd_doctor(args: argparse.Namespace) -> int:
    from .training import apply_flags, describe_environment, doctor, load_config

    cfg = load_config(_one_config(args.config), apply_flags(args))
    cfg.train.progress = False
    print(f"environment: {describe_environment()}")
    report = doctor(cfg, iterations=args.iterations)
    print(report)
    return 0 if report.ok else 1


def _add_doctor(sub) -> None:
    from .training import add_config_flags

    doc = sub.add_parser(
        "doctor",
        help="run a few instrumented iterations and check the pipeline checklist",
        description="Checks gradient flow, the hijack, image ranges/layouts, every loss term, the "
        "accumulation counter and patch updates. Exit status 1 if a check fails.",
    )
    doc.add_argument(
        "--config", action="append", default=None, help="the same config as `attnpatch train`"
    )
    doc.add_argument("--iterations", type=int, default=None, help="default: K + 1")
    add_config_flags(doc)
    doc.set_defaults(func=_cmd_doctor)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .training import evaluate_transfer_file

    table = evaluate_transfer_file(
        args.patch,
        args.classifiers.split(","),
        data=args.data,
        surrogate=args.surrogate,
        eot_samples=args.eot_samples,
        seed=args.seed,
        image_size=args.image_size,
        device=args.device,
        out_dir=args.out,
    )
    print(table)
    if args.out:
        for name in ("transfer.csv", "transfer.json", "transfer.png"):
            print(f"  {os.path.join(args.out, name)}")
    return 0


def _add_evaluate(sub) -> None:
    ev = sub.add_parser(
        "evaluate",
        help="a saved patch's success on several classifiers (white-box vs transfer)",
        description="Score a patch on every victim with the same placements and EOT draws, next "
        "to a random-noise control (docs/evaluation.md). Defaults come from the run config in "
        "the patch file.",
    )
    ev.add_argument("--patch", required=True, help="patch.safetensors written by attnpatch train")
    ev.add_argument(
        "--classifiers",
        required=True,
        help="victims, comma-separated: registered names (tiny,tiny-b,tiny-c), "
        "torchvision:<model>, timm:<model>",
    )
    ev.add_argument(
        "--data",
        default=None,
        help="synthetic | FOLDER | CSV (default: the run's held-out data, else synthetic)",
    )
    ev.add_argument("--out", default=None, help="folder for transfer.csv, .json and .png")
    ev.add_argument("--surrogate", default=None, help="default: the run's models.classifier")
    ev.add_argument("--eot-samples", type=int, default=None, help="default: the run's (4)")
    ev.add_argument("--seed", type=int, default=None, help="default: the run's train.seed")
    ev.add_argument("--image-size", type=int, default=None, help="default: the run's (32)")
    ev.add_argument("--device", default=None, help="default: the run's models.device (auto)")
    ev.set_defaults(func=_cmd_evaluate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnpatch",
        description="Adversarial patches guided by a Stable Diffusion UNet's attention.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_apply, _add_evaluate, _add_doctor, _add_trace):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except AttnPatchError as e:
        print(f"attnpatch: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a write that failed outside a run (apply, evaluate): one line too
        if e.errno not in _WRITE_ERRORS:
            raise
        print(
            f"attnpatch: error: cannot write {e.filename or ''}: {e.strerror}; free space or "
            "choose a writable folder",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt as e:  # the trainer checkpoints first and says where
        name = "interrupted" if getattr(e, "signum", signal.SIGINT) == signal.SIGINT else "stopped"
        print(f"attnpatch: {name}{f': {e}' if str(e) else ''}", file=sys.stderr)
        return 128 + int(getattr(e, "signum", signal.SIGINT))


if __name__ == "__main__":
    sys.exit(main())
