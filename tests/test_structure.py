"""The package's layering, read from its source: no import cycle, no kernel importing another
version's kernel, no subprocess in the kernels package, and the algorithm names written once."""

import ast
from pathlib import Path

import pytest

from flashnumba import registry

PACKAGE = Path(__file__).resolve().parent.parent / "flashnumba"


def _modules():
    """{dotted name: path} of every module of the package."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name, path):
    """The package modules `name` imports anywhere in its source (inside functions too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module
            targets.add(module)
            targets.update(f"{module}.{alias.name}" for alias in node.names)   # from pkg import module
    return {t for t in targets if t in MODULES and t != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _package_parents(name):
    """Importing a.b.c runs a/__init__ and a/b/__init__ first: those edges exist too."""
    parts = name.split(".")
    return {".".join(parts[:n]) for n in range(1, len(parts))} & set(MODULES)


def test_the_import_graph_has_no_cycle():
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(GRAPH[node] - _package_parents(node)):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(GRAPH):
        if node not in state:
            visit(node)


def test_no_kernel_module_imports_another_kernel_module():
    kernels = {f"flashnumba.kernels.{k}" for k in registry.kernels()}
    for module in sorted(kernels):
        assert not GRAPH[module] & kernels, f"{module} imports {sorted(GRAPH[module] & kernels)}"


def test_nothing_below_imports_the_pytorch_adapter():
    adapter = {m for m in MODULES if m.startswith("flashnumba.torch")}
    for module, imported in GRAPH.items():
        if module.startswith(("flashnumba.kernels", "flashnumba.mirror", "flashnumba.attention",
                              "flashnumba.reference", "flashnumba.registry", "flashnumba.validate")):
            assert not imported & adapter, f"{module} imports {sorted(imported & adapter)}"


def test_the_kernels_package_runs_no_subprocess():
    for name, path in MODULES.items():
        if name.startswith("flashnumba.kernels"):
            tree = ast.parse(path.read_text())
            imported = {alias.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                        for alias in node.names} | {node.module for node in ast.walk(tree)
                                                    if isinstance(node, ast.ImportFrom)}
            assert "subprocess" not in imported, f"{name} imports subprocess"


def _string_literals(path):
    """Every str constant of the module except docstrings and ``__all__`` (Python names)."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            docstrings.update(id(c) for c in ast.walk(node.value))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    return [node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_the_algorithm_names_are_written_once():
    names = set(registry.names()) | set(registry.kernels()) | {a.name for a in registry.ALGORITHMS}
    written = {module: sorted(set(_string_literals(path)) & names) for module, path in MODULES.items()
               if module != "flashnumba.registry"}
    assert not any(written.values()), {m: w for m, w in written.items() if w}
