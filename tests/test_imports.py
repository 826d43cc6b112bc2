"""The package's import graph has no cycle; the runtime class-name tables stand alone (importing them
loads none of the builder's modules), and `python -m imagenet_ddp.labels` (the builder's command line)
still answers."""

import ast
import subprocess
import sys
from pathlib import Path

import imagenet_ddp

PACKAGE = Path(imagenet_ddp.__file__).parent


def _modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _runs(dotted: str, importer: str, modules: dict) -> set[str]:
    """The package modules that importing `dotted` runs, leaving out the importer and its enclosing
    packages (already run before it)."""
    parts = dotted.split(".")
    prefixes = {".".join(parts[: i + 1]) for i in range(len(parts))}
    return {p for p in prefixes if p in modules and p != importer and not importer.startswith(p + ".")}


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package modules its imports run, at the top or inside any function.

    `import a.b.c` runs a, a.b and a.b.c; `from a.b import c` runs a and a.b, then a.b.c when c is a
    module, and reads a.b's namespace when it is not. A package that encloses the importing module
    counts only when its namespace is read: Python runs every enclosing package before the module
    itself, so merely passing through one closes no cycle (`from imagenet_ddp.data import plan` in
    data/dali_backend.py does not; `from imagenet_ddp.sources import Listing` in sources/tiny.py would)."""
    modules = _modules(root)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    graph[name] |= _runs(alias.name, name, modules)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                graph[name] |= _runs(base, name, modules)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if sub in modules:
                        graph[name] |= _runs(sub, name, modules)
                    elif base in modules and base != name:
                        graph[name].add(base)  # reads the namespace of base, enclosing or not
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph(PACKAGE)
    assert len(graph) > 40 and "imagenet_ddp.sources.base" in graph["imagenet_ddp.sources.folder"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_a_cycle_is_found(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("def pick():\n    from pkg.sub.leaf import x\n")
    (pkg / "sub" / "helper.py").write_text("from pkg.sub import leaf\nimport pkg.top\n")
    (pkg / "sub" / "leaf.py").write_text("x = 1\n")
    (pkg / "top.py").write_text("")
    # sub.helper passes through its enclosing package sub to reach a module: no cycle
    assert find_cycle(import_graph(pkg)) is None
    # a layout module reading a name back from the package that imports it, in a function: a cycle
    (pkg / "sub" / "leaf.py").write_text("def f():\n    from pkg.sub import pick\n")
    assert find_cycle(import_graph(pkg)) == ["pkg.sub", "pkg.sub.leaf", "pkg.sub"]
    # the same through a relative import, two modules apart
    (pkg / "sub" / "leaf.py").write_text("x = 1\n")
    (pkg / "top.py").write_text("from .sub import helper\n")
    (pkg / "sub" / "__init__.py").write_text("import pkg.top\n")
    assert find_cycle(import_graph(pkg)) == ["pkg.sub", "pkg.top", "pkg.sub"]


def test_the_tables_do_not_import_their_builder():
    code = (
        "import sys, imagenet_ddp.labels as labels; labels.imagenet_names('es');"
        "print(sorted(m for m in sys.modules if m.startswith('imagenet_ddp.labels_')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_command_line_answers():
    cmd = [sys.executable, "-m", "imagenet_ddp.labels", "coverage"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert "en torchvision 1000" in out.splitlines()
