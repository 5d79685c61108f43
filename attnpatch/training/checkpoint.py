"""Checkpoints of a patch-training run: written atomically, read back exactly.

A checkpoint is a folder ``checkpoints/it-NNNNNN/`` holding

* ``patch.safetensors`` — the patch (:meth:`attnpatch.AdversarialPatch.save`);
* ``state.pt`` — the loop's state (:meth:`attnpatch.PatchTrainer.state_dict`: iteration,
  accumulation counter, optimizer steps, optimizer state, the accumulated gradient, torch's RNG
  state);
* ``config.json`` — the run's config.

``checkpoints/latest`` names the newest folder. Each folder is written under a temporary name,
its files flushed to disk (fsync), and renamed into place; ``latest`` is replaced atomically, so
a run killed at any moment leaves the previous checkpoint readable. A truncated or foreign
checkpoint is refused with an :class:`~attnpatch.errors.AttnPatchError` naming the file.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .._util import atomic_write
from ..errors import AttnPatchError
from ..patch import AdversarialPatch

__all__ = ["write_checkpoint", "read_checkpoint", "checkpoint_folder", "truncate_metrics"]

#: Config fields that may differ between a checkpoint and the run resuming it.
RESUMABLE_CHANGES = {
    "train.iterations",
    "train.progress",
    "train.checkpoint_every",
    "train.out_dir",
    "train.threads",  # results then differ at float rounding (docs/training.md)
    "train.log",  # where the metrics are also sent (docs/logging.md)
    "train.log_images_every",
}


def write_checkpoint(
    root: Path, patch: AdversarialPatch, state: dict[str, Any], config: dict[str, Any]
) -> Path:
    """Write ``root/it-NNNNNN/`` (``NNNNNN = state["iteration"]``), point ``root/latest`` at it
    and delete older checkpoint folders; returns the new folder."""
    root.mkdir(parents=True, exist_ok=True)
    name = f"it-{state['iteration']:06d}"
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    patch.save(tmp / "patch.safetensors", extra={"iteration": str(state["iteration"])})
    with atomic_write(tmp / "state.pt") as f:
        torch.save(state, f)
    with atomic_write(tmp / "config.json") as f:
        f.write_text(json.dumps(config, indent=2))
    _fsync_dir(tmp)
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    with atomic_write(root / "latest") as pointer:
        pointer.write_text(name)
    _fsync_dir(root)
    for old in root.glob("it-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (renames into it) to disk, where the OS allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: folders cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_checkpoint(
    folder: Path, config: dict[str, Any], device: torch.device
) -> tuple[AdversarialPatch, dict[str, Any]]:
    """``(patch, state)`` of the checkpoint ``folder``, after checking that it was written by a
    run of ``config`` (up to :data:`RESUMABLE_CHANGES`). A missing, truncated or corrupt file
    raises :class:`AttnPatchError` naming it."""
    fix = (
        "the checkpoint is damaged; resume from an intact one (pass its folder to "
        "load_checkpoint), or start again with --overwrite"
    )
    try:
        saved = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise AttnPatchError(f"cannot read {folder / 'config.json'} ({e}); {fix}") from None
    if not isinstance(saved, dict):
        raise AttnPatchError(f"{folder / 'config.json'} is not a config; {fix}")
    _check_same_config(saved, config, folder)
    try:
        patch = AdversarialPatch.load(folder / "patch.safetensors", device=device)
    except AttnPatchError as e:
        raise AttnPatchError(f"{e}; {fix}") from None
    try:
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises RuntimeError, EOFError, OSError, pickle errors
        raise AttnPatchError(
            f"cannot read {folder / 'state.pt'} ({type(e).__name__}); {fix}"
        ) from None
    missing = {"iteration", "counter", "steps", "optimizer", "grad"} - set(state or {})
    if not isinstance(state, dict) or missing:
        raise AttnPatchError(f"{folder / 'state.pt'} is not a training state; {fix}")
    return patch, state


def checkpoint_folder(out_dir: Path | None, path: str | os.PathLike | None) -> Path:
    """The checkpoint to resume: ``path`` (a checkpoint folder or a run folder), else the run
    folder ``out_dir``'s latest."""
    if path is None:
        if out_dir is None:
            raise AttnPatchError("no checkpoint path and no out_dir to look in")
        pointer = out_dir / "checkpoints" / "latest"
        if not pointer.is_file():
            raise AttnPatchError(
                f"no checkpoint in {out_dir}/checkpoints; start without --resume, or pass the "
                "run folder of an earlier run"
            )
        folder = out_dir / "checkpoints" / pointer.read_text().strip()
        if not (folder / "state.pt").is_file():
            raise AttnPatchError(
                f"{pointer} names {folder.name!r}, which is missing or incomplete; pass an "
                "intact checkpoint folder, or start again with --overwrite"
            )
        return folder
    folder = Path(path)
    if (folder / "checkpoints" / "latest").is_file():
        return checkpoint_folder(folder, None)
    if not (folder / "state.pt").is_file():
        raise AttnPatchError(f"{folder} is not a checkpoint folder (no state.pt)")
    return folder


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_same_config(saved: dict[str, Any], current: dict[str, Any], folder: Path) -> None:
    a, b = _flatten(saved), _flatten(current)
    diff = sorted(
        k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES
    )
    if diff:
        details = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:5])
        raise AttnPatchError(
            f"checkpoint {folder} comes from a different config ({details}); resume with the "
            "config it was written with, or start a new run in another out_dir"
        )


def truncate_metrics(path: Path, iteration: int) -> None:
    """Drop metric lines of iterations at or after ``iteration`` (they will be redone), and a
    last line cut short by a kill."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line a killed run did not finish
            continue
        if record["iteration"] < iteration:
            keep.append(line)
    with atomic_write(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in keep))
