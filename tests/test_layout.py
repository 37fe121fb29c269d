"""The package's layout rules, checked on the source: one-way layers, no import cycles, short modules and
functions, dvc.yaml's code deps generated from the import graph.

Layers (README "Layout"): the library modules (everything outside `stages/`, `commands/` and `cli.py`) use
neither click nor MLflow; `stages/<stage>.py` is the one module per dvc.yaml stage; `commands/` holds the other
commands; `cli.py` only assembles. Every stage depends, in dvc.yaml, on exactly the modules its stage module
imports (directly or not), so a code change re-runs exactly the stages that run that code. Those lines are
generated from the import graph (`python tests/test_layout.py --write-dvc-deps`); a test fails when they are
stale. `pytest tests/test_layout.py -s` prints the layers and the longest module and function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "src" / "stablesdg"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60
# Over the limits today, each to be split (the list may only shrink; a new entry fails the test).
LONG_MODULES: set[str] = set()
LONG_FUNCTIONS: set[str] = set()
# The library modules that wrap MLflow for the stages and commands (runs, the registry, the shared registry
# server it starts and the champion guard its basic-auth app loads): no click either.
MLFLOW_HOMES = ("tracking", "registry", "registry_auth", "registry_server")
CODE_DEPS_MARK = "# the code it runs: every module `stablesdg.stages."
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


def layer(module: str) -> str:
    if module in ("stablesdg.cli", "stablesdg.__main__"):
        return "cli"
    if module.split(".")[:2] in (["stablesdg", "stages"], ["stablesdg", "commands"]):
        return module.split(".")[1]
    return "library"


def library_modules() -> list[str]:
    return [m for m in all_modules() if layer(m) == "library"]


LAYER_ORDER = ("library", "stages", "commands", "cli")  # each layer imports only from the ones before it


def test_layers_point_one_way(capsys):
    graph = {m: package_imports(m, top_level_only=True) for m in all_modules()}
    for module, imported in graph.items():
        for target in imported:
            if layer(target) == "stages" and layer(module) == "stages":
                continue
            assert LAYER_ORDER.index(layer(target)) <= LAYER_ORDER.index(layer(module)), \
                f"{module} ({layer(module)}) imports {target} ({layer(target)})"
    with capsys.disabled():
        print()
        for name in LAYER_ORDER:
            members = sorted(m.removeprefix("stablesdg.") for m in graph if layer(m) == name)
            print(f"  {name} ({len(members)}): {', '.join(members)}")


def test_library_modules_use_neither_click_nor_mlflow():
    assert "stablesdg.classifier" in library_modules() and "stablesdg.pretraining.prior" in library_modules()
    for module in library_modules():
        name = module.removeprefix("stablesdg.")
        tree = ast.parse(module_file(module).read_text())
        skip = _type_checking_nodes(tree)
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if id(node) not in skip
                    for alias in getattr(node, "names", []) if isinstance(node, ast.Import)}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and not node.level and node.module and id(node) not in skip}
        banned = {"click"} if name in MLFLOW_HOMES else {"click", "mlflow"}
        assert not imported & banned, f"{name}.py imports {imported & banned}"
        assert not any(package_imports(module) & {f"stablesdg.{m}" for m in ("cli", "stages")}), name
        assert not any(m.startswith(("stablesdg.stages", "stablesdg.commands"))
                       for m in package_imports(module)), f"{name}.py imports a stage or command"


def _functions(tree: ast.AST, prefix: str = "") -> list[tuple[str, int]]:
    """(qualified name, lines) of every function and method, nested ones included."""
    out = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            out.append((prefix + node.name, node.end_lineno - start + 1))
            out += _functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            out += _functions(node, f"{prefix}{node.name}.")
    return out


def test_modules_and_functions_are_short(capsys):
    sizes = {m: len(module_file(m).read_text().splitlines()) for m in all_modules()}
    functions = {f"{m}:{name}": n for m in all_modules()
                 for name, n in _functions(ast.parse(module_file(m).read_text()))}
    longest_module = max(sizes, key=sizes.__getitem__)
    longest_function = max(functions, key=functions.__getitem__)
    with capsys.disabled():
        print(f"\n  {len(sizes)} modules, longest {longest_module} ({sizes[longest_module]} lines, limit "
              f"{MAX_MODULE_LINES}); {len(functions)} functions, longest {longest_function} "
              f"({functions[longest_function]} lines, limit {MAX_FUNCTION_LINES})")
    long_modules = {m for m, n in sizes.items() if n > MAX_MODULE_LINES}
    long_functions = {f for f, n in functions.items() if n > MAX_FUNCTION_LINES}
    assert long_modules <= LONG_MODULES, f"modules over {MAX_MODULE_LINES} lines: {sorted(long_modules - LONG_MODULES)}"
    assert long_functions <= LONG_FUNCTIONS, \
        f"functions over {MAX_FUNCTION_LINES} lines: {sorted((f, functions[f]) for f in long_functions - LONG_FUNCTIONS)}"
    assert long_modules >= LONG_MODULES and long_functions >= LONG_FUNCTIONS, "split: drop it from the allow-list"


def test_no_import_cycles_and_no_package_imports_inside_functions(capsys):
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
    with capsys.disabled():
        print(f"\n  {len(graph)} modules, {sum(map(len, graph.values()))} imports, 0 import cycles")


def stage_code(stage_module: str) -> list[str]:
    """The files a stage's command runs: every module its stage module imports, directly or not, and cli.py."""
    code = {str(module_file(m).relative_to(REPO)) for m in closure(f"stablesdg.stages.{stage_module}")}
    return sorted(code | {"src/stablesdg/cli.py"})  # the `stablesdg` entry point every stage command goes through


