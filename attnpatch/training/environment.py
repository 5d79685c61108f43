"""What a result was computed with: package versions and the git commit of attnpatch's source.

Every run folder's ``summary.json`` holds :func:`environment` under ``"environment"``, and
``attnpatch doctor`` prints :func:`describe_environment` first, so two runs that disagree can be told apart
by their environments (the set-up installs the locked set: requirements/*.txt, README).

>>> env = environment()
>>> sorted(k for k in env if k in ("torch", "diffusers", "transformers", "attnpatch"))
['attnpatch', 'diffusers', 'torch', 'transformers']
"""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from .._version import __version__

__all__ = ["environment", "describe_environment", "PACKAGES"]

#: The packages whose versions are recorded (besides torch's build and attnpatch's commit).
PACKAGES = (
    "diffusers",
    "transformers",
    "huggingface-hub",
    "accelerate",
    "kornia",
    "safetensors",
    "numpy",
    "torchvision",
    "timm",
)


def _git(*args: str) -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        done = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _cpu_model() -> str | None:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def environment() -> dict[str, Any]:
    """``{"attnpatch", "git_commit", "git_dirty", "python", "platform", "torch", "cuda",
    "cpu_capability", "cpu", <each of PACKAGES>}``: versions as installed (``None`` when a package is absent);
    ``git_commit`` is the commit of the checkout attnpatch is imported from (an editable
    install), ``None`` outside one, and ``git_dirty`` whether tracked files differ from it."""
    commit = _git("rev-parse", "HEAD")
    dirty = None if commit is None else bool(_git("status", "--porcelain", "--untracked-files=no"))
    env: dict[str, Any] = {
        "attnpatch": __version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        # the CPU's vector extension picks torch's float kernels (results can differ between
        # AVX2 and AVX512 machines at equal package versions: docs/training.md)
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": _cpu_model(),
    }
    for name in PACKAGES:
        try:
            env[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            env[name] = None
    return env


def describe_environment(env: dict[str, Any] | None = None) -> str:
    """One line for people: ``attnpatch 0.1.0 (git 1a2b3c4d) | torch 2.13.0+cpu (CPU) | ...``."""
    env = environment() if env is None else env
    commit = env.get("git_commit")
    git = "no git checkout" if commit is None else f"git {commit[:10]}"
    if env.get("git_dirty"):
        git += ", modified"
    build = f"CUDA {env['cuda']}" if env.get("cuda") else "CPU"
    if env.get("cpu_capability"):
        build += f", {env['cpu_capability']}"
    parts = [f"attnpatch {env['attnpatch']} ({git})", f"torch {env['torch']} ({build})"]
    parts += [f"{k} {env[k]}" for k in PACKAGES if env.get(k)]
    parts.append(f"python {env['python']}")
    return " | ".join(parts)
