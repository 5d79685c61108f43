"""Checkpoints of a patch-training run: written atomically, read back exactly.

A checkpoint is a folder ``checkpoints/it-NNNNNN/`` holding

* ``patch.safetensors`` — the patch (:meth:`attnpatch.AdversarialPatch.save`);
* ``state.pt`` — the loop's state (:meth:`attnpatch.PatchTrainer.state_dict`: iteration,
  accumulation counter, optimizer steps, optimizer state, the accumulated gradient, torch's RNG
  state);
* ``config.json`` — the run's config.

``checkpoints/latest`` names the newest folder. Each folder is written under a temporary name,
its files flushed to disk (fsync), and renamed into place; ``latest`` is replaced atomically, so
a run killed at any moment leaves the previous checkpoint readable; a write that fails (a full
disk, a read-only folder) removes its temporary folder and leaves the previous checkpoint as
``latest``. A truncated or foreign checkpoint is refused with a
:class:`~attnpatch.errors.RunFolderError` naming the file; a checkpoint of other training data
(:func:`~attnpatch.data.fingerprint`) with a :class:`~attnpatch.errors.DataError`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .._util import atomic_write
from ..data import describe_change
from ..errors import AttnPatchError, DataError, RunFolderError
from ..patch import AdversarialPatch

__all__ = [
    "write_checkpoint",
    "read_checkpoint",
    "checkpoint_folder",
    "check_resumable",
    "truncate_metrics",
]

#: Config fields that may differ between a checkpoint and the run resuming it.
RESUMABLE_CHANGES = {
    "train.iterations",
    "train.progress",
    "train.checkpoint_every",
    "train.out_dir",
    "train.threads",  # results then differ at float rounding (docs/training.md)
    "train.log",  # where the metrics are also sent (docs/logging.md)
    "train.log_images_every",
    "train.collective_timeout_minutes",
}


def write_checkpoint(
    root: Path, patch: AdversarialPatch, state: dict[str, Any], config: dict[str, Any]
) -> Path:
    """Write ``root/it-NNNNNN/`` (``NNNNNN = state["iteration"]``), point ``root/latest`` at it
    and delete older checkpoint folders; returns the new folder."""
    root.mkdir(parents=True, exist_ok=True)
    name = f"it-{state['iteration']:06d}"
    for stale in root.glob(".it-*.tmp"):  # left by a run killed while writing: ours
        shutil.rmtree(stale, ignore_errors=True)
    tmp, old = root / f".{name}.tmp", root / f".{name}.old.tmp"
    final = root / name
    try:
        tmp.mkdir()
        patch.save(tmp / "patch.safetensors", extra={"iteration": str(state["iteration"])})
        with atomic_write(tmp / "state.pt") as f:
            torch.save(state, f)
        with atomic_write(tmp / "config.json") as f:
            f.write_text(json.dumps(config, indent=2))
        _fsync_dir(tmp)
        previous = (root / "latest").read_text().strip() if (root / "latest").is_file() else ""
        if previous != name:  # never delete the checkpoint ``latest`` names before replacing it
            shutil.rmtree(final, ignore_errors=True)
        else:
            os.replace(final, old)
        os.replace(tmp, final)
        with atomic_write(root / "latest") as pointer:
            pointer.write_text(name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # the partial checkpoint; latest is untouched
        if old.exists() and not final.exists():
            os.replace(old, final)
        raise
    _fsync_dir(root)
    shutil.rmtree(old, ignore_errors=True)
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
    raises :class:`RunFolderError` naming it."""
    fix = (
        "the checkpoint is damaged; resume from an intact one (pass its folder to "
        "load_checkpoint), or start again with --overwrite"
    )
    try:
        saved = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise RunFolderError(f"cannot read {folder / 'config.json'} ({e}); {fix}") from None
    if not isinstance(saved, dict):
        raise RunFolderError(f"{folder / 'config.json'} is not a config; {fix}")
    _check_same_config(saved, config, folder)
    try:
        patch = AdversarialPatch.load(folder / "patch.safetensors", device=device)
    except AttnPatchError as e:
        raise RunFolderError(f"{e}; {fix}") from None
    try:
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises RuntimeError, EOFError, OSError, pickle errors
        raise RunFolderError(
            f"cannot read {folder / 'state.pt'} ({type(e).__name__}); {fix}"
        ) from None
    missing = {"iteration", "counter", "steps", "optimizer", "grad"} - set(state or {})
    if not isinstance(state, dict) or missing:
        raise RunFolderError(f"{folder / 'state.pt'} is not a training state; {fix}")
    return patch, state


