"""The package's layering, read from the source: imports point down the layers and never round in a circle.

foundations (errors, constants, files, images, classes, schema) -> model -> onnx.runtime -> hub -> data ->
inference -> onnx (export), viz -> engine, web -> cli.
A module may import from its own package or from a lower layer (the foundations from each other); lazy imports
inside functions count too. A layer is a package, or a module placed on its own (``onnx.runtime``: loading a model
from the Hub or a file may run an exported graph, but writing one needs the data and inference code).
"""

import ast
import importlib
import re
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "regproxy_cli"

LAYERS = {
    "errors": 0, "constants": 0, "files": 0, "images": 0, "classes": 0, "schema": 0,
    "model": 1,
    "onnx.runtime": 2,
    "hub": 3,
    "data": 4,
    "inference": 5,
    "onnx": 6, "viz": 6, "plots": 6,
    "engine": 7, "web": 7,
    "cli": 8, "plugins": 8,  # plugins: other papers' ideas, reached only through entry points (like a third party)
}
FACADE = {"regproxy_cli", "regproxy_cli.__main__"}  # the public API gathers from every layer


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every regproxy_cli import in a file, at any depth."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from regproxy_cli.x import y` may name a submodule y: count it as importing x.y when it is one
            for alias in node.names:
                candidate = f"{module}.{alias.name}"
                is_module = (PACKAGE.parent / candidate.replace(".", "/")).with_suffix(".py").is_file() or (
                    PACKAGE.parent / candidate.replace(".", "/") / "__init__.py").is_file()
                found.append((node.lineno, candidate if is_module else module))
    return [(line, name) for line, name in found if name == "regproxy_cli" or name.startswith("regproxy_cli.")]


def _group(module: str) -> str:
    """The layer a module is in: the longest LAYERS key it is, or is inside (``onnx.runtime`` before ``onnx``)."""
    parts = module.split(".")[1:]
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in LAYERS:
            return ".".join(parts[:end])
    return parts[0]


SOURCES = sorted(PACKAGE.rglob("*.py"))
GRAPH = {_module_name(p): _imports(p) for p in SOURCES}


def test_every_module_belongs_to_a_layer():
    unplaced = sorted(m for m in GRAPH if m not in FACADE and _group(m) not in LAYERS)
    assert not unplaced, f"add these to LAYERS (and the layout in docs/development.md): {unplaced}"


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m not in FACADE))
def test_imports_point_down_the_layers(module):
    rank = LAYERS[_group(module)]
    upward = []
    for line, target in GRAPH[module]:
        if target in FACADE:
            upward.append(f"line {line}: {target} (the public facade; import the defining module)")
        elif _group(target) != _group(module) and LAYERS[_group(target)] >= rank > 0:
            upward.append(f"line {line}: {target} ({_group(target)} is not below {_group(module)})")
    assert not upward, f"{module} imports upward: {upward}"