def generated_dvc_yaml(text: str) -> str:
    """dvc.yaml with each stage's code lines (after its CODE_DEPS_MARK comment) regenerated from the imports."""
    lines, out, i = text.splitlines(keepends=True), [], 0
    while i < len(lines):
        out.append(lines[i])
        if CODE_DEPS_MARK in lines[i]:
            stage = lines[i].split(CODE_DEPS_MARK)[1].split("`")[0]
            indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
            i += 1
            while i < len(lines) and lines[i].strip().startswith("- src/stablesdg/") and \
                    lines[i].split()[1].endswith(".py"):
                i += 1
            out += [f"{indent}- {path}\n" for path in stage_code(stage)]
            continue
        i += 1
    return "".join(out)


def test_dvc_yaml_code_deps_are_generated_and_current():
    text = (REPO / "dvc.yaml").read_text()
    assert text.count(CODE_DEPS_MARK) == len(STAGE_MODULES)
    assert generated_dvc_yaml(text) == text, "stale code deps: run `python tests/test_layout.py --write-dvc-deps`"


def stage_deps(stage: dict) -> tuple[str, list[str]]:
    body = stage.get("do", stage)
    return body["cmd"], body.get("deps", [])


@pytest.mark.parametrize("stage", sorted(STAGE_MODULES))
def test_every_stage_depends_on_all_the_code_it_runs(stage):
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert set(stages) == set(STAGE_MODULES), "one module per dvc.yaml stage in stablesdg/stages/"
    cmd, deps = stage_deps(stages[stage])
    code = set(stage_code(STAGE_MODULES[stage]))
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


# The stage and command modules whose tests still live in the flat tests/ files (to move; the set may only shrink).
UNMIRRORED: set[str] = set()


def test_stage_and_command_tests_mirror_the_source_tree():
    """tests/stages/test_<m>.py and tests/commands/test_<m>.py: one file per module, each importing its module."""
    missing, stale = set(), set()
    for folder in ("stages", "commands"):
        for module in sorted((PKG / folder).glob("*.py")):
            if module.name == "__init__.py":
                continue
            name = f"{folder}.{module.stem}"
            test = REPO / "tests" / folder / f"test_{module.stem}.py"
            imports_it = test.exists() and f"stablesdg.{name}" in test.read_text()
            if not imports_it and name not in UNMIRRORED:
                missing.add(name)
            if imports_it and name in UNMIRRORED:
                stale.add(name)
    assert not missing, f"no tests/<folder>/test_<module>.py that imports stablesdg.<module>: {sorted(missing)}"
    assert not stale, f"mirrored now: remove from UNMIRRORED {sorted(stale)}"


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--write-dvc-deps"]:
        sys.exit("usage: python tests/test_layout.py --write-dvc-deps")
    path = REPO / "dvc.yaml"
    path.write_text(generated_dvc_yaml(path.read_text()))
    print(f"{path}: code deps regenerated from the import graph")
