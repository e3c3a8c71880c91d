"""A training run's output directory: recognised by a marker the run wrote, held by one run at a
time, and never taken over from a user's files without `--overwrite`.

  DIR/.jaxvlm-run        JSON marker: {"format": 1, "created": ..., "run_id": ...}
  DIR/.jaxvlm-run.lock   an advisory lock (fcntl) held while the run is alive

Rules (`open_run_directory`):
- a missing or empty DIR becomes a run directory (with `resume` too: a job that always passes
  --resume starts its first run so);
- a run directory is continued with `resume`, or started over with `overwrite` (its previous
  checkpoints, metrics and outputs, all written by a jaxvlm run, are removed first);
- any other non-empty DIR is refused unless `overwrite` (then only the run's own file names are
  written; nothing else in DIR is touched); `resume` needs a run directory;
- a DIR another live run holds is refused, naming that run's process;
- temporaries of the run's outputs that a killed run left behind are removed once the lock is held.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import shutil
import uuid
from pathlib import Path

from conversion import atomic

MARKER = ".jaxvlm-run"
LOCK = ".jaxvlm-run.lock"
# What a run writes into its directory (and so may remove when it starts over).
RUN_OUTPUTS = (
    "checkpoints", "checkpoints-best", "best.json", "metrics.jsonl", "run_config.json", "summary.json",
    "loss_curve.png", "model", "tensorboard", "wandb",
)  # fmt: skip


class RunDirectory:
    """An opened run directory; `close()` releases its lock."""

    def __init__(self, path: Path, lock_fd: int | None, marker: dict):
        self.path, self._lock_fd, self.marker = path, lock_fd, marker

    def close(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None


def is_run_directory(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def open_run_directory(path: str | Path, *, resume: bool, overwrite: bool, primary: bool = True) -> RunDirectory:
    """Check, lock and (when new) mark `path` as a run directory; see the module docstring.

    `primary`: the process that owns the directory (process 0); the other processes of a
    multi-process run leave it to that one."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"--output-dir {path} is a file, not a directory")
    if not primary:  # process 0 checks, marks and locks (before any collective write)
        return RunDirectory(path, None, {})
    is_run = is_run_directory(path)
    non_empty = path.is_dir() and any(path.iterdir())
    if resume and not is_run and non_empty:
        raise ValueError(f"--resume: {path} is not a jaxvlm run directory (it has no {MARKER} marker)")
    if non_empty and not is_run and not overwrite:
        raise FileExistsError(
            f"--output-dir {path} is not empty and is not a jaxvlm run directory: choose a new directory, "
            "or pass --overwrite to write the run's files into it"
        )
    path.mkdir(parents=True, exist_ok=True)
    lock_fd = _lock(path)
    try:
        if is_run and not resume:
            if not overwrite:
                raise FileExistsError(
                    f"--output-dir {path} holds a jaxvlm run: pass --resume to continue it, --overwrite to start "
                    "it over, or choose a new directory"
                )
            for name in RUN_OUTPUTS:  # the previous run's own outputs
                target = path / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        if is_run:
            remove_stale_temporaries(path)
        if is_run and resume:
            marker = _read_marker(path)
        else:
            marker = {"format": 1, "created": datetime.datetime.now().isoformat(timespec="seconds"),
                      "run_id": uuid.uuid4().hex}  # fmt: skip
            atomic.write_text(path / MARKER, json.dumps(marker) + "\n")
    except BaseException:
        fcntl.flock(lock_fd, fcntl.LOCK_UN)
        os.close(lock_fd)
        raise
    return RunDirectory(path, lock_fd, marker)


def remove_stale_temporaries(path: Path) -> list[str]:
    """Remove the temporaries of run outputs (`conversion.atomic` names) that a killed run left
    in `path`. Called with the lock held, so no live writer owns them; nothing else is touched."""
    removed = []
    for name in RUN_OUTPUTS + (MARKER,):
        for prefix in (atomic.TMP_PREFIX, atomic.TMP_PREFIX + "old-"):
            for tmp in path.glob(f"{prefix}{name}.*"):
                if tmp.name.rsplit(".", 1)[-1].isdigit():
                    shutil.rmtree(tmp) if tmp.is_dir() and not tmp.is_symlink() else tmp.unlink()
                    removed.append(tmp.name)
    return removed


def _lock(path: Path) -> int:
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise BlockingIOError(
            f"--output-dir {path} is in use by another run ({holder}): wait for it or choose another directory"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
    return fd


def _read_marker(path: Path) -> dict:
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path / MARKER}: unreadable run marker ({e})") from None
    if not isinstance(marker, dict) or marker.get("format") != 1:
        raise ValueError(f"{path / MARKER}: not a jaxvlm run marker")
    return marker
