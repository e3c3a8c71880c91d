"""The packages are layers whose imports go one way (read from the import statements, so a
lazy import inside a function counts too):

  conversion/   framework-free core: config, pretrained-directory format, mapping table,
                safetensors I/O, training recipe, RoPE frequencies, generation checks, the HF
                importer (numpy). Imports neither framework nor anything above it.
  jaxvlm/       the JAX model and training; imports conversion, never torch.
  torch_ref/    the PyTorch model; imports conversion, never jax.
  cli/          the command lines and the tools that need both frameworks; may import anything.

`python -m jaxvlm` / `python -m conversion` need a `__main__.py` in those packages: entry points
that import nothing but `cli`. The model files of jaxvlm import no Hugging Face importer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS_JAX = {"jax", "jaxlib", "flax", "optax", "orbax"}
FRAMEWORKS_TORCH = {"torch", "torchvision", "transformers", "peft"}
FORBIDDEN = {
    "conversion": FRAMEWORKS_JAX | FRAMEWORKS_TORCH | {"jaxvlm", "torch_ref", "cli"},
    "jaxvlm": FRAMEWORKS_TORCH | {"torch_ref", "cli"},
    "torch_ref": FRAMEWORKS_JAX | {"jaxvlm", "cli"},
    "cli": set(),
}
MODEL_FILES = (
    "attention.py", "kernels.py", "xla_cpu_kernels.py", "layers.py", "options.py", "language_model.py",
    "vision_transformer.py", "modality_projector.py", "vision_language_model.py",
)  # fmt: skip


def imported_modules(source: str, path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) for every import in `source`; relative imports resolved against
    `path`'s package (relative to ROOT)."""
    package = list(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found.append((node.lineno, module))
    return found


def violations(path: Path, source: str | None = None) -> list[str]:
    rel = path.relative_to(ROOT)
    layer = rel.parts[0]
    source = path.read_text() if source is None else source
    out = []
    for line, module in imported_modules(source, path):
        top = module.split(".")[0]
        if rel.name == "__main__.py" and layer != "cli":
            if top != "cli":
                out.append(f"{rel}:{line}: an entry point imports {module} (only cli)")
        elif top in FORBIDDEN[layer]:
            out.append(f"{rel}:{line}: {layer} imports {module}")
        if layer == "jaxvlm" and rel.name in MODEL_FILES and module.startswith("conversion.hf"):
            out.append(f"{rel}:{line}: a model file imports the Hugging Face importer ({module})")
    return out


def project_files() -> list[Path]:
    return sorted(p for layer in FORBIDDEN for p in (ROOT / layer).rglob("*.py"))


def test_every_layer_has_files():
    counts = {layer: len(list((ROOT / layer).rglob("*.py"))) for layer in FORBIDDEN}
    assert all(counts.values()), counts


@pytest.mark.parametrize("path", project_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_go_one_way(path):
    assert not violations(path), "\n".join(violations(path))


def test_the_checker_sees_violations():
    """The rules bite: lazy, relative and `from` imports against the direction are reported."""
    cases = {
        ROOT / "jaxvlm" / "language_model.py": "def f():\n    from conversion.hf import rope_inv_freq\n",
        ROOT / "jaxvlm" / "generate.py": "import torch\n",
        ROOT / "conversion" / "mapping.py": "from jaxvlm.pretrained import flat_state\n",
        ROOT / "torch_ref" / "train.py": "import jax.numpy as jnp\n",
        ROOT / "jaxvlm" / "data" / "loader.py": "from ...cli import main\n",
        ROOT / "jaxvlm" / "__main__.py": "from .train_loop import train\n",
    }
    for path, source in cases.items():
        assert violations(path, source), f"not caught: {source!r} in {path.relative_to(ROOT)}"
    assert not violations(ROOT / "cli" / "bench.py", "import torch\nimport jaxvlm\n")
    assert "conversion.config" in {
        m
        for _, m in imported_modules((ROOT / "jaxvlm/language_model.py").read_text(), ROOT / "jaxvlm/language_model.py")
    }
