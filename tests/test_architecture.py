"""The house rules, checked on the source: layers, no import cycles, no private names across modules,
a lazy top-level package, and an install that ships every package (docs/architecture.md).

The import graph is read from the AST of every module, module-level and function-level imports
alike (``if TYPE_CHECKING:`` ones too: a type is a dependency). Layers, lowest first — a module
may import its own layer and the layers before it, never one after:

    base         errors, config, ops, qops, qref, source, progress, artifact
    target data  graphopt.targets and its spec / registry / opset / board / built-in target modules
    passes       graphopt.passes.*  (passes read target data: PassContext.target, operator sets)
    lowering     graphopt.targets.lowering.*
    backends     graphopt.targets.backends.*
    tuning       graphopt.targets.tuning.*
    api          everything else in graphopt (compile, prune, quantize, ..., report, CLI)
"""
from __future__ import annotations

import ast
import importlib.util
import json
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = {"graphopt": ROOT / "graphopt", "graphopt.passes": ROOT / "passes", "graphopt.targets": ROOT / "targets"}

BASE = {"graphopt.errors", "graphopt.config", "graphopt.ops", "graphopt.qops", "graphopt.qref", "graphopt.source",
        "graphopt.progress", "graphopt.artifact"}
TARGET_DATA = {"graphopt.targets", "graphopt.targets.spec", "graphopt.targets.registry", "graphopt.targets.opset",
               "graphopt.targets.boards", "graphopt.targets.host", "graphopt.targets.cortex_a",
               "graphopt.targets.cortex_m", "graphopt.targets.armv7"}
LAYERS = ("base", "target data", "passes", "lowering", "backends", "tuning", "api")


def layer(module: str) -> str:
    if module in BASE:
        return "base"
    if module in TARGET_DATA:
        return "target data"
    for prefix, name in (("graphopt.passes", "passes"), ("graphopt.targets.lowering", "lowering"),
                         ("graphopt.targets.backends", "backends"), ("graphopt.targets.tuning", "tuning")):
        if module == prefix or module.startswith(prefix + "."):
            return name
    if module.startswith("graphopt.targets"):
        raise AssertionError(f"{module} is in graphopt.targets but in none of its layers: add it to TARGET_DATA "
                             "or move it into lowering/, backends/ or tuning/")
    return "api"


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    imports: dict[str, int] = field(default_factory=dict)  # graphopt module -> first line importing it
    runtime_imports: set[str] = field(default_factory=set)  # executed when the module is imported
    private_uses: list[str] = field(default_factory=list)  # "line: what" for private names of other modules


def _modules() -> dict[str, Module]:
    found = {}
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if any(p.startswith(".") for p in rel.parts):
                continue
            found[name] = Module(name, path, path.name == "__init__.py")
    return found


def _resolve(name: str, modules: dict[str, Module]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING" or (
        isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING")


def _scan(mod: Module, modules: dict[str, Module]) -> None:
    tree = ast.parse(mod.path.read_text(), str(mod.path))
    package = mod.name if mod.is_package else mod.name.rpartition(".")[0]
    aliases: dict[str, str] = {}  # local name -> graphopt module it is bound to

    def add(target: str, line: int, runtime: bool) -> str | None:
        resolved = _resolve(target, modules)
        if resolved is None or resolved == mod.name:
            return resolved
        mod.imports.setdefault(resolved, line)
        if runtime:
            mod.runtime_imports.add(resolved)
        return resolved

    def visit(node: ast.AST, runtime: bool) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.body:
                visit(child, False)
            for child in node.orelse:
                visit(child, runtime)
            return
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            runtime = False  # runs when called, not on import
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.partition(".")[0] == "graphopt":
                    resolved = add(a.name, node.lineno, runtime)
                    if a.asname and resolved:
                        aliases[a.asname] = resolved
                    if a.name.rpartition(".")[2].startswith("_") and not a.name.endswith("__"):
                        mod.private_uses.append(f"{node.lineno}: import {a.name}")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.partition(".")[0] == "graphopt":
                for a in node.names:
                    candidate = f"{source}.{a.name}"
                    if candidate in modules:  # from package import module
                        add(candidate, node.lineno, runtime)
                        aliases[a.asname or a.name] = candidate
                    else:
                        resolved = add(source, node.lineno, runtime)
                        if a.name.startswith("_") and resolved != mod.name:
                            mod.private_uses.append(f"{node.lineno}: from {source} import {a.name}")
                if any(part.startswith("_") and not part.startswith("__") for part in source.split(".")):
                    mod.private_uses.append(f"{node.lineno}: from {source} import ...")
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
              and node.attr.startswith("_") and not node.attr.startswith("__")):
            mod.private_uses.append(f"{node.lineno}: {node.value.id}.{node.attr}")
        for child in ast.iter_child_nodes(node):
            visit(child, runtime)

    visit(tree, True)


@pytest.fixture(scope="module")
def graph() -> dict[str, Module]:
    modules = _modules()
    for mod in modules.values():
        _scan(mod, modules)
    return modules


