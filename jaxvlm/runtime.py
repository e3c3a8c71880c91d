"""Process-wide JAX settings a run asks for: the persistent compilation cache (on by default) and
deterministic GPU kernels. Both must be set before the first compilation (the deterministic
flag before JAX starts its backend); `configure` is called at the start of `jaxvlm train`,
`eval` and `generate`.

The cache lives in `$XDG_CACHE_HOME/jaxvlm/xla/<machine>` (default `~/.cache/jaxvlm/xla/...`),
one directory per CPU model and feature set and JAX version: XLA:CPU code compiled for one CPU
(AVX-512, AMX) must not be loaded on another. JAX_COMPILATION_CACHE_DIR, when set, wins.
"""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

import jax

DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops=true"


def machine_tag() -> str:
    """`<arch>-<hash of the CPU model, its feature flags and the JAX version>` (no backend start)."""
    found: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "flags", "Features", "CPU part") and key not in found:
                found[key] = value.strip()
    except OSError:
        pass
    text = "|".join(f"{k}={v}" for k, v in sorted(found.items())) or platform.processor()
    digest = hashlib.sha256(f"{text}|jax {jax.__version__}".encode()).hexdigest()[:16]
    return f"{platform.machine()}-{digest}"


def default_cache_directory() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "jaxvlm" / "xla" / machine_tag()


def configure(compilation_cache: str = "auto", deterministic: bool = False) -> dict:
    """Apply the settings; returns what is in effect ({"compilation_cache": path or None,
    "deterministic": bool}).

    compilation_cache: "auto" (JAX_COMPILATION_CACHE_DIR if set, else `default_cache_directory`),
      "off", or a directory.
    deterministic: XLA's deterministic GPU ops (no atomics in reductions and scatters: a resumed
      run repeats an uninterrupted one exactly on a GPU, at some speed cost). It must reach XLA
      before the backend starts; a ValueError says so when it is too late. CPUs are
      deterministic either way.
    """
    if deterministic and DETERMINISTIC_FLAG not in os.environ.get("XLA_FLAGS", ""):
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            raise ValueError(
                "deterministic: JAX has already started its backend; set it before any JAX computation "
                f"(the command line does), or start Python with XLA_FLAGS={DETERMINISTIC_FLAG}"
            )
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + DETERMINISTIC_FLAG).strip()
    cache = None
    if compilation_cache == "auto":
        cache = jax.config.jax_compilation_cache_dir or str(default_cache_directory())
    elif compilation_cache != "off":
        cache = str(Path(compilation_cache).expanduser())
    if cache != jax.config.jax_compilation_cache_dir:
        if cache:
            Path(cache).mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", cache)
        try:  # JAX decides once whether to use the cache; make it decide again with this directory
            from jax._src import compilation_cache as jax_cache

            jax_cache.reset_cache()
        except (ImportError, AttributeError):  # pragma: no cover - a JAX without it decides on first use
            pass
    return {"compilation_cache": cache, "deterministic": deterministic}
