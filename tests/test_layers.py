"""The package's layers point one way: kernels/ <- engine/ <- models/ <- rl/, train/ <- cli. Checked on the
source (ast), so a stray import anywhere fails here, not in a user's environment."""
import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PKG = REPO / "python" / "vla_rft_engine"
STDLIB = set(sys.stdlib_module_names)


def _modules():
    """(path inside the package, tree) of every module; engine/ and kernels/ are read from the repository root
    (in python/ they are symlinks, which rglob does not follow)."""
    files = [(p.relative_to(PKG), p) for p in PKG.rglob("*.py")]
    files += [(p.relative_to(REPO), p) for top in ("engine", "kernels") for p in (REPO / top).rglob("*.py")]
    for rel, p in sorted(files):
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
            # `from pkg import x`: x may be a module of pkg (`from vla_rft_engine import _attn_cpu`)
            yield from (f"{mod}.{a.name}" for a in node.names if mod == "vla_rft_engine" or not node.module)


def _inside(name: str, *pkgs: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in pkgs)


def test_only_cli_imports_the_cli():
    bad = [f"{rel}: {m}" for rel, tree in _modules() if rel.name != "cli.py"
           for m in _imports(rel, tree) if _inside(m, "vla_rft_engine.cli")]
    assert not bad, "library code imports the CLI: " + "; ".join(bad)


@pytest.mark.parametrize("layer,allowed", [
    # compiled extensions (vla_rft_engine._attn_cpu, ...) and GPU kernel libraries (flash_attn) count as kernels
    ("kernels", ("torch", "triton", "numpy", "vla_rft_engine.kernels", "vla_rft_engine._attn_cpu",
                 "vla_rft_engine._linear_cpu", "vla_rft_engine._sampling_cpu")),
    ("engine", ("torch", "flash_attn", "vla_rft_engine.kernels", "vla_rft_engine.engine")),
    ("models", ("torch", "numpy", "transformers", "safetensors", "yaml", "vla_rft_engine.models",
                "vla_rft_engine.engine", "vla_rft_engine.kernels", "vla_rft_engine.ops", "vla_rft_engine.layout",
                "vla_rft_engine.config", "vla_rft_engine.utils")),
])
def test_layer_imports(layer, allowed):
    bad, seen = [], 0
    for rel, tree in _modules():
        if rel.parts[0] != layer:
            continue
        seen += 1
        for m in _imports(rel, tree):
            if m.split(".")[0] not in STDLIB and not _inside(m, *allowed) and m != "vla_rft_engine":
                bad.append(f"{rel}: {m}")
    assert seen >= 3, f"found only {seen} modules in {layer}/"
    assert not bad, f"{layer}/ imports outside its layer: " + "; ".join(bad)


def test_the_checker_sees_a_violation(tmp_path):
    tree = ast.parse("from ..cli import main\nfrom ..rl import grpo\nimport torch\n")
    got = list(_imports(Path("models/x.py"), tree))
    assert got == ["vla_rft_engine.cli", "vla_rft_engine.rl", "torch"]
    assert _inside(got[0], "vla_rft_engine.cli") and not _inside("vla_rft_engine.client", "vla_rft_engine.cli")
