"""Outputs that are complete or absent: written under a temporary name in the destination's
directory and renamed into place only when whole, so a crash (even SIGKILL) never leaves a
partial file under its final name, and a failed write leaves the previous file as it was.

Framework-free; every command and library function that writes a user-visible file uses it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO

TMP_PREFIX = ".tmp-"  # temporary names start with this (and end with the writer's pid)


def temporary_name(path: Path) -> Path:
    """A sibling of `path` that is never a final name (hidden, pid-tagged)."""
    return path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """`with atomic_file(p) as f: f.write(...)`: `p` appears, complete, when the block ends
    without an exception; on an exception nothing at `p` changes and the temporary is removed."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | Path, text: str) -> None:
    with atomic_file(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_file(path, "wb") as f:
        f.write(data)


@contextlib.contextmanager
def atomic_directory(path: str | Path, *, replace: bool = False) -> Iterator[Path]:
    """`with atomic_directory(d) as tmp: <write into tmp>`: `d` appears, complete, at the end.

    `d` must not exist unless `replace` (then the old `d` is swapped out and removed only after
    the new one is in place). On an exception the temporary directory is removed."""
    path = Path(path)
    if path.exists() and not replace:
        raise FileExistsError(f"{path} already exists")
    tmp = temporary_name(path)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f"{TMP_PREFIX}old-{path.name}.{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def same_file(a: str | Path, b: str | Path) -> bool:
    """True when `a` and `b` name one file (links and relative paths resolved)."""
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def check_output_file(out: str | Path, *, inputs: tuple = (), overwrite: bool = False, flag: str = "--out") -> Path:
    """Refuse an output that is also an input, or that exists (unless `overwrite`)."""
    out = Path(out)
    for given in inputs:
        if given is not None and same_file(out, given):
            raise ValueError(f"{flag} {out} is also an input ({given}): choose another output file")
    if out.is_dir():
        raise ValueError(f"{flag} {out} is a directory")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{flag} {out} already exists: pass --overwrite to replace it, or choose a new name")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{flag} {out}: directory {out.parent} does not exist")
    return out
