"""rn50/ runs on the nodes: Python >= 3.8 syntax, and no imports from tasks/, flows/ or prefect."""
import ast
from pathlib import Path

import pytest

RN50 = Path(__file__).resolve().parent.parent / "rn50"
SOURCES = sorted(RN50.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_parses_as_python_3_8(path):
    ast.parse(path.read_text(), filename=str(path), feature_version=(3, 8))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_imports_nothing_from_the_orchestration_side(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for name in names:
            assert name.split(".")[0] not in ("tasks", "flows", "prefect"), f"{path.name} imports {name}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_no_runtime_pep604_or_builtin_generics_without_future_import(path):
    """`X | Y` and `list[int]` in annotations are fine on 3.8 only with postponed evaluation."""
    src = path.read_text()
    tree = ast.parse(src)
    if "from __future__ import annotations" in src:
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AnnAssign, ast.arg)):
            ann = getattr(node, "annotation", None) or getattr(node, "returns", None)
            if ann is not None:
                assert not isinstance(ann, ast.BinOp), f"{path.name}:{node.lineno} uses X | Y"
                assert not (isinstance(ann, ast.Subscript) and getattr(ann.value, "id", "") in ("list", "dict", "tuple", "set"))
