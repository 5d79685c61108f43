"""The ``attnpatch`` command line: ``trace`` (more subcommands register themselves below)."""

from __future__ import annotations

import argparse
import os
import sys

from .errors import AttnPatchError

__all__ = ["main"]


def _trace_unet(spec: str):
    from . import testing

    tiny = {"tiny": ("sd15", False), "tiny-deep": ("sd15", True), "tiny-sd2": ("sd2", False)}
    tiny["tiny-sdxl"] = ("sdxl", False)
    if spec in tiny:
        variant, deep = tiny[spec]
        return testing.tiny_unet(variant, deep=deep), 8
    if spec in testing.REFERENCE_UNET_CONFIGS:
        return testing.reference_unet(spec, device="meta"), 8
    if os.path.isdir(spec):
        from diffusers import UNet2DConditionModel

        sub = os.path.join(spec, "unet") if os.path.isdir(os.path.join(spec, "unet")) else spec
        return UNet2DConditionModel.from_pretrained(sub, local_files_only=True), 8
    raise AttnPatchError(
        f"unknown model {spec!r} for trace: use tiny, tiny-deep, tiny-sd2, tiny-sdxl, "
        f"{', '.join(testing.REFERENCE_UNET_CONFIGS)} (architectures on the meta device), or a "
        "local diffusers folder"
    )


def _cmd_trace(args: argparse.Namespace) -> int:
    from .trace import format_sites, summarize_sites, trace_attention

    unet, _ = _trace_unet(args.model)
    latent = args.latent
    if latent is not None and "x" in latent:
        h, w = (int(v) for v in latent.lower().split("x"))
        size: int | tuple[int, int] | None = (h, w)
    else:
        size = int(latent) if latent is not None else None
    sites = trace_attention(unet, size, text_len=args.text_len)
    print(f"{len(sites)} attention layers ({sum(not s.is_cross for s in sites)} self)")
    print(summarize_sites(sites))
    if not args.summary:
        print()
        print(format_sites(sites, markdown=args.markdown))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnpatch",
        description="Adversarial patches guided by a Stable Diffusion UNet's attention.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    trace = sub.add_parser("trace", help="table of every attention site of a UNet")
    trace.add_argument(
        "--model",
        default="tiny",
        help="tiny | tiny-deep | tiny-sd2 | tiny-sdxl | sd15 | sd21 | sdxl | PATH (default: tiny)",
    )
    trace.add_argument(
        "--latent", default=None, help="latent size: 64 or 64x48 (default: the UNet's sample_size)"
    )
    trace.add_argument("--text-len", type=int, default=77, help="text tokens (default 77)")
    trace.add_argument("--summary", action="store_true", help="only the per-resolution summary")
    trace.add_argument("--markdown", action="store_true", help="markdown table")
    trace.set_defaults(func=_cmd_trace)
    for register in _SUBCOMMANDS:
        register(sub)
    return parser


#: Functions ``register(subparsers)`` adding further subcommands (train, apply, doctor).
_SUBCOMMANDS: list = []


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except AttnPatchError as e:
        print(f"attnpatch: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
