"""The import structure of ``dataopt/``: no cycle, no upward import, a light schema.

The layers, bottom up (a module may import from its own layer or below, never above):

    leaves        errors; registry (imports only errors); image_kernels (torch only); interrupt
    schema layer  config, paths, io, schema, artifacts: only leaves and each other (no torch)
    families      ingest, embed, perceive, analyze, drift, optimize, train, evaluate
    plugins       imports every family: fills the registries, checks method names in Params
    stages        one module per stage
    cli           the command; the only module that reaches tasks/ and flows/ (inside commands)

Nothing in ``dataopt/`` imports prefect, dvc or mlflow. An import inside a function is allowed only
for a heavy optional dependency, and says why on its line (``# why: ...``).
"""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dataopt"

LEAVES = ("dataopt.errors", "dataopt.registry", "dataopt.image_kernels", "dataopt.interrupt")
SCHEMA_LAYER = ("dataopt.config", "dataopt.paths", "dataopt.io", "dataopt.schema", "dataopt.artifacts", "dataopt.profiles",
                "dataopt.lock", "dataopt.batches")
FAMILIES = ("dataopt.ingest", "dataopt.embed", "dataopt.perceive", "dataopt.analyze", "dataopt.drift",
            "dataopt.optimize", "dataopt.train", "dataopt.evaluate", "dataopt.demo")
ORCHESTRATION = ("prefect", "prefect_dask", "dvc", "mlflow")
CLI = ("dataopt.cli", "dataopt.cli_data", "dataopt.cli_service", "dataopt.cli_models")  # the command; batch / drift, server / serve, models

# layer: who (a module, or a package and everything in it) | what of dataopt it may import (None:
# anything the last column does not forbid) | what it never imports (at any level, even in a function)
RULES = [
    ("leaf",         ("dataopt.errors",),        (),                     ()),
    ("leaf",         ("dataopt.registry",),      ("dataopt.errors",),    ()),
    ("leaf",         ("dataopt.image_kernels",), (),                     ()),
    ("leaf",         ("dataopt.interrupt",),     (),                     ()),
    ("schema layer", SCHEMA_LAYER,               LEAVES + SCHEMA_LAYER,  ()),
    ("family",       FAMILIES,                   None,                   ("dataopt.plugins", "dataopt.stages",
                                                                          *CLI)),
    ("plugins",      ("dataopt.plugins",),       None,                   ("dataopt.stages", *CLI)),
    ("stage",        ("dataopt.stages",),        None,                   CLI),
    ("library",      ("dataopt",),               None,                   ORCHESTRATION),
]
# tasks/ and flows/ wrap the library (Prefect, MLflow); only the command reaches up to them
ONLY_CLI_IMPORTS = ("tasks", "flows")
# what `import dataopt.config` must not load (it is what validating params.yaml costs)
NOT_IN_CONFIG = ("torch", "faiss", "open_clip", "numpy", "pandas", "sklearn", "scipy", "torchvision",
                 "matplotlib") + FAMILIES


def within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = modules()


def _targets(module: str, node: ast.AST, is_package: bool) -> list[str]:
    """The modules an import statement names (``from p import m`` names ``p.m`` when that is a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        pkg = module.split(".") if is_package else module.split(".")[:-1]
        pkg = pkg[: len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([base] if base else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def imports(module: str) -> tuple[list[tuple[str, int]], list[tuple[str, int, str]]]:
    """``(module-level imports, imports inside functions)`` of ``module`` as (target, line[, text])."""
    path = MODULES[module]
    source = path.read_text()
    lines = source.splitlines()
    top, inner = [], []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for t in _targets(module, child, path.name == "__init__.py"):
                    if in_function:
                        inner.append((t, child.lineno, lines[child.lineno - 1]))
                    else:
                        top.append((t, child.lineno))
            else:
                visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                               ast.Lambda)))

    visit(ast.parse(source), False)
    return top, inner


def graph(in_functions: bool = False) -> dict[str, set[str]]:
    """Imports between modules of dataopt/ (an import of ``a.b.c`` counts as ``a.b.c``): module-level
    ones, plus those inside functions when ``in_functions``."""
    g = {}
    for m in MODULES:
        top, inner = imports(m)
        edges = set()
        for t, *_ in top + (inner if in_functions else []):
            parts = t.split(".")
            while parts and ".".join(parts) not in MODULES:
                parts.pop()
            if parts and ".".join(parts) != m:
                edges.add(".".join(parts))
        g[m] = edges
    return g


def find_cycle(g: dict[str, set[str]]) -> list[str]:
    """One cycle of ``g`` as ``[a, b, ..., a]``, or ``[]``."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def dfs(v: str) -> list[str]:
        state[v] = 1
        path.append(v)
        for w in sorted(g[v]):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state and (cycle := dfs(w)):
                return cycle
        path.pop()
        state[v] = 2
        return []

    for v in sorted(g):
        if v not in state and (cycle := dfs(v)):
            return cycle
    return []


