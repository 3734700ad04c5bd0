"""The code's structure: the import graph of ctx/ is one-way (no module imports one that imports
it back), ctx modules are imported at the top of a file (only heavy optional ones may wait for
first use), and the lint and the format configured in ruff.toml pass."""

import ast
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

# ctx modules whose own imports are heavy and needed only on some paths.
LAZY_ALLOWED = {"ctx.data.pg19": "TFDS, only for PG-19", "ctx.plots": "matplotlib, only for plots"}


def _modules() -> dict[str, str]:
    found = {}
    for folder, _, files in os.walk(os.path.join(ROOT, "ctx")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                found[module.removesuffix(".__init__")] = path
    return found


def _imports(path: str, modules: dict[str, str]) -> list[tuple[str, int, bool]]:
    """(imported ctx module, line, inside a function) for every import in the file; packages'
    __init__ files are not nodes (importing ctx.x runs ctx/__init__ either way)."""
    packages = {m for m, p in modules.items() if p.endswith("__init__.py")}
    tree = ast.parse(open(path).read())
    nested = {
        id(n)
        for f in ast.walk(tree)
        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
        for n in ast.walk(f)
    }
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            if name in modules and name not in packages:
                found.append((name, node.lineno, id(node) in nested))
    return found


def test_the_import_graph_has_no_cycle():
    modules = _modules()
    graph = {
        m: {name for name, _, _ in _imports(p, modules) if name != m} for m, p in modules.items()
    }
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles
    assert (
        "ctx.train" in graph["ctx.bench"] or "ctx.trainer" in graph["ctx.bench"]
    )  # the graph was read


def test_ctx_modules_are_imported_at_the_top_except_heavy_optional_ones():
    modules = _modules()
    late = [
        f"{os.path.relpath(p, ROOT)}:{line} imports {name}"
        for m, p in modules.items()
        for name, line, inside in _imports(p, modules)
        if inside and name not in LAZY_ALLOWED
    ]
    assert not late, late


def test_the_lint_passes_and_the_code_is_formatted():
    """ruff.toml's lint, and `ruff format` at 100 columns (run `ruff format ctx experiments
    tests` to fix the second)."""
    ruff = os.path.join(os.path.dirname(sys.executable), "ruff")
    for command in (["check", "--output-format", "concise"], ["format", "--check"]):
        out = subprocess.run(
            [ruff, *command, "ctx", "experiments", "tests"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert out.returncode == 0, out.stdout


# What the pure network may import from ctx, and the I/O libraries it must not load.
NN_MAY_IMPORT = ("ctx.nn", "ctx.config", "ctx.errors")
NN_MUST_NOT_LOAD = ("orbax", "optax", "tensorflow_datasets", "tensorboardX", "grain")


def test_the_network_imports_only_itself_the_config_and_the_errors():
    modules = _modules()
    outside = [
        f"{os.path.relpath(p, ROOT)}:{line} imports {name}"
        for m, p in modules.items()
        if m.startswith("ctx.nn")
        for name, line, _ in _imports(p, modules)
        if not name.startswith(NN_MAY_IMPORT)
    ]
    assert not outside, outside
    assert any(m.startswith("ctx.nn.") for m in modules)  # the package was read


def test_importing_the_network_loads_no_io_library():
    program = (
        "import sys, ctx, ctx.nn.transformer, ctx.nn.pallas_tpu; "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(NN_MUST_NOT_LOAD)!r}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize(
    "module, must_not_load",
    [
        ("ctx.data.tokenizer", ("orbax", "ctx.cli", "ctx.checkpoint", "ctx.train", "ctx.trainer")),
        ("ctx.data.datasets", ("orbax", "ctx.cli", "ctx.checkpoint", "ctx.train", "ctx.trainer")),
        ("ctx.evaluate", ("ctx.train", "ctx.trainer", "ctx.run_guard")),
        ("ctx.sample", ("ctx.train", "ctx.trainer", "ctx.run_guard")),
        ("ctx.cli", ("orbax", "ctx.checkpoint", "ctx.run_guard", "ctx.data")),
    ],
)
def test_layers_load_nothing_above_them(module, must_not_load):
    """The data layer knows no CLI or checkpoints; evaluation and sampling no training loop."""
    program = f"import sys, {module}; print(sorted(m for m in sys.modules if m.startswith({must_not_load!r})))"
    out = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_importing_ctx_changes_nothing_process_wide():
    """Log filters, the unraisable hook and warning filters are the entry points' to install
    (ctx.train.main does, for its process), never an import's."""
    program = (
        "import logging, sys, warnings\n"
        "import jax, flax, optax, orbax.checkpoint, tensorboardX, tensorflow_datasets, ml_collections\n"
        "state = lambda: (list(warnings.filters), sys.unraisablehook,\n"
        "                 [list(logging.getLogger(n).filters) for n in ('absl', 'asyncio', '')])\n"
        "before = state()\n"
        "import ctx, ctx.checkpoint, ctx.train, ctx.evaluate, ctx.sample, ctx.bench, ctx.data.tokenizer\n"
        "print(before == state())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "True", out.stdout + out.stderr[-2000:]