def _cycles(modules: dict[str, Module]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in modules[v].imports:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in modules:
        if v not in index:
            connect(v)
    return found


def test_the_graph_is_read(graph):
    """The walker sees what it should: module- and function-level imports, and the known sub-packages."""
    assert {"graphopt.passes.pipeline", "graphopt.targets.lowering.phases", "graphopt.targets.backends.registry",
            "graphopt.targets.tuning.metaschedule", "graphopt.api"} <= set(graph)
    assert "graphopt.passes.pipeline" in graph["graphopt.api"].imports  # module level
    assert "graphopt.targets.lowering.schedules" in graph["graphopt.targets.lowering.phases"].imports  # in a function
    assert sum(len(m.imports) for m in graph.values()) > 200


def test_no_import_cycles(graph):
    assert _cycles(graph) == []


def test_every_import_goes_down_or_sideways(graph):
    upward = [f"{m.name} ({layer(m.name)}) imports {t} ({layer(t)}) at {m.path.relative_to(ROOT)}:{line}"
              for m in graph.values() for t, line in m.imports.items()
              if LAYERS.index(layer(t)) > LAYERS.index(layer(m.name))]
    assert upward == []


def test_packages_run_nothing_above_their_modules(graph):
    """Importing a module first runs its packages' __init__: what they import at module level must
    not rank above any module inside them (the root package imports nothing: its API loads lazily)."""
    assert not graph["graphopt"].runtime_imports
    bad = []
    for pkg in (m for m in graph.values() if m.is_package):
        inside = [m for m in graph.values() if m.name.startswith(pkg.name + ".")]
        lowest = min((LAYERS.index(layer(m.name)) for m in inside), default=0)
        bad += [f"{pkg.name} imports {t} ({layer(t)}) on import, above {LAYERS[lowest]} modules inside it"
                for t in pkg.runtime_imports if LAYERS.index(layer(t)) > lowest]
    assert bad == []


def test_no_private_names_across_modules(graph):
    uses = [f"{m.path.relative_to(ROOT)}:{u}" for m in graph.values() for u in m.private_uses]
    assert uses == []


def test_lower_layers_load_without_the_layers_above():
    """In a fresh interpreter: a pass and the target data load neither TVM nor lowering, backends, tuning
    or the API; the API names load on first use."""
    code = ("import sys, graphopt.passes.fold_batchnorm, graphopt.targets.opset, graphopt.targets\n"
            "import graphopt\n"
            "before = sorted(m for m in sys.modules if m.startswith(('graphopt', 'tvm')))\n"
            "graphopt.compile\n"
            "after = sorted(m for m in sys.modules if m.startswith('graphopt'))\n"
            "import json; print(json.dumps([before, after]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    before, after = json.loads(out.strip().splitlines()[-1])
    above = [m for m in before if m.startswith("tvm") or layer(m) in ("lowering", "backends", "tuning", "api")
             and m != "graphopt"]
    assert above == []
    assert "graphopt.api" in after


def test_importing_graphopt_changes_no_warning_filter():
    """graphopt silences torch's pytree deprecation around its own calls, never process-wide (the
    libraries it imports are imported first: their own filters are theirs)."""
    code = ("import warnings, torch, tvm, tvm_ffi, tqdm, torch.ao.quantization.fx._decomposed\n"
            "from tvm import relax\n"
            "before = list(warnings.filters)\n"
            "import graphopt; graphopt.compile, graphopt.quantize, graphopt.tune\n"
            "print(list(warnings.filters) == before)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("True")


def test_public_functions_are_not_shadowed_by_modules():
    """``graphopt.quantize`` is the function; no ``graphopt/quantize.py`` could replace it on import."""
    import graphopt

    clashes = [n for n in graphopt.__all__ if importlib.util.find_spec(f"graphopt.{n}") is not None]
    assert clashes == []
    assert set(graphopt.__all__) == set(graphopt._EXPORTS)
    assert callable(graphopt.quantize) and callable(graphopt.prune) and callable(graphopt.tune)


def test_no_bare_prints_in_the_library(graph):
    """Progress goes through `graphopt.progress` (logging + tqdm); only the CLI and the demo print."""
    printing = []
    for m in graph.values():
        if m.name in ("graphopt.cli", "graphopt.demo"):
            continue
        for node in ast.walk(ast.parse(m.path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                printing.append(f"{m.path.relative_to(ROOT)}:{node.lineno}")
    assert printing == []


def test_every_error_and_warning_class_lives_in_errors(graph):
    elsewhere = []
    for m in graph.values():
        if m.name == "graphopt.errors":
            continue
        for node in ast.walk(ast.parse(m.path.read_text())):
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_") and any(
                    re.search(r"(Error|Warning)$", ast.unparse(b)) for b in node.bases):
                elsewhere.append(f"{m.path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert elsewhere == []


def test_setuptools_installs_every_package():
    """pyproject's package list and package-dir map cover every folder of Python modules, and the
    runtime C sources ship as package data of the package that holds them."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, dirs = set(tool["packages"]), tool["package-dir"]
    found = set()
    for package, folder in SOURCES.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder)
            found.add(".".join([package, *rel.parts]))
    assert listed == found

    def folder_of(package: str) -> Path:
        head, rest = package, []
        while head not in dirs:
            head, _, tail = head.rpartition(".")
            rest.insert(0, tail)
        return ROOT / dirs[head] / Path(*rest)

    assert all((folder_of(p) / "__init__.py").is_file() for p in listed)
    for package, patterns in tool["package-data"].items():
        shipped = [f for pattern in patterns for f in folder_of(package).glob(pattern)]
        assert shipped, f"package-data of {package} matches no file"
    runtime = {p.name for p in (folder_of("graphopt.targets.backends") / "runtime").iterdir()}
    assert {"runner.cc", "c_harness.c", "insncount.c"} <= runtime
