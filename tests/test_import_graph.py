"""The package's import graph: no cycles, no upward imports, modules of a readable size.

The graph is read from the source with `ast`, nothing is imported. Every
import statement counts, also one inside a function: a lazy import is still a
dependency, it only hides a cycle until the function runs. Each edge names
the module whose code the import runs: `from ..loss import config` is an edge
to `loss.config` (a submodule), `from ..loss import LossConfig` one to
`loss` (the package's `__init__`, which re-exports it). Imports under
`if TYPE_CHECKING:` count as well (they are dependencies of the design). The
package `__init__` that Python runs before a submodule is not an edge of its
own: with it, every `__init__` that re-exports its submodules would close a
cycle with each of them.

Layers, lowest first (`LAYERS`): a module may import modules of its own layer
or of a lower one. The entry points (`ENTRY_POINTS`) sit above everything and
may import anything; nothing but another entry point may import them.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "vopd_megatron"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

#: lowest first; a name is a top-level module or a subpackage of vopd_megatron.
LAYERS = (
    ("errors", "launch", "net", "progress", "timing"),  # foundation
    ("loss",),
    ("data",),
    ("config",),
    ("megatron",),
    ("model",),
    ("runtime",),  # start-up, parallel context, pipeline runner
    ("rollout",),
    ("training",),  # step, setup, checkpoint, logging
    ("eval",),
    ("convert",),
    ("demo", "testing"),
)
ENTRY_POINTS = ("training.train", "training.sft", "training.grad_variance", "eval.cli", "convert.cli")

MAX_MODULE_LINES = 400
MAX_ENTRY_POINT_LINES = 160  # "about 150": an entry point that reads like the algorithm


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Module name (without the `vopd_megatron.` prefix; "" for the package itself) -> file."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _resolve(node: ast.AST, module: str, is_package: bool, modules) -> tuple[list[str], list[str]]:
    """(the package modules an import statement runs, the package names it imports that are no module).

    Names are without the package prefix; a dangling name would fail at import time."""
    if isinstance(node, ast.Import):
        names = [_strip(a.name) for a in node.names if a.name.split(".")[0] == PACKAGE]
        return [_longest_module(n, modules) for n in names], [n for n in names if n not in modules]
    assert isinstance(node, ast.ImportFrom)
    if node.level == 0:
        if (node.module or "").split(".")[0] != PACKAGE:
            return [], []
        base = _strip(node.module)
    else:
        here = [*filter(None, module.split("."))]
        package = here if is_package else here[:-1]
        if node.level - 1 > len(package):
            return [], [f"{'.' * node.level}{node.module or ''} (above {PACKAGE})"]
        base = ".".join(package[: len(package) - (node.level - 1)] + ([node.module] if node.module else []))
    if base not in modules:
        return [_longest_module(base, modules)], [base]
    subs = [".".join(filter(None, (base, a.name))) for a in node.names]
    return [sub if sub in modules else base for sub in subs], []


def _strip(name: str) -> str:
    return name[len(PACKAGE) + 1:] if name.startswith(PACKAGE + ".") else ("" if name == PACKAGE else name)


def _longest_module(name: str, modules) -> str:
    parts = name.split(".")
    while parts and ".".join(parts) not in modules:
        parts.pop()
    return ".".join(parts)


def _imports(root: Path):
    """(module, the modules its import statements run, the names they import that are no module)."""
    files = module_files(root)
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        targets, dangling = set(), []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found, missing = _resolve(node, module, _is_package(path), files)
                targets.update(found)
                dangling += [f"{_name(module)}:{node.lineno} -> {_name(m)}" for m in missing]
        targets.discard(module)
        yield module, targets, dangling


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the package modules it imports (anywhere in its code), self-imports left out."""
    return {module: targets for module, targets, _ in _imports(root)}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layer_of(module: str) -> int | None:
    """The module's layer (an index into LAYERS; len(LAYERS) for entry points), None if unplaced."""
    if module in ENTRY_POINTS:
        return len(LAYERS)
    top = module.split(".")[0]
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    return None


def _describe(i: int | None) -> str:
    if i is None:
        return "no layer"
    return "entry points" if i == len(LAYERS) else "/".join(LAYERS[i])


def _name(module: str) -> str:
    return module or PACKAGE


