"""The layout mirrors the workflow (issue 19): every stage in the module named after it, no
import cycles anywhere in the package, stages never import each other, layers point down."""

from __future__ import annotations

import ast
from pathlib import Path

import cellmill
from cellmill.engine.registry import ORDER, _imports, load_stages

PACKAGE = Path(cellmill.__file__).resolve().parent

# stage -> the module (or folder) named after it in `cellmill run` output
HOME = {"ingest": "cellmill.stages.ingest", "qc": "cellmill.stages.ingest",
        "normalize": "cellmill.stages.preprocess", "hvg": "cellmill.stages.preprocess",
        "pca": "cellmill.stages.pca", "neighbors": "cellmill.stages.neighbors",
        "cluster": "cellmill.stages.clustering", "umap": "cellmill.stages.umap",
        "statistics": "cellmill.stages.statistics", "markers": "cellmill.stages.markers",
        "gsea": "cellmill.stages.gsea", "report": "cellmill.report"}


def _modules() -> dict[str, Path]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        parts = p.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the cellmill modules it imports, at the top or inside a function (the same
    reading of the source that code digests use)."""
    mods = _modules()
    return {name: {m for m in _imports(name) if m in mods and m != name} for name in mods}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_cycles():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(g) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_every_stage_lives_in_the_module_named_after_it():
    stages = load_stages()
    assert list(stages) == ORDER or sorted(stages) == sorted(ORDER)
    for name, st in stages.items():
        mod = st.func.__module__
        assert mod == HOME[name] or mod.startswith(HOME[name] + "."), (name, mod)


def _family(module: str) -> str | None:
    """The stage family of a module under cellmill.stages (None for shared methods)."""
    parts = module.split(".")
    if parts[:2] != ["cellmill", "stages"] or len(parts) < 3 or parts[2] == "shared":
        return None
    return parts[2]


def test_stages_never_import_each_other_and_layers_point_down():
    graph = import_graph()
    # lower layers never import higher ones: kernels < io < engine/stages < report < cli
    rank = {"kernels": 0, "io": 1, "engine": 2, "stages": 2, "report": 3}
    for mod, deps in graph.items():
        fam = _family(mod)
        for dep in deps:
            other = _family(dep)
            assert fam is None or other is None or other == fam, f"{mod} imports {dep}"
            if mod.startswith("cellmill.stages.shared"):
                assert other is None, f"shared method {mod} imports the stage {dep}"
            top, dtop = (mod.split(".") + [""])[1], (dep.split(".") + [""])[1]  # "cellmill"
            if top in rank and dtop in rank and top in ("kernels", "io"):
                assert rank[dtop] <= rank[top], f"{mod} imports {dep}"
            if top == "engine" and mod != "cellmill.engine.workflow":  # the driver runs all
                assert dtop not in ("stages", "report"), f"runtime {mod} imports {dep}"


def test_every_module_says_what_it_is_for():
    for name, path in _modules().items():
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and len(doc) > 20, f"{name} has no docstring"