def test_no_import_cycles():
    edges = {m: sorted({t for _, t in imports if t in GRAPH and t != m}) for m, imports in GRAPH.items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in edges[module]:
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, f"import cycles: {[' -> '.join(c) for c in cycles]}"


def test_the_checker_sees_an_upward_and_a_circular_import(tmp_path, monkeypatch):
    """The checks above would fail on a violation: run them over a planted one."""
    fake = tmp_path / "regproxy_cli"
    (fake / "model").mkdir(parents=True)
    (fake / "engine").mkdir()
    for init in (fake / "__init__.py", fake / "model" / "__init__.py", fake / "engine" / "__init__.py"):
        init.write_text("")
    (fake / "model" / "a.py").write_text("def f():\n    from regproxy_cli.engine.b import g\n")
    (fake / "engine" / "b.py").write_text("from regproxy_cli.model import a\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    imports = {_module_name(p): _imports(p) for p in sorted(fake.rglob("*.py"))}
    assert imports["regproxy_cli.model.a"] == [(2, "regproxy_cli.engine.b")]
    assert imports["regproxy_cli.engine.b"] == [(1, "regproxy_cli.model.a")]
    monkeypatch.setattr(sys.modules[__name__], "GRAPH", imports)
    with pytest.raises(AssertionError, match="imports upward"):
        test_imports_point_down_the_layers("regproxy_cli.model.a")
    test_imports_point_down_the_layers("regproxy_cli.engine.b")
    with pytest.raises(AssertionError, match="import cycles"):
        test_no_import_cycles()


def _resolves(dotted: str) -> bool:
    """Whether ``regproxy_cli.a.b.c`` names a module, or an attribute of one (a class, a function, a method)."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for name in parts[split:]:
                target = getattr(target, name)
        except AttributeError:
            return False
        return True
    return False


def test_every_dotted_path_in_the_docs_and_docstrings_exists():
    root = PACKAGE.parent
    files = [*PACKAGE.rglob("*.py"), *(root / "bench").glob("*.py"), root / "README.md", *(root / "docs").glob("*.md")]
    missing = sorted({f"{path.relative_to(root)}: {dotted}" for path in files
                      for dotted in re.findall(r"regproxy_cli(?:\.\w+)+", path.read_text())
                      if not _resolves(dotted.rstrip("."))})
    assert not missing, missing


def test_nothing_outside_the_cli_imports_the_cli():
    """The CLI parses and renders; library code (and bench/) lives below it, so nothing reaches up into it. The one
    exception is ``python -m regproxy_cli``, which starts the CLI."""
    bench = {f"bench/{p.relative_to(PACKAGE.parent / 'bench')}": _imports(p)
             for p in sorted((PACKAGE.parent / "bench").rglob("*.py"))}
    found = sorted(f"{module}: {target}" for module, imports in {**GRAPH, **bench}.items()
                   for _, target in imports
                   if target.startswith("regproxy_cli.cli") and not module.startswith("regproxy_cli.cli")
                   and module != "regproxy_cli.__main__")
    assert not found, found


def test_loading_a_model_imports_no_data_inference_or_export_code():
    """hub.zoo.load_model is the most basic operation: what it imports, at any depth, is the model, the Hub and the
    ONNX runtime, nothing above (read from the source: importing any submodule runs the facade's imports)."""
    reached, todo = set(), ["regproxy_cli.hub.zoo"]
    while todo:
        module = todo.pop()
        for _, target in GRAPH.get(module, []):
            if target not in reached and target not in FACADE:
                reached.add(target)
                todo.append(target)
    above = sorted(m for m in reached if _group(m) in ("data", "inference", "onnx", "engine", "viz", "cli"))
    assert not above, f"load_model drags in {above}"


def test_no_module_probes_a_model_with_hasattr():
    """Models declare what they can do (model/base.py: has_regions, has_grid_logits, stride); nobody guesses."""
    probes = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "hasattr" and node.args:
                target = ast.unparse(node.args[0])
                if re.search(r"\b(model|segmenter|source|net)\b", target):
                    probes.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: hasattr({target}, ...)")
    assert not probes, probes


def test_optional_dependencies_are_reached_through_require_extra():
    """One guard for every extra (errors.require_extra: one line naming the extra and the pip command)."""
    guards = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ExceptHandler) and node.type is not None and \
                    ast.unparse(node.type) in ("ImportError", "ModuleNotFoundError"):
                guards.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    # errors.require_extra itself; training's TensorBoard is optional without an extra (the run goes on without it)
    assert sorted(guards) == sorted(g for g in guards if g.startswith(("errors.py:", "engine/train.py:"))), guards
    assert len([g for g in guards if g.startswith("errors.py:")]) == 1


def test_require_extra_is_one_line_naming_the_extra(monkeypatch):
    from regproxy_cli.errors import RegproxyError, require_extra

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(RegproxyError) as error:
        require_extra("matplotlib", "report", "eval --report")
    assert str(error.value) == "eval --report needs the 'report' extra: pip install 'regproxy[report]'"
    assert require_extra("json", "none", "json") is sys.modules["json"]


def test_cli_modules_stay_short():
    """The CLI parses, calls one library function and renders: a command module past 150 lines holds library code."""
    long = {p.name: n for p in (PACKAGE / "cli").glob("*.py") if (n := len(p.read_text().splitlines())) > 150}
    assert not long, long