def test_graph_builder_sees_known_edges():
    """The checks below cannot pass vacuously: the builder finds edges of every kind."""
    graph = import_graph()
    assert len(graph) > 50, sorted(graph)
    assert "rollout.engine" in graph["rollout.sampler"]  # lazy `from .engine import ...` in a method
    assert "loss.config" in graph["rollout.sampler"]  # `from ..loss.config import ...`
    assert "loss.stats" in graph["loss.fused_output"]  # `from . import stats as S`: the submodule
    assert "loss" in graph["training.step"]  # `from ..loss import LossConfig`: the package's __init__
    assert "errors" in graph["data.checks"]  # `from ..errors import ...`


def test_checks_catch_a_lazy_cycle_an_upward_and_a_dangling_import(tmp_path):
    """A cycle closed by an import inside a function, through a package's __init__; an import of a
    module that does not exist."""
    pkg = tmp_path / PACKAGE
    (pkg / "loss").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("def f():\n    from .loss import value\n")
    (pkg / "loss" / "__init__.py").write_text("from .helper import value\n")
    (pkg / "loss" / "helper.py").write_text(f"import {PACKAGE}.errors\nvalue = 1\n")
    graph = import_graph(pkg)
    assert graph == {"": set(), "errors": {"loss"}, "loss": {"loss.helper"}, "loss.helper": {"errors"}}
    assert find_cycles(graph) == [["errors", "loss", "loss.helper"]]
    assert layer_of("errors") < layer_of("loss")  # errors -> loss is upward
    (pkg / "loss" / "api.py").write_text("def f():\n    from .gone import value\n")
    assert [d for _, _, lines in _imports(pkg) for d in lines] == ["loss.api:2 -> loss.gone"]


def test_every_import_names_a_module():
    """`from .data import Rollout` where `data.py` is gone fails only when that line runs (lazy)."""
    dangling = [line for _, _, lines in _imports(ROOT) for line in lines]
    assert not dangling, "imports of package modules that do not exist:\n" + "\n".join(dangling)


def test_no_module_imports_its_own_package_init():
    """A module takes a sibling from the sibling's module, not from the `__init__` re-exporting it."""
    graph = import_graph()
    own = sorted(f"{_name(a)} -> {_name(b)}" for a, targets in graph.items() for b in targets
                 if a and (b == "" or a.startswith(b + ".")))
    assert not own, "modules importing their own package's __init__:\n" + "\n".join(own)


def test_no_import_cycles():
    graph = import_graph()
    cycles = find_cycles(graph)
    lines = []
    for component in cycles:
        members = set(component)
        edges = sorted(f"{a} -> {b}" for a in component for b in graph[a] if b in members)
        lines.append(f"cycle of {len(component)} modules: {', '.join(map(_name, component))}\n    "
                     + "\n    ".join(edges))
    assert not cycles, "import cycles (each edge within the cycle listed):\n" + "\n".join(lines)


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in import_graph() if m and layer_of(m) is None)
    assert not unplaced, f"modules in no layer (add their package to LAYERS): {unplaced}"


def test_no_upward_imports():
    graph = import_graph()
    upward = []
    for a in sorted(graph):
        if not a:
            continue  # the package's own __init__
        for b in sorted(graph[a]):
            la, lb = layer_of(a), layer_of(b)
            if la is not None and lb is not None and lb > la:
                upward.append(f"{_name(a)} -> {_name(b)}  ({_describe(la)} imports {_describe(lb)})")
    assert not upward, f"{len(upward)} upward imports (layers in LAYERS, lowest first):\n" + "\n".join(upward)


def _lines(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def test_module_sizes():
    big = sorted((m, n) for m, p in module_files().items() if (n := _lines(p)) > MAX_MODULE_LINES)
    assert not big, (f"modules over {MAX_MODULE_LINES} lines:\n"
                     + "\n".join(f"{_name(m)}: {n} lines" for m, n in big))


def test_entry_point_sizes():
    files = module_files()
    missing = [m for m in ENTRY_POINTS if m not in files]
    assert not missing, f"entry points listed in ENTRY_POINTS but not found: {missing}"
    big = [(m, n) for m in ENTRY_POINTS if (n := _lines(files[m])) > MAX_ENTRY_POINT_LINES]
    assert not big, (f"entry points over {MAX_ENTRY_POINT_LINES} lines:\n"
                     + "\n".join(f"{m}: {n} lines" for m, n in big))
