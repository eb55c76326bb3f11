"""The import rule of docs/architecture.md, enforced: layers import downward only, no circles.

Every ``import`` under src/tunelab (module level and inside functions alike) is parsed, resolved
to the tunelab module it names, and checked against the layer of its top-level part. A new
top-level module or package must be given a layer here (and in docs/architecture.md).
"""

from __future__ import annotations

import ast
import re
import shutil
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "tunelab"

# top-level part of the package -> layer; an import may only go to a lower layer or stay in its
# own part. kernels/ is apart: it imports nothing of tunelab (and anyone may import it).
LAYERS = {
    "files": 0,
    "kernels": 0,
    "console": 0,
    "config_errors": 0,
    "config": 1,
    "data": 2,
    "models": 3,
    "audit": 4,
    "train": 5,
    "infer": 6,
    "preview": 6,
    "evaluate": 6.2,  # tunelab eval, diagnose
    "report": 6.3,  # reads run dirs; imports files only
    "plan": 6.6,  # doctor, memory, advice, sweep, run (doctor -> train -> report)
    "serve": 6.8,  # the OpenAI-compatible server
    "datagen": 6.8,  # self-instruct, augmentation (serve and datagen do not import each other)
    "cli": 7,
    "__main__": 8,
    "__init__": 8,
}
ISOLATED = {"kernels"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every tunelab import in ``path``."""
    mod = _module_name(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "tunelab"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "tunelab":
                continue
            # `from .x import y` may name a submodule y: count it as an import of x.y when it is one
            for a in node.names:
                sub = f"{target}.{a.name}"
                is_module = (SRC.parent / Path(*sub.split("."))).with_suffix(".py").exists() or (SRC.parent / Path(*sub.split("."))).is_dir()
                out.append((node.lineno, sub if is_module else target))
    return out


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _graph() -> dict[str, list[tuple[int, str]]]:
    return {_module_name(p): _imports(p) for p in sorted(SRC.rglob("*.py"))}


def test_every_part_has_a_layer():
    parts = {p.stem if p.is_file() else p.name for p in SRC.iterdir() if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))}
    missing = sorted(parts - set(LAYERS))
    assert not missing, f"give these a layer in tests/test_architecture.py and docs/architecture.md: {missing}"


def test_imports_only_go_down():
    bad = []
    for mod, imports in _graph().items():
        src_part = _part(mod)
        for line, target in imports:
            dst_part = _part(target)
            if dst_part == src_part:
                continue
            if src_part in ISOLATED:
                bad.append(f"{mod}:{line} imports {target}: {src_part}/ imports nothing of tunelab")
            elif LAYERS[dst_part] >= LAYERS[src_part]:
                bad.append(f"{mod}:{line} imports {target}: layer {src_part} ({LAYERS[src_part]}) may not import {dst_part} ({LAYERS[dst_part]})")
    assert not bad, "upward or sideways imports:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = {m: sorted({t for _, t in imps if t != m}) for m, imps in _graph().items()}
    # a package's __init__ re-exporting its modules is not a cycle with them: drop package -> own child edges
    for m in graph:
        graph[m] = [t for t in graph[m] if not t.startswith(m + ".")]
    color: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        color[m] = 1
        stack.append(m)
        for t in graph.get(m, []):
            if color.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in color:
                visit(t)
        stack.pop()
        color[m] = 2

    for m in graph:
        if m not in color:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("source,expected", [
    ("from ..train.loss import CausalLMLoss\n", "layer models (3) may not import train (5)"),
    ("from ..cli import main\n", "layer models (3) may not import cli (7)"),
])
def test_the_rule_catches_an_upward_import(tmp_path, monkeypatch, source, expected):
    """The checker itself can fail: a planted upward import in a copy of the tree is reported."""
    tree = _copy_tree(tmp_path, monkeypatch)
    (tree / "models" / "planted.py").write_text(source)
    with pytest.raises(AssertionError, match=re.escape(expected)):
        test_imports_only_go_down()


def test_the_rule_catches_a_cycle(tmp_path, monkeypatch):
    tree = _copy_tree(tmp_path, monkeypatch)
    (tree / "models" / "planted_a.py").write_text("from . import planted_b\n")
    (tree / "models" / "planted_b.py").write_text("def f():\n    from .planted_a import x\n")
    with pytest.raises(AssertionError, match=re.escape("tunelab.models.planted_a -> tunelab.models.planted_b -> tunelab.models.planted_a")):
        test_no_import_cycles()


def _copy_tree(tmp_path: Path, monkeypatch) -> Path:
    tree = tmp_path / "tunelab"
    shutil.copytree(SRC, tree, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(sys.modules[__name__], "SRC", tree)
    return tree
