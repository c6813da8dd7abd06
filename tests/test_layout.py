"""The code's shape stays readable (issue 15): no function over 100 lines, no class over
250, no module importing another's private name, no product code switched by test-only
environment variables. Checked on the source tree, so a change that breaks it fails here
with the file and line to fix."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "flm_dist"
MAX_FUNCTION, MAX_CLASS = 100, 250


def _modules() -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text(), str(p))) for p in sorted(PKG.rglob("*.py"))]


def test_no_function_over_100_lines_and_no_class_over_250():
    too_long = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            limit = MAX_CLASS if isinstance(node, ast.ClassDef) else MAX_FUNCTION if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None
            if limit and node.end_lineno - node.lineno + 1 > limit:
                too_long.append(f"{path.relative_to(PKG.parent)}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines (limit {limit})")
    assert not too_long, "\n".join(too_long)


def test_no_module_imports_another_modules_private_name():
    private = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("flm_dist"):
                private += [f"{path.relative_to(PKG.parent)}:{node.lineno} imports {a.name} from {node.module}" for a in node.names if a.name.startswith("_") and not a.name.endswith("__")]
    assert not private, "\n".join(private)


def test_product_code_reads_no_test_only_environment_variables():
    """Test hooks are arguments (e.g. launch.train(trace_rows=...)), not FLM_* variables;
    the only FLM_* variables are the user-facing ones the README documents."""
    readme = (PKG.parent / "README.md").read_text()
    reads = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("FLM_") and f"`{node.value}=" not in readme:
                reads.append(f"{path.relative_to(PKG.parent)}:{node.lineno} {node.value} (not a documented, user-facing variable)")
    assert not reads, "\n".join(reads)
