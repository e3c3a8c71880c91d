"""Keep XLA:CPU's per-execution scratch buffers mapped, in transparent huge pages (glibc).

Why: XLA:CPU allocates every execution's scratch buffer (gigabytes for a full-size train step)
with `posix_memalign`; glibc serves a request that large with a fresh `mmap` and unmaps it when
freed, so every step faults the whole buffer back in, 4 KiB at a time. Two glibc settings fix it:
the tunable `glibc.malloc.hugetlb=1` advises such memory to use transparent huge pages (2 MiB;
the weights land in huge pages too: fewer TLB misses while decoding streams them), and the
heap-retaining variables (`HEAP_RETAINING_ENV`: no mmap'd chunks, no trimming, one arena) keep
freed memory in the heap, so the next step reuses the same, already faulted-in pages. With the
tunable alone each step still faulted its scratch back in, 2 MiB at a time, and zeroing those
pages cost seconds of kernel time per nanovlm-222m step on one machine (docs/performance.md, the
session 10 section). The price: the process's resident memory stays at its peak.

glibc reads both only when a process starts, so the `jaxvlm` CLI re-executes itself once with
them added (`tuned_environment`), for train, eval and generate (`jaxvlm bench` sets each part's
environment itself); that costs one more interpreter start. Variables the user set already win.
A script using jaxvlm as a library sets them itself:

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 \
        MALLOC_TRIM_THRESHOLD_=4611686018427387904 python my_train.py

It needs Linux with transparent huge pages in `madvise` or `always` mode and glibc >= 2.35; it
does nothing elsewhere, and `JAXVLM_HUGE_PAGES=0` turns it off. torch_ref gets the heap-retaining
variables alone in the bench (huge pages made its eager step slower where measured).
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb=1"
# Freed memory stays in the heap (see the module docstring): jaxvlm (with the tunable) and torch_ref.
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


def tuned_environment(env: dict) -> dict:
    """`env` with the tunable and the heap-retaining variables (those not set in `env` already):
    what a jaxvlm process is started with."""
    return {**HEAP_RETAINING_ENV, **with_huge_pages(env)}


def heap_retained(env=None) -> bool:
    """Whether a process started with `env` (default: this one's) keeps freed memory in its heap."""
    env = os.environ if env is None else env
    return all(env.get(k) == v for k, v in HEAP_RETAINING_ENV.items())


def reexec_with_huge_pages() -> None:
    """Replace this process by the same command started with `tuned_environment`, unless the
    tunable is set already, this is turned off (`JAXVLM_HUGE_PAGES=0`) or not possible here.
    Call before any work is done."""
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
    os.execve(sys.executable, sys.orig_argv, tuned_environment(dict(os.environ)))
