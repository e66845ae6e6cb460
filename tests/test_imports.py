"""Import hygiene, read from the source (AST), so that an import inside a function counts too:
no cycle among cmscale's modules, and click only in cmscale/cli/."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "cmscale"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def defined_names(source: str) -> set[str]:
    """Names a module defines itself at top level (functions, classes, assignments; not imports)."""
    names: set[str] = set()
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {target.id for target in targets if isinstance(target, ast.Name)}
    return names


def imported_modules(source: str, name: str, is_package: bool, modules: set[str],
                     definitions: dict[str, set[str]] | None = None) -> set[str]:
    """The cmscale modules that module ``name`` (its ``source``) imports anywhere: top level,
    functions, TYPE_CHECKING blocks. Relative imports are resolved; ``from pkg import name`` counts
    as ``pkg.name`` when that is a module, and otherwise also as the submodule of ``pkg`` that
    defines ``name`` (``definitions``), so a package that re-exports lazily hides no edge."""
    definitions = definitions or {}
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                if f"{base}.{alias.name}" in modules:
                    found.add(f"{base}.{alias.name}")
                    continue
                found.add(base)
                if alias.name not in definitions.get(base, ()):
                    found |= {m for m in modules if m.startswith(base + ".") and alias.name in definitions.get(m, ())}
    return {module for module in found if module in modules and module != name}


def import_graph() -> dict[str, set[str]]:
    sources = {module_name(path): (path.read_text(), path.name == "__init__.py") for path in PACKAGE_DIR.rglob("*.py")}
    definitions = {module: defined_names(source) for module, (source, _) in sources.items()}
    return {module: imported_modules(source, module, is_package, set(sources), definitions)
            for module, (source, is_package) in sources.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that starts and ends at the same module, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_function_level_and_relative_imports_and_the_finder_finds_a_cycle():
    source = ("import os\n\ndef f():\n    from cmscale.train import train\n    from .. import rundir\n"
              "    from . import cache\n")
    modules = {"cmscale.train", "cmscale.rundir", "cmscale.eval.cache", "cmscale.eval.fake"}
    assert imported_modules(source, "cmscale.eval.fake", False, modules) == {
        "cmscale.train", "cmscale.rundir", "cmscale.eval.cache"}
    lazy = "from cmscale.eval import evaluate_model\n"  # cmscale.eval re-exports it without importing
    definitions = {"cmscale.eval": set(), "cmscale.eval.run": {"evaluate_model"}}
    assert imported_modules(lazy, "cmscale.train", False, set(definitions), definitions) == {
        "cmscale.eval", "cmscale.eval.run"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_cmscale_has_no_import_cycle():
    graph = import_graph()
    assert "cmscale.cli.main" in graph and "cmscale.train" in graph["cmscale.tune.worker"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_eval_never_imports_train_and_cluster_never_imports_sweep_or_tune():
    graph = import_graph()
    for module, targets in graph.items():
        if module.startswith("cmscale.eval"):
            assert "cmscale.train" not in targets, module
        if module.startswith("cmscale.cluster"):
            assert not any(t.startswith(("cmscale.sweep", "cmscale.tune", "cmscale.cli")) for t in targets), module


def test_only_the_cli_package_imports_click():
    offenders = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        if path.is_relative_to(PACKAGE_DIR / "cli"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(name == "click" or name.startswith("click.") for name in names):
                offenders.append(f"{path.relative_to(PACKAGE_DIR.parent)}:{node.lineno}")
    assert offenders == [], f"click imported outside cmscale/cli/: {offenders}"


# Lower layers never import higher ones, so a sweep can be followed from the command down through
# sweep/, cluster/, train.py and rundir.py, and its results from results/ to analysis/, without an
# arrow pointing back. Entry points (``__main__``) sit above everything.
LAYERS = [
    ("cmscale", "cmscale.rundir", "cmscale.safe_pickle"),
    ("cmscale.models", "cmscale.data", "cmscale.distributed", "cmscale.teacher", "cmscale.checkpoint"),
    ("cmscale.config",),
    ("cmscale.methods",),
    ("cmscale.sampling",),
    ("cmscale.accounting",),
    ("cmscale.eval",),
    ("cmscale.schedule", "cmscale.resume", "cmscale.stopping", "cmscale.progress"),
    ("cmscale.train",),
    ("cmscale.cluster",),
    ("cmscale.sweep", "cmscale.tune"),
    ("cmscale.results",),
    ("cmscale.analysis",),
    ("cmscale.demo",),
    ("cmscale.cli",),
]


def layer_of(module: str) -> int:
    matches = [index for index, prefixes in enumerate(LAYERS)
               for prefix in prefixes if module == prefix or (prefix != "cmscale" and module.startswith(prefix + "."))]
    assert matches, f"{module} is in no layer; add it to LAYERS"
    return max(matches)


def test_imports_only_point_down_the_layers():
    upward = [f"{module} -> {target}" for module, targets in import_graph().items() if not module.endswith("__main__")
              for target in targets if layer_of(target) > layer_of(module)]
    assert upward == [], "imports pointing up the layers: " + ", ".join(sorted(upward))


# The command line parses options, calls cmscale.analysis and prints: the fitting itself (laws,
# bootstraps, law selection, the frontier, iso-FLOP optima, the extrapolation check, the ratio)
# happens only behind cmscale.analysis.pipeline, report and tables, so every command gives the
# same answer to the same question.
FITTER_MODULES = ("fit", "frontier", "optimal", "selection", "extrapolation", "ratio")


def fitter_functions() -> set[str]:
    """The functions defined at top level in the fitter modules of cmscale/analysis/."""
    names: set[str] = set()
    for module in FITTER_MODULES:
        tree = ast.parse((PACKAGE_DIR / "analysis" / f"{module}.py").read_text())
        names |= {node.name for node in tree.body
                  if isinstance(node, ast.FunctionDef) and not node.name.startswith("_")}
    return names


def fitter_calls(source: str, fitters: set[str]) -> list[str]:
    """``function: fitter`` for every function of ``source`` that calls a fitter (by name or as an
    attribute) or imports a fitter module."""
    modules = {f"cmscale.analysis.{m}" for m in FITTER_MODULES}
    found = []
    for function in ast.walk(ast.parse(source)):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                if name in fitters:
                    found.append(f"{function.name}: {name}")
            elif isinstance(node, ast.ImportFrom) and (node.module in modules or (
                    node.module == "cmscale.analysis" and {a.name for a in node.names} & set(FITTER_MODULES))):
                found.append(f"{function.name}: imports {node.module}")
    return found


def test_the_checker_finds_a_cli_function_that_fits_by_itself():
    fitters = fitter_functions()
    assert {"fit_with_bootstrap", "select_law", "compute_optimal", "frontier_law", "holdout_validation",
            "ratio_table", "envelope"} <= fitters
    source = ("def ok(root):\n    return sweep_power_laws(root)\n"
              "def bad(x, y):\n    from cmscale.analysis.fit import fit_with_bootstrap\n"
              "    return fit_with_bootstrap('pure', [x], y)\n"
              "def worse(points):\n    import cmscale.analysis.frontier as F\n    return F.compute_optimal(points)\n")
    assert fitter_calls(source, fitters) == [
        "bad: imports cmscale.analysis.fit", "bad: fit_with_bootstrap", "worse: compute_optimal"]


def test_the_cli_defines_no_analysis_function():
    fitters = fitter_functions()
    offenders = [f"{path.relative_to(PACKAGE_DIR.parent)}: {call}"
                 for path in sorted((PACKAGE_DIR / "cli").glob("*.py"))
                 for call in fitter_calls(path.read_text(), fitters)]
    assert offenders == [], f"the CLI fits by itself (call cmscale.analysis.pipeline/report/tables): {offenders}"