def test_find_cycle_reports_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert not cycle, "import cycle: " + " -> ".join(cycle)
    cycle = find_cycle(graph(in_functions=True))  # a circle hidden in a function is a circle too
    assert not cycle, "import cycle through an import inside a function: " + " -> ".join(cycle)


def test_layering_rules():
    bad = []
    for m in MODULES:
        top, inner = imports(m)
        for layer, who, may, never in RULES:
            if not within(m, who):
                continue
            for t, line, *_ in top + inner:
                where = f"{MODULES[m].relative_to(ROOT)}:{line}: {m} imports {t}"
                if within(t, never):
                    bad.append(f"{where} (a {layer} module never imports {', '.join(never)})")
                elif may is not None and within(t, ("dataopt",)) and not within(t, may) and t != m:
                    bad.append(f"{where} (a {layer} module imports only {', '.join(may) or 'nothing of dataopt'})")
        for t, line, *_ in top + inner:
            if within(t, ONLY_CLI_IMPORTS) and m not in CLI:
                bad.append(f"{MODULES[m].relative_to(ROOT)}:{line}: {m} imports {t} (only dataopt.cli may)")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_plugins_imports_every_module_that_registers_a_method():
    """A module with ``@<REGISTRY>.register(...)`` is listed in dataopt/plugins.py, so that
    ``check_methods`` and the stages see its methods."""
    registering = {m for m, path in MODULES.items() if m != "dataopt.registry"
                   and re.search(r"^@[A-Z_]+\.register\(", path.read_text(), re.M)}
    assert len(registering) > 10
    missing = sorted(registering - graph()["dataopt.plugins"])
    assert not missing, f"dataopt/plugins.py does not import {missing}"


def test_imports_inside_functions_are_heavy_optional_ones_and_say_why():
    bad = []
    for m in MODULES:
        for t, line, text in imports(m)[1]:
            where = f"{MODULES[m].relative_to(ROOT)}:{line}: {text.strip()}"
            if "# why" not in text:
                bad.append(f"{where} (no '# why' comment)")
            # the command imports the heavy parts of dataopt (plug-ins, the pipeline) only when it runs
            if within(t, ("dataopt",)) and m not in CLI:
                bad.append(f"{where} (dataopt is imported at the top of the module)")
    assert not bad, "imports inside functions:\n" + "\n".join(bad)


def _python(code: str, timeout: int = 120) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_config_imports_no_torch_and_no_family():
    out = _python("import sys, json, dataopt.config; print(json.dumps(sorted(sys.modules)))")
    loaded = [m for m in json.loads(out) if within(m, NOT_IN_CONFIG)]
    assert not loaded, f"import dataopt.config loads {loaded[:10]}"


def test_the_registry_loads_no_torchvision():
    # torchvision's import loads torch._dynamo: 1.5 s on every `dataopt` command and stage process
    out = _python("import sys, dataopt.plugins, dataopt.cli; print('torchvision' in sys.modules)")
    assert out.strip() == "False"


# Each module imported alone: one child process per module, forked from a parent that has imported
# the heavy third-party libraries but nothing of dataopt (fork: the children start in milliseconds).
ALONE = r"""
import importlib, json, os, sys, traceback
for lib in ("numpy", "pandas", "pyarrow.parquet", "scipy.special", "sklearn.model_selection", "torch",
            "torchvision.transforms.v2", "faiss", "pydantic", "yaml"):
    importlib.import_module(lib)
assert not [m for m in sys.modules if m.split(".")[0] == "dataopt"]
results = {}
for name in json.loads(sys.argv[1]):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            importlib.import_module(name)
            out = {"ok": True, "orchestration": sorted(
                m for m in sys.modules if m.split(".")[0] in ("prefect", "prefect_dask", "dvc", "mlflow"))}
        except BaseException:
            out = {"ok": False, "error": traceback.format_exc(limit=-3)}
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    results[name] = json.loads(data)
print(json.dumps(results))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_every_module_imports_alone():
    proc = subprocess.run([sys.executable, "-c", ALONE, json.dumps(sorted(MODULES))], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    failed = {m: r["error"] for m, r in results.items() if not r["ok"]}
    assert not failed, "modules that fail to import alone:\n" + "\n".join(f"{m}:\n{e}" for m, e in failed.items())
    orchestration = {m: r["orchestration"] for m, r in results.items() if r["orchestration"]}
    assert not orchestration, f"importing these loads prefect/dvc/mlflow: {orchestration}"
