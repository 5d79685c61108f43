"""The run folder: whose it is, who is using it, and what attnpatch may delete in it.

* **Ownership.** A folder is attnpatch's when it holds the marker file ``.attnpatch-run``,
  created before anything else is written there (a run folder from before the marker counts
  when it holds ``checkpoints/latest``). attnpatch deletes or replaces only the names it writes
  (:data:`OUTPUTS`), and only in its own folders: a fresh run into a folder that is not its own
  but already holds one of those names (``logs/``, ``metrics.jsonl``, ...) is refused, with or
  without ``--overwrite``.
* **One run at a time.** A run holds an exclusive OS lock (``flock``) on the marker for as
  long as it runs; the marker records its process id. A second run on the folder is refused at
  once, naming that process. The OS drops the lock when the process ends, however it ends, so
  a crash or ``kill -9`` leaves no stale lock. (On a system without ``fcntl``, e.g. Windows,
  the lock is skipped.)
* **Nothing left behind.** A run refused or failed before it wrote anything removes the marker
  and the folders it created.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError, RunFolderError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["MARKER", "OUTPUTS", "RunFolder", "out_dir_path", "check_out_dir", "last_checkpoint"]

#: The marker (and lock) file of a run folder.
MARKER = ".attnpatch-run"

#: The names ``attnpatch train`` writes in its run folder: the only ones it ever deletes.
OUTPUTS = (
    "config.json",
    "metrics.jsonl",
    "patch.safetensors",
    "summary.json",
    "patch.png",
    "loss_curves.png",
    "attention.png",
    "examples.png",
    "success_vs_scale.png",
    "checkpoints",
    "logs",
)


def out_dir_path(text: str) -> Path:
    """``train.out_dir`` as a path (``~`` expanded), after :func:`check_out_dir`. An empty
    name is refused: it would be the current folder."""
    if not str(text).strip():
        raise ConfigError(
            "train.out_dir is empty; name the run folder, e.g. --train.out_dir runs/tiny (pass "
            "'.' to mean the current folder)"
        )
    out = Path(os.path.expanduser(str(text)))
    check_out_dir(out)
    return out


def check_out_dir(out: Path) -> None:
    """Refuse a ``train.out_dir`` that is a file, lies under one, is a broken symlink or a
    symlink loop, or cannot be written."""
    for p in (out, *out.parents):
        if p.is_symlink() and not p.exists():  # exists() follows the link: a loop or no target
            try:
                os.stat(p)
                why = "points nowhere"
            except OSError as e:
                why = "is a symlink loop" if e.errno == errno.ELOOP else "points nowhere"
            raise RunFolderError(
                f"train.out_dir {str(out)!r}: {str(p)!r} {why} (a symlink whose target cannot be "
                "reached); fix the link or choose another train.out_dir"
            )
        if p.exists():
            if not p.is_dir():
                raise RunFolderError(
                    f"train.out_dir {str(out)!r}: {str(p)!r} is a file, not a folder; choose "
                    "another train.out_dir"
                )
            if not os.access(p, os.W_OK | os.X_OK):
                raise RunFolderError(
                    f"train.out_dir {str(out)!r}: {str(p)!r} is not writable; choose another "
                    "train.out_dir"
                )
            return


def last_checkpoint(out: Path) -> str | None:
    """The folder ``checkpoints/latest`` names, if it is there and complete."""
    pointer = out / "checkpoints" / "latest"
    try:
        name = pointer.read_text().strip()
    except OSError:
        return None
    return name if (out / "checkpoints" / name / "state.pt").is_file() else None


class RunFolder:
    """``with RunFolder(out, resume=..., overwrite=...) as folder:`` claims ``out`` for a run.

    On entry: refuses a folder that is not attnpatch's but holds one of its output names, and a
    folder of an earlier run without ``resume`` or ``overwrite``; creates the folder and the
    marker; takes the lock (refusing a folder in use, naming the process). :meth:`clear` deletes
    the earlier run's outputs (a fresh start); :meth:`started` says the run began writing. On
    exit the lock is released; if the run had not started, the marker and the folders this
    entry created are removed again (nothing is left behind by a refused run).
    """

    def __init__(self, out: Path, *, resume: bool = False, overwrite: bool = False):
        self.out = Path(out)
        self.resume, self.overwrite = resume, overwrite
        self._fd: int | None = None
        self._created: list[Path] = []  # folders this claim made, deepest first
        self._made_marker = False
        self._started = False

    # -- ownership ----------------------------------------------------------------------------
    def is_ours(self) -> bool:
        """The marker is there, or (a run folder from before the marker) a checkpoint."""
        return (self.out / MARKER).is_file() or (self.out / "checkpoints" / "latest").is_file()

    def outputs(self) -> list[str]:
        """The output names already in the folder (folders with a trailing ``/``)."""
        found = []
        for name in OUTPUTS:
            p = self.out / name
            if p.exists() or p.is_symlink():
                found.append(name + "/" if p.is_dir() else name)
        return found

    def _check_ownership(self) -> None:
        found = self.outputs()
        if not found:
            return
        shown = ", ".join(found)
        if not self.is_ours():
            raise RunFolderError(
                f"train.out_dir {str(self.out)!r} already holds {shown}, which attnpatch did not "
                "write (no .attnpatch-run marker); attnpatch never deletes or replaces files it "
                "did not write: choose another train.out_dir, or move those files away"
            )
        if self.resume or self.overwrite:
            return
        if last_checkpoint(self.out) is None and not (self.out / "checkpoints").exists():
            raise RunFolderError(
                f"{self.out} already holds an earlier run's files ({shown}) but no checkpoint; "
                "pass --overwrite to start again (they are deleted), or choose another "
                "train.out_dir"
            )
        raise RunFolderError(
            f"{self.out} already holds a run; pass --resume to continue it, --overwrite to "
            "start again, or choose another train.out_dir"
        )

    # -- the lock -----------------------------------------------------------------------------
    def _make_folder(self) -> None:
        missing = []
        for p in (self.out, *self.out.parents):
            if p.exists():
                break
            missing.append(p)
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunFolderError(
                f"cannot create train.out_dir {str(self.out)!r} ({e.strerror}); choose another "
                "train.out_dir"
            ) from None
        self._created = missing  # deepest first

    def _lock(self) -> None:
        marker = self.out / MARKER
        for _ in range(3):
            existed = marker.exists()
            try:
                fd = os.open(marker, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                raise RunFolderError(
                    f"cannot create {marker} ({e.strerror}); make train.out_dir writable or "
                    "choose another"
                ) from None
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    os.close(fd)
                    if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                        raise
                    raise self._in_use(marker) from None
                # the marker may have been removed (by a refused run) between open and flock
                try:
                    same = os.stat(marker).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
            self._fd, self._made_marker = fd, not existed
            record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps(record).encode())
            return
        raise RunFolderError(f"cannot lock {marker}: it keeps being replaced; try again")

    # -- the context --------------------------------------------------------------------------
    def _check_in_use(self) -> None:
        """Refuse at once a folder whose marker another run holds the lock on."""
        marker = self.out / MARKER
        if fcntl is None or not marker.is_file():
            return
        try:
            fd = os.open(marker, os.O_RDONLY)
        except OSError:
            return  # not readable: the real attempt below says why
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise self._in_use(marker) from None
        finally:
            os.close(fd)  # a shared probe: released at once

    def _in_use(self, marker: Path) -> RunFolderError:
        return RunFolderError(
            f"train.out_dir {str(self.out)!r} is in use by another attnpatch run "
            f"({_holder(marker)}); wait for it to end or stop it, or choose another "
            "train.out_dir"
        )

    def __enter__(self) -> RunFolder:
        self._check_in_use()
        self._check_ownership()
        self._make_folder()
        try:
            self._lock()
        except BaseException:
            self._undo()
            raise
        return self

    def clear(self) -> None:
        """Delete the earlier run's outputs (a fresh start in the tool's own folder)."""
        for name in OUTPUTS:
            p = self.out / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()

    def started(self) -> None:
        """The run began writing: the marker stays, whatever happens next."""
        self._started = True

    def _undo(self) -> None:
        if self._made_marker:
            with contextlib.suppress(OSError):
                (self.out / MARKER).unlink()
        for p in self._created:
            with contextlib.suppress(OSError):
                p.rmdir()  # only if empty

    def __exit__(self, *exc: Any) -> None:
        if not self._started:
            self._undo()
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None


def _holder(marker: Path) -> str:
    """``"process 1234 on host"`` from the marker, as far as it can be read."""
    try:
        record = json.loads(marker.read_text() or "{}")
        return f"process {int(record['pid'])} on {record.get('host', '?')}"
    except (OSError, ValueError, KeyError, TypeError):
        return "process unknown"