def check_resumable(
    folder: Path,
    loaded: AdversarialPatch,
    state: dict[str, Any],
    patch: AdversarialPatch,
    config: Any,
    data: dict[str, Any],
    world: int,
) -> list[str]:
    """Refuse a checkpoint the run cannot continue from: another patch size, an iteration past
    ``train.iterations``, other training data (``data``: the run's
    :func:`~attnpatch.data.fingerprint`, against the one the checkpoint recorded). Returns what
    is worth saying: a change of process count at an optimizer step (``world``: this run's)."""
    if loaded.size != patch.size:
        raise RunFolderError(
            f"checkpoint {folder} holds a {loaded.size} patch, this run makes {patch.size}; "
            "resume with the config it was written with"
        )
    iterations = config.train.iterations
    if state["iteration"] > iterations:
        raise RunFolderError(
            f"checkpoint {folder} is at iteration {state['iteration']}, past "
            f"train.iterations={iterations}; resume with --train.iterations "
            f"{state['iteration']} or more"
        )
    recorded = state.get("data")
    change = describe_change(recorded, data) if recorded else None  # older checkpoints: none
    if change:
        raise DataError(
            f"the training data changed since checkpoint {folder} ({change}); resuming would "
            "mix two data sets in one run: restore the data, or start a new run with "
            "--overwrite or another train.out_dir"
        )
    notes = []
    before = state.get("world", 1)
    if before != world and state["counter"] == 0:
        b = config.data.batch_size
        notes.append(
            f"this checkpoint was written by {before} process(es) and resumes on {world}: the "
            f"global batch is now {world} x data.batch_size = {world * b} images (was "
            f"{before * b}), so the run continues differently from an uninterrupted one"
        )
    return notes


def checkpoint_folder(out_dir: Path | None, path: str | os.PathLike | None) -> Path:
    """The checkpoint to resume: ``path`` (a checkpoint folder or a run folder), else the run
    folder ``out_dir``'s latest."""
    if path is None:
        if out_dir is None:
            raise RunFolderError("no checkpoint path and no out_dir to look in; pass one")
        pointer = out_dir / "checkpoints" / "latest"
        if not pointer.is_file():
            raise RunFolderError(
                f"no checkpoint in {out_dir}/checkpoints; start without --resume, or pass the "
                "run folder of an earlier run"
            )
        folder = out_dir / "checkpoints" / pointer.read_text().strip()
        if not (folder / "state.pt").is_file():
            raise RunFolderError(
                f"{pointer} names {folder.name!r}, which is missing or incomplete; pass an "
                "intact checkpoint folder, or start again with --overwrite"
            )
        return folder
    folder = Path(path)
    if (folder / "checkpoints" / "latest").is_file():
        return checkpoint_folder(folder, None)
    if not (folder / "state.pt").is_file():
        raise RunFolderError(
            f"{folder} is not a checkpoint folder (no state.pt); pass a run folder or one of "
            "its checkpoints/it-NNNNNN folders"
        )
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
        raise RunFolderError(
            f"checkpoint {folder} comes from a different config ({details}); resume with the "
            "config it was written with, or start a new run in another out_dir"
        )


def truncate_metrics(path: Path, iteration: int) -> str | None:
    """Drop metric lines of iterations at or after ``iteration`` (they will be redone), and a
    last line cut short by a kill. Returns a note when lines before ``iteration`` are missing
    (``metrics.jsonl`` deleted or cut), else ``None``."""
    if not path.is_file():
        if iteration == 0:
            return None
        return (
            f"{path} is missing: iterations 0-{iteration - 1} have no metric lines (the loss "
            "curves start where this session does); the run continues"
        )
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
    if len(keep) < iteration:
        return (
            f"{path} holds {len(keep)} of the {iteration} lines before the checkpoint: "
            f"{iteration - len(keep)} iterations have no metric lines; the run continues"
        )
    return None
