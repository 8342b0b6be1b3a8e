"""The code's layout rules: what sits at the top level, one concern per module, imports in
one direction (no cycles), short functions, scripts that talk to the engine only."""

import ast

import pytest
from conftest import ROOT

# what each module may import of the project; every module of tkp_lib must be listed
ALLOWED = {
    "tkp_lib.runtime": set(), "tkp_lib.kernels": set(), "tkp_lib.figures": set(), "tkp_lib.qat": set(),
    "tkp_lib.data": {"tkp_lib.runtime"}, "tkp_lib.report": {"tkp_lib.runtime"},
    "tkp_lib.sparsity": {"tkp_lib.runtime"}, "tkp_lib.train": {"tkp_lib.runtime", "tkp_lib.sparsity"},
    "tkp_lib.runs": {"tkp_lib.runtime", "tkp_lib.report", "tkp_lib.sparsity"},
    "tkp_lib.topk_conv": {"tkp_lib.kernels"}, "tkp_lib.tapgroup": {"tkp_lib.kernels"},
    "tkp_lib.depthwise": {"tkp_lib.kernels"},
    "tkp_lib.deploy_ops": {"tkp_lib.topk_conv", "tkp_lib.tapgroup", "tkp_lib.depthwise"},
    "tkp_lib.deploy_format": {"tkp_lib.runtime", "tkp_lib.kernels", "tkp_lib.deploy_ops"},
    "tkp_lib.deploy_layers": {"tkp_lib.kernels", "tkp_lib.topk_conv", "tkp_lib.tapgroup", "tkp_lib.depthwise",
                              "tkp_lib.deploy_ops",
                              "tkp_lib.deploy_format"},
    "tkp_common": {"tkp_lib.runtime", "tkp_lib.data", "tkp_lib.report", "tkp_lib.qat", "tkp_lib.sparsity",
                   "tkp_lib.train", "tkp_lib.runs", "tkp_lib.figures"},
    "tkp_deploy": {"tkp_common", "tkp_lib.runtime", "tkp_lib.topk_conv", "tkp_lib.deploy_format",
                   "tkp_lib.deploy_layers"},
}
MAX_FUNCTION_LINES = 80
SCRIPTS = {"vgg8_optimized", "googlenet_optimized", "densenet_optimized", "resnet56_optimized", "vgg19_optimized",
           "vit_small", "clip_vit"}


def module_path(name: str):
    return ROOT / (name.replace(".", "/") + ".py")


def project_imports(path) -> set[str]:
    """The project's modules `path` imports ('tkp_common', 'tkp_lib.data', ...)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module == "tkp_lib":
                names |= {f"tkp_lib.{a.name}" for a in node.names}
    return {n for n in names if n.startswith("tkp_") and n != "tkp_lib"}


def test_the_top_level_holds_the_scripts_the_engine_and_the_deploy_command():
    python = {p.stem for p in ROOT.glob("*.py")}
    assert python == SCRIPTS | {"tkp_common", "tkp_deploy"}, sorted(python)


def test_every_module_is_listed():
    modules = {f"tkp_lib.{p.stem}" for p in (ROOT / "tkp_lib").glob("*.py") if p.stem != "__init__"}
    assert modules | {"tkp_common", "tkp_deploy"} == set(ALLOWED)


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_imports_go_one_way_and_docstrings_say_so(module):
    path = module_path(module)
    imported = project_imports(path) - {module}
    assert imported <= ALLOWED[module], f"{module} imports {sorted(imported - ALLOWED[module])}"
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc and len(doc.splitlines()) >= 2, f"{module} needs a docstring saying what it owns"
    if module.startswith("tkp_lib."):
        assert "May import" in doc, f"{module}'s docstring should say what it may import"


def test_the_allowed_imports_have_no_cycle():
    state = {}

    def visit(m, path):
        assert state.get(m) != "open", f"import cycle: {' -> '.join(path + [m])}"
        if state.get(m) is None:
            state[m] = "open"
            for n in ALLOWED[m]:
                visit(n, path + [m])
            state[m] = "done"

    for m in ALLOWED:
        visit(m, [])


def python_files():
    return sorted([*ROOT.glob("*.py"), *(ROOT / "tkp_lib").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")])


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
    """A model script talks to the engine through `import tkp_common as tkp` only, and uses
    only the names tkp_common.__all__ lists."""
    import tkp_common
    for name in SCRIPTS:
        source = module_path(name).read_text()
        imported = project_imports(module_path(name))
        assert imported <= {"tkp_common"}, f"{name} imports {sorted(imported)}"
        used = {node.attr for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name) and node.value.id == "tkp"}
        assert used <= set(tkp_common.__all__), f"{name} uses tkp.{sorted(used - set(tkp_common.__all__))}"
