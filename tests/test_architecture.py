"""The package's layers point down only, and no module imports itself back through another (STYLE.md)."""

from __future__ import annotations

import ast
import pathlib

import imgcurate

ROOT = pathlib.Path(imgcurate.__file__).parent

#: module prefix -> layer; a module may import its own layer or lower ones.
LAYERS = [
    (0, ("imgcurate.errors", "imgcurate.config", "imgcurate.config_check", "imgcurate.device", "imgcurate._models",
         "imgcurate.progress", "imgcurate.io._fs", "imgcurate.cpu")),
    (1, ("imgcurate.backends", "imgcurate._dask")),
    (2, ("imgcurate.io",)),
    (3, ("imgcurate.dataset",)),
    (4, ("imgcurate.steps", "imgcurate.embedders", "imgcurate.classifiers", "imgcurate.dedup", "imgcurate.filters",
         "imgcurate.synthetic", "imgcurate.testing", "imgcurate.text")),
    (5, ("imgcurate.pipeline", "imgcurate.rundir", "imgcurate.report", "imgcurate.reports", "imgcurate.estimate",
         "imgcurate.doctor")),
    (6, ("imgcurate.cli", "imgcurate")),
]  # fmt: skip


def _layer(module: str) -> int:
    best = None
    for layer, prefixes in LAYERS:
        for prefix in prefixes:
            inside = module == prefix or (prefix != "imgcurate" and module.startswith(prefix + "."))
            if inside and (best is None or len(prefix) > best[1]):
                best = (layer, len(prefix))
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best[0]


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = ("imgcurate",) + path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text())
    skip = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")
                parent = parent[: len(parent) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph():
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def test_imports_point_down_the_layers():
    upward = [
        f"{name} (layer {_layer(name)}) imports {dep} (layer {_layer(dep)})"
        for name, deps in _graph().items()
        for dep in deps
        if _layer(dep) > _layer(name) and not name.endswith(dep) and not (name == "imgcurate" or dep == "imgcurate")
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    graph = {k: {d for d in v if d != "imgcurate"} for k, v in _graph().items() if k != "imgcurate"}
    parents = {k for k in graph}
    # a package's __init__ re-exporting its own modules is not a cycle through them
    graph = {k: {d for d in v if not d.startswith(k + ".")} for k, v in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep) :] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(parents):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_only_the_backends_know_pandas_from_cudf():
    offenders = []
    for name, path in _modules().items():
        if name.startswith(("imgcurate.backends", "imgcurate.device", "imgcurate.doctor")):
            continue
        text = path.read_text()
        for needle in (
            "isinstance(part, pd.DataFrame)",
            "isinstance(meta, pd.DataFrame)",
            '"to_pandas")',
            "import cudf",
        ):
            if needle in text:
                offenders.append(f"{name}: {needle}")
    assert not offenders, "\n".join(offenders)
