"""The package's layers, checked by walking every import in the source (lazy ones inside
functions included): a package imports only from itself and from layers below it, so
cycles such as spec <-> storage or frameworks <-> runtime cannot come back. Also pins
the few facts that a lower layer must repeat because it cannot import a higher one."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "raybatch"

# Lowest first. A unit is a subpackage (raybatch/spec/) or a top-level module (raybatch/errors.py).
LAYERS: list[set[str]] = [
    {"errors", "contract", "config", "pylib", "node_health", "private_dir"},  # nothing of raybatch's
    {"spec", "state"},                 # the job file's format; the store and its state machine
    {"storage", "frameworks"},         # where files live; spec + rank -> command and env
    {"runtime"},                       # one attempt on Ray: launcher, driver, rank actors
    {"scheduler", "models", "sweep"},  # the queue and policy; the API's bodies; sweeps on Ray Tune
    {"server"},                        # REST API + scheduler thread
    {"client", "local", "cluster"},    # the SDK; the embedded local default; Azure/fake clusters
    {"cli"},
]
# imports allowed between two units of one layer (importer -> imported)
SAME_LAYER = {("client", "local"), ("cluster", "client"), ("cluster", "local")}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "raybatch"


def imports() -> list[tuple[str, str, str]]:
    """(importing file, importer's unit, imported unit) for every raybatch import."""
    out = []
    for f in sorted(PACKAGE.rglob("*.py")):
        rel = f.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(rel.parts).removesuffix(".__init__")
        me = _unit(module)
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == "raybatch":  # a submodule, or a name of the root (__version__)
                    names = [f"raybatch.{a.name}" if (PACKAGE / a.name).exists()
                             or (PACKAGE / f"{a.name}.py").exists() else "raybatch" for a in node.names]
                elif node.module.startswith("raybatch."):
                    names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("raybatch.")]
            for name in names:
                out.append((str(f.relative_to(PACKAGE.parent)), me, _unit(name)))
    return out


def layer_of(unit: str) -> int:
    for i, layer in enumerate(LAYERS):
        if unit in layer:
            return i
    raise AssertionError(f"raybatch.{unit} is in no layer of tests/test_layers.py: add it")


def test_every_unit_has_a_layer():
    units = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and p.stem != "__init__")}
    for unit in units:
        layer_of(unit)


def test_imports_go_down_the_layers_only():
    bad = []
    for where, me, other in imports():
        if me == "raybatch" or other in (me, "raybatch"):
            continue  # the package root: __version__, and its lazy Client
        if layer_of(other) > layer_of(me) or (layer_of(other) == layer_of(me) and (me, other) not in SAME_LAYER):
            bad.append(f"{where}: raybatch.{me} (layer {layer_of(me)}) imports raybatch.{other} "
                       f"(layer {layer_of(other)})")
    assert not bad, "\n".join(bad)


def test_the_check_sees_lazy_imports():
    """A cycle once hid behind an import inside a function: the walk must see those."""
    found = {(me, other) for _, me, other in imports()}
    assert ("frameworks", "contract") in found and ("spec", "errors") in found


def test_framework_names_in_the_job_file_are_the_registry():
    from raybatch import frameworks
    from raybatch.spec.job import KNOWN_FRAMEWORKS, MPI_FRAMEWORKS

    assert set(KNOWN_FRAMEWORKS) == set(frameworks.names())
    assert set(MPI_FRAMEWORKS) == {n for n in frameworks.names() if frameworks.get(n).uses_mpirun}


@pytest.mark.parametrize("module", ["raybatch.runtime.mpi_agent", "raybatch.contract"])
def test_the_mpi_agent_starts_without_the_heavy_parts(module):
    """mpirun starts the agent once per node: it must not import pydantic, ray or the SDK."""
    import subprocess
    import sys

    code = (f"import sys, {module}; heavy = [m for m in ('pydantic', 'ray', 'httpx', 'raybatch.spec') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent).stdout.strip()
    assert out == "[]", out
