"""Back XLA:CPU's per-execution scratch buffers with transparent huge pages (glibc).

Why: XLA:CPU allocates every execution's scratch buffer (gigabytes for a full-size train step)
with `posix_memalign`; glibc serves a request that large with a fresh `mmap` and unmaps it when
freed, so every step faults the whole buffer back in, 4 KiB at a time. With glibc's tunable
`glibc.malloc.hugetlb=1` such mappings are advised to use transparent huge pages (2 MiB), and
the weights land in huge pages too (fewer TLB misses while decoding streams them). Measured
effects, and the alternatives tried, are in docs/performance.md ("Host memory").

glibc reads tunables only when a process starts, so the `jaxvlm` CLI re-executes itself once with
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` added, for train, eval and generate (`jaxvlm bench` sets
each part's environment itself); that costs one more interpreter start. A script using jaxvlm as
a library sets it itself:

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python my_train.py

It needs Linux with transparent huge pages in `madvise` or `always` mode and glibc >= 2.35; it
does nothing elsewhere, and `JAXVLM_HUGE_PAGES=0` turns it off. torch_ref does better with freed
memory kept in the heap instead (`HEAP_RETAINING_ENV`), which the bench gives it.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb=1"
# For torch_ref in the bench: freed memory stays in the heap (see the module docstring).
HEAP_RETAINING_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**62)}
_THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def transparent_huge_pages() -> str:
    """The kernel's THP mode ('always', 'madvise', 'never'), or 'unavailable'."""
    try:
        text = _THP_MODE.read_text()
    except OSError:
        return "unavailable"
    return text[text.index("[") + 1 : text.index("]")] if "[" in text else "unavailable"


def huge_pages_possible() -> bool:
    """glibc >= 2.35 and a kernel that honours madvise(MADV_HUGEPAGE)."""
    libc, version = platform.libc_ver()
    try:
        if libc != "glibc" or tuple(int(x) for x in version.split(".")[:2]) < (2, 35):
            return False
    except ValueError:  # a version string that is not numbers
        return False
    return transparent_huge_pages() in ("always", "madvise")


def huge_pages_enabled(env=None) -> bool:
    """Whether a process started with `env` (default: this one's) has the tunable set."""
    env = os.environ if env is None else env
    return TUNABLE in env.get("GLIBC_TUNABLES", "").split(":")


def with_huge_pages(env: dict) -> dict:
    """`env` plus the tunable (for a child process)."""
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t and not t.startswith("glibc.malloc.hugetlb=")]
    return {**env, "GLIBC_TUNABLES": ":".join([*tunables, TUNABLE])}


def reexec_with_huge_pages() -> None:
    """Replace this process by the same command with the tunable set, unless it is set already,
    turned off (`JAXVLM_HUGE_PAGES=0`) or not possible here. Call before any work is done."""
    if (
        huge_pages_enabled()
        or os.environ.get("JAXVLM_HUGE_PAGES", "1") == "0"
        or not huge_pages_possible()
        or not sys.executable
        or not getattr(sys, "orig_argv", None)
    ):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, with_huge_pages(dict(os.environ)))
