"""The package's layers point one way: kernels/ <- engine/ <- models/ <- rl/, train/ <- cli. Checked on the
source (ast), so a stray import anywhere fails here, not in a user's environment."""
import ast
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "python" / "vla_rft_engine"
STDLIB = set(sys.stdlib_module_names)


def _modules():
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(PKG)
        yield rel, ast.parse(p.read_text(), str(p))


def _imports(rel: Path, tree: ast.Module):
    """Absolute names of everything `rel` imports: 'vla_rft_engine.config', 'torch', ..."""
    pkg = ["vla_rft_engine", *rel.parts[:-1]]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = pkg[:len(pkg) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            if node.module:
                yield mod
            else:  # `from . import x`: x is a module of that package
                yield from (f"{mod}.{a.name}" for a in node.names)


def _inside(name: str, *pkgs: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in pkgs)


def test_only_cli_imports_the_cli():
    bad = [f"{rel}: {m}" for rel, tree in _modules() if rel.name != "cli.py"
           for m in _imports(rel, tree) if _inside(m, "vla_rft_engine.cli")]
    assert not bad, "library code imports the CLI: " + "; ".join(bad)


@pytest.mark.parametrize("layer,allowed", [
    ("kernels", ("torch", "triton", "numpy", "vla_rft_engine.kernels", "vla_rft_engine._attn_cpu")),
    ("engine", ("torch", "vla_rft_engine.kernels", "vla_rft_engine.engine")),
    ("models", ("torch", "numpy", "transformers", "safetensors", "yaml", "vla_rft_engine.models",
                "vla_rft_engine.engine", "vla_rft_engine.kernels", "vla_rft_engine.ops", "vla_rft_engine.layout",
                "vla_rft_engine.config", "vla_rft_engine.utils")),
])
def test_layer_imports(layer, allowed):
    bad = []
    for rel, tree in _modules():
        if rel.parts[0] != layer:
            continue
        for m in _imports(rel, tree):
            if m.split(".")[0] not in STDLIB and not _inside(m, *allowed):
                bad.append(f"{rel}: {m}")
    assert not bad, f"{layer}/ imports outside its layer: " + "; ".join(bad)


def test_the_checker_sees_a_violation(tmp_path):
    tree = ast.parse("from ..cli import main\nfrom ..rl import grpo\nimport torch\n")
    got = list(_imports(Path("models/x.py"), tree))
    assert got == ["vla_rft_engine.cli", "vla_rft_engine.rl", "torch"]
    assert _inside(got[0], "vla_rft_engine.cli") and not _inside("vla_rft_engine.client", "vla_rft_engine.cli")
