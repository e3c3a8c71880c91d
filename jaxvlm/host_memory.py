"""Back XLA:CPU's per-execution scratch buffers with transparent huge pages (glibc).

XLA:CPU allocates every execution's scratch buffer (3.4 GB for the nanovlm-222m train step at
batch 4 x 256) with `posix_memalign`. glibc serves a request that large with a fresh `mmap` and
`munmap`s it when freed, so every step faults 820k pages of 4 KiB back in: 1.3 s of kernel time
per step on 2 cores. With glibc's tunable `glibc.malloc.hugetlb=1`, such mappings are advised
to use transparent huge pages (2 MiB): 500x fewer faults, and the step goes 4.65 -> 3.94 s
(`python -m cli.profile_step`, this 2-core machine; kernel time 1.3 -> 0.2 s per step).
The weights land in huge pages too, which helps decoding, where every token streams them:
batch-1 greedy decode of nanovlm-222m 56.9 -> 64.0 tokens/s (fewer TLB misses).

glibc reads tunables only when a process starts, so the `jaxvlm` CLI re-executes itself once with
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` added, for train, eval and generate (`jaxvlm bench` sets
each part's environment itself); that costs one more interpreter start (~1 s). A script using
jaxvlm as a library sets it itself:

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python my_train.py

It needs Linux with transparent huge pages in `madvise` or `always` mode and glibc >= 2.35; it
does nothing elsewhere, and `JAXVLM_HUGE_PAGES=0` turns it off.

Measured and not chosen: keeping freed memory in the heap instead (mallopt: one arena, no mmap,
no trimming) gave 4.0 s, but glibc's `posix_memalign` then cannot always reuse a freed scratch
buffer and the heap grew by one more scratch buffer every few calls. torch_ref's eager step is
slower with huge pages (7.8 -> 8.7 s: it maps and frees many mid-sized tensors) and faster with
that heap policy (7.3 s; its batch-8 decode too: 109 -> 143 tokens/s, batch 1 unchanged at ~25);
the bench gives each framework the one that suits it (see bench.py).
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
