"""What a clean install needs: every module imports, every import is a declared dependency, and every
command gives help and a usage message (exit 2, no traceback) for a usage mistake."""

import ast
import importlib
import importlib.metadata
import pkgutil
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import ccdrec

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "ccdrec"
COMMANDS = [
    ["data", "info"],
    ["data", "prepare"],
    ["train"],
    ["run"],
    ["recommend"],
    ["compare"],
    ["bench-serve"],
    ["serve"],
]


def _modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(ccdrec.__path__, "ccdrec."))


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> tuple[set[str], set[str]]:
    """(core dependencies, optional extras' dependencies) of pyproject.toml, normalised names."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    name = lambda req: _normal(re.match(r"[A-Za-z0-9_.\-]+", req).group(0))  # noqa: E731
    core = {name(r) for r in project["dependencies"]}
    extras = {name(r) for reqs in project.get("optional-dependencies", {}).values() for r in reqs}
    return core, extras


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(top-level module, imported at module level) for every absolute import in ``path``."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(n.split(".")[0], id(node) in top_level) for n in names]
    return found


@pytest.mark.parametrize("module", _modules())
def test_every_module_imports(module):
    importlib.import_module(module)


def test_every_import_is_a_declared_dependency():
    core, extras = _declared()
    dists = importlib.metadata.packages_distributions()
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        for module, at_top in _imports(path):
            if module == "ccdrec" or module in sys.stdlib_module_names:
                continue
            owners = {_normal(d) for d in dists.get(module, [module])}
            where = path.relative_to(ROOT)
            if owners & core:
                continue
            if owners & extras and not at_top:
                continue  # an optional extra, imported lazily
            problems.append(f"{where}: {module} ({'module level' if at_top else 'lazy'}) is not a declared dependency")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_answers_help_and_usage_mistakes(cmd):
    run = lambda *a: subprocess.run([sys.executable, "-m", "ccdrec", *a], capture_output=True, text=True, timeout=120)  # noqa: E731
    ok = run(*cmd, "--help")
    assert ok.returncode == 0 and "Usage" in ok.stdout, ok.stderr
    bad = run(*cmd, "--definitely-not-an-option")
    assert bad.returncode == 2, bad.stderr
    assert "Traceback" not in bad.stderr and "No such option" in bad.stderr


def test_a_bad_option_value_is_a_usage_error():
    out = subprocess.run(
        [sys.executable, "-m", "ccdrec", "recommend", "run", "--user", "u1", "-k", "abc"], capture_output=True, text=True
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "Invalid value for '-k'" in out.stderr


# --- layers: no import cycle, no lower layer importing a higher one ------------------------------

# Lowest first. A module may import modules of its own rank or below, never above; within a rank,
# modules of different packages may import each other only without forming a cycle.
LAYERS = [
    ("errors", "arguments", "device", "memory", "determinism", "option_values", "filemode"),
    ("config",),
    ("data", "presets"),
    ("models",),
    ("checkpoint",),
    ("eval", "train"),
    ("distill", "continual"),
    ("report",),
    ("pipeline", "serve_bench"),
    ("serve", "service"),
    ("cli", "__main__", "__init__"),
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _internal_imports() -> dict[str, set[str]]:
    """Module -> the ccdrec modules it imports anywhere in its code (function-level imports included)."""
    modules = set(_modules()) | {"ccdrec"}
    graph: dict[str, set[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        tree = ast.parse(path.read_text())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against this module's package
                    package = name.split(".") if parts[-1] == "__init__" else name.split(".")[:-1]
                    base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            found |= {t for t in targets if t in modules and t != name}
        graph[name] = found
    return graph


def _layer(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def test_no_lower_layer_imports_a_higher_one():
    bad = [
        f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
        for m, targets in _internal_imports().items()
        for t in targets
        if RANK[_layer(t)] > RANK[_layer(m)]
    ]
    assert set(RANK) >= {_layer(m) for m in _internal_imports()}, "a new top-level module needs a place in LAYERS"
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycle():
    graph = _internal_imports()
    graph = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}  # a package's own __init__
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)
