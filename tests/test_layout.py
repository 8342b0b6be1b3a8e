"""The engine's layout rules: one concern per module, imports in one direction, short functions."""

import ast

import pytest

from conftest import ROOT

MODULES = ["tkp_runtime", "tkp_data", "tkp_report", "tkp_qat", "tkp_sparsity", "tkp_train", "tkp_common",
           "tkp_figures"]
# what each module may import of the project (the driver, tkp_common, imports the others)
ALLOWED = {"tkp_runtime": set(), "tkp_data": {"tkp_runtime"}, "tkp_report": {"tkp_runtime"},
           "tkp_qat": {"tkp_runtime"}, "tkp_figures": set(), "tkp_sparsity": {"tkp_runtime"},
           "tkp_train": {"tkp_runtime", "tkp_sparsity"},
           "tkp_common": {"tkp_runtime", "tkp_data", "tkp_report", "tkp_qat", "tkp_sparsity", "tkp_train",
                          "tkp_figures"}}
MAX_FUNCTION_LINES = 80


def project_imports(path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return {n for n in names if n.startswith("tkp_")}


@pytest.mark.parametrize("module", MODULES)
def test_imports_go_one_way_and_docstrings_say_so(module):
    path = ROOT / f"{module}.py"
    imported = project_imports(path) - {module}
    assert imported <= ALLOWED[module], f"{module} imports {sorted(imported - ALLOWED[module])}"
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc and len(doc.splitlines()) >= 2, f"{module} needs a docstring saying what it owns"
    if module != "tkp_figures":
        assert "May import" in doc, f"{module}'s docstring should say what it may import"


def python_files():
    files = [p for p in ROOT.glob("*.py")] + list((ROOT / "benchmarks").glob("*.py"))
    return sorted(files)


def test_no_function_is_longer_than_a_screen():
    long = []
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "functions over ~80 lines: " + ", ".join(long)


def test_scripts_import_only_the_driver():
    """A model script talks to the engine through `import tkp_common as tkp` only."""
    for path in ROOT.glob("*.py"):
        if path.name.startswith("tkp_"):
            continue
        imported = project_imports(path)
        assert imported <= {"tkp_common"}, f"{path.name} imports {sorted(imported)}"
