"""The package's layout rules, checked on the source: one-way layers, no import cycles, complete dvc.yaml deps.

Layers (README "Layout"): the library modules use neither click nor MLflow; `stages/<stage>.py` is the one
module per dvc.yaml stage; `cli.py` only assembles. Every stage depends, in dvc.yaml, on every module its stage
module imports (directly or not), so a code change re-runs exactly the stages that run that code.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "src" / "stablesdg"
LIBRARY = ("adaptation", "basemodels", "card", "classifier", "config", "data", "demo", "diffusion", "errors", "evaluation",
           "export", "generation", "metrics", "preflight", "preprocess", "provenance", "search", "utils", "viz")
STAGE_MODULES = {"demo": "demo", "ingest": "ingest", "check-base": "check_base", "adapt": "adapt", "features": "features", "search": "search",
                 "generate": "generate", "evaluate": "evaluate", "train": "train", "export": "export"}


def module_file(name: str) -> Path:
    path = PKG.parent.joinpath(*name.split("."))
    return path / "__init__.py" if (path / "__init__.py").exists() else path.with_suffix(".py")


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes inside `if TYPE_CHECKING:` blocks (annotations only: no import at run time)."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            inside |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return inside


def _module_level(statements: list[ast.stmt]) -> list[ast.stmt]:
    """Statements run at import: the module body and what module-level try/if blocks hold (not functions)."""
    out: list[ast.stmt] = []
    for stmt in statements:
        out.append(stmt)
        if isinstance(stmt, ast.Try):
            nested = stmt.body + [s for h in stmt.handlers for s in h.body] + stmt.orelse + stmt.finalbody
            out += _module_level(nested)
        elif isinstance(stmt, ast.If):
            out += _module_level(stmt.body + stmt.orelse)
    return out


def package_imports(name: str, top_level_only: bool = False) -> set[str]:
    """The stablesdg modules `name` imports at run time (relative imports; TYPE_CHECKING blocks left out)."""
    file = module_file(name)
    tree = ast.parse(file.read_text())
    skip = _type_checking_nodes(tree)
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    nodes = _module_level(tree.body) if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if not isinstance(node, ast.ImportFrom) or not node.level or id(node) in skip:
            continue
        base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
        if node.module and module_file(target).exists():
            found.add(target)
        found |= {f"{target}.{a.name}" for a in node.names if module_file(f"{target}.{a.name}").exists()}
    return found


def closure(name: str) -> set[str]:
    seen, todo = set(), [name]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            parts = current.split(".")
            todo += [*package_imports(current), *(".".join(parts[:i]) for i in range(1, len(parts)))]
    return seen


def all_modules() -> list[str]:
    return sorted("stablesdg." + ".".join(p.relative_to(PKG).with_suffix("").parts).removesuffix(".__init__")
                  for p in PKG.rglob("*.py"))


def test_library_modules_use_neither_click_nor_mlflow():
    for name in LIBRARY:
        tree = ast.parse(module_file(f"stablesdg.{name}").read_text())
        skip = _type_checking_nodes(tree)
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if id(node) not in skip
                    for alias in getattr(node, "names", []) if isinstance(node, ast.Import)}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and not node.level and node.module and id(node) not in skip}
        assert not imported & {"click", "mlflow"}, f"{name}.py imports {imported & {'click', 'mlflow'}}"
        assert not any(package_imports(f"stablesdg.{name}") & {f"stablesdg.{m}" for m in ("cli", "stages")}), name
        assert not any(m.startswith(("stablesdg.stages", "stablesdg.commands"))
                       for m in package_imports(f"stablesdg.{name}")), f"{name}.py imports a stage or command"


def test_no_import_cycles_and_no_package_imports_inside_functions():
    graph = {m: package_imports(m, top_level_only=True) for m in all_modules()}
    for module in graph:
        nested = package_imports(module) - graph[module]
        assert not nested, f"{module} imports {sorted(nested)} inside a function (hides a cycle?)"

    def visit(node: str, path: list[str]) -> None:
        for nxt in graph[node]:
            if nxt in path:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(nxt):], nxt]))
            visit(nxt, [*path, nxt])

    for module in graph:
        visit(module, [module])


def stage_deps(stage: dict) -> tuple[str, list[str]]:
    body = stage.get("do", stage)
    return body["cmd"], body.get("deps", [])


@pytest.mark.parametrize("stage", sorted(STAGE_MODULES))
def test_every_stage_depends_on_all_the_code_it_runs(stage):
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert set(stages) == set(STAGE_MODULES), "one module per dvc.yaml stage in stablesdg/stages/"
    cmd, deps = stage_deps(stages[stage])
    code = {str(module_file(m).relative_to(REPO)) for m in closure(f"stablesdg.stages.{STAGE_MODULES[stage]}")}
    code.add("src/stablesdg/cli.py")  # the `stablesdg` entry point every stage command goes through
    assert code <= set(deps), f"{stage}: dvc.yaml deps miss {sorted(code - set(deps))}"
    listed = {d for d in deps if d.endswith(".py")}
    assert listed <= code, f"{stage}: dvc.yaml lists modules it does not run: {sorted(listed - code)}"
    body = stages[stage].get("do", stages[stage])
    outputs = [next(iter(o)) if isinstance(o, dict) else o
               for key in ("outs", "metrics", "plots") for o in body.get(key, [])]
    tokens = set(cmd.split())
    for out in outputs:  # the cmd names every output, or the folder it is written into
        parents = [out, *(str(p) for p in Path(out).parents)]
        assert tokens & set(parents), f"{stage}: cmd `{cmd}` does not name where {out} is written"


def test_stages_that_load_the_shipped_networks_depend_on_them():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name in ("adapt", "search", "generate"):
        assert "src/stablesdg/assets/prior" in [d.split()[0] for d in stage_deps(stages[name])[1]], name
    for name in ("features", "search", "evaluate"):
        assert "src/stablesdg/assets/feature_net" in stage_deps(stages[name])[1], name


def test_scripts_import_only_names_the_package_has():
    """benchmarks/ and experiments/ import from the package inside functions too (heavy imports on demand): a
    renamed function must fail here, not an hour into a benchmark run."""
    import importlib

    missing = []
    for script in sorted([*(REPO / "benchmarks").glob("*.py"), *(REPO / "experiments").glob("*.py")]):
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "stablesdg":
                module = importlib.import_module(node.module)
                missing += [f"{script.name}: {node.module}.{a.name}" for a in node.names
                            if not hasattr(module, a.name) and not (
                                hasattr(module, "__path__") and importlib.util.find_spec(f"{node.module}.{a.name}"))]
    assert not missing
