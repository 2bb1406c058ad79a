"""The layout is the architecture: each module imports only from its own layer or below.

Layers, lowest first (README, "Code map"): a stage may use the bus and the exchanges, never
the other way round; nothing below the command line imports it. A module over 400 lines says
in its docstring why it is one piece.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "quantum_trader"

# Module (dotted, relative to quantum_trader; a package stands for all its modules) -> layer.
LAYERS: dict[str, int] = {
    "errors": 0,
    "keys": 0,
    "redaction": 0,
    "envfile": 0,
    "logs": 0,
    "events": 0,
    "cluster_url": 0,  # parsing a cluster URL (the settings check it; bus.cluster connects)
    "settings": 1,
    "secrets_file": 1,
    "bus": 2,
    "scripts": 2,  # Lua scripts registered on a client
    "exchanges": 3,
    "strategies": 3,
    "marketdata": 3,
    "bars": 3,
    "feed": 3,
    "download": 3,  # an exchange's public candles into Parquet files
    "portfolio": 3,
    "risk": 3,
    "metrics": 3,  # counted by the stages, so below them; reads the server and wraps an exchange
    "governor": 4,
    "router": 4,
    "publisher": 4,  # decisions onto the decision stream's partitions (the router's symbol rules)
    "execution": 4,
    "commit": 4,
    "protect": 4,
    "trading": 4,
    "ai_engine": 4,
    "journal": 4,
    "book": 4,
    "reconcile": 4,
    "web": 5,
    "alerts": 5,  # reads what the stages write (trading state, results, reconciliation, journal); runner starts it
    "runner": 5,
    "backtest": 5,
    "demo": 5,
    "ops": 6,
    "cli": 7,
    "__main__": 7,
    "__init__": 0,
}
LONG = 400


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def layer_of(name: str) -> int:
    """The layer of a dotted module name inside the package."""
    head = name.split(".")[0]
    if head not in LAYERS:
        raise AssertionError(f"{name}: not placed in a layer; add it to LAYERS and to the README's code map")
    return LAYERS[head]


def imported(path: Path) -> set[str]:
    """Every quantum_trader module the file imports, at any depth (lazy and type-only imports too)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names if alias.name.startswith("quantum_trader.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("quantum_trader"):
            if node.module == "quantum_trader":
                # ``from quantum_trader import keys`` names a module; ``__version__`` the package's face.
                out |= {
                    f"quantum_trader.{alias.name}" if _is_module(alias.name) else "quantum_trader.__init__"
                    for alias in node.names
                }
            else:
                out.add(node.module)
    return {name.removeprefix("quantum_trader.") for name in out}


def _is_module(name: str) -> bool:
    return (PACKAGE / f"{name}.py").exists() or (PACKAGE / name / "__init__.py").exists()


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda path: module_name(path))
def test_a_module_imports_nothing_from_a_layer_above_its_own(path: Path) -> None:
    own = layer_of(module_name(path))
    upward = sorted(name for name in imported(path) if layer_of(name) > own)
    assert not upward, f"{module_name(path)} (layer {own}) imports from higher layers: {upward}"


@pytest.mark.parametrize("path", MODULES, ids=lambda path: module_name(path))
def test_a_long_module_says_why_it_is_one_piece(path: Path) -> None:
    lines = len(path.read_text(encoding="utf-8").splitlines())
    if lines <= LONG:
        return
    docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    assert "One piece" in docstring, (
        f"{module_name(path)} has {lines} lines: split it, or say in its docstring why it is "
        "one piece (a paragraph starting 'One piece:')"
    )


def test_the_layers_catch_an_upward_import(tmp_path: Path) -> None:
    """The check itself can fail: an adapter reaching up into risk is caught."""
    adapter = tmp_path / "adapter.py"
    adapter.write_text("def f():\n    from quantum_trader.governor import set_kill\n")
    assert {layer_of(name) for name in imported(adapter)} == {LAYERS["governor"]}
    assert layer_of("governor") > layer_of("exchanges.ccxt")


def test_the_pipeline_stages_load_no_heavy_library_they_do_not_use() -> None:
    """Every command imports the whole command line: a router or execution process must not pay for
    pandas, scikit-learn or SQLAlchemy (each is ~20 MB of RSS and a slower start)."""
    import subprocess
    import sys

    probe = (
        "import sys, quantum_trader.cli, quantum_trader.runner; "
        "print(' '.join(m for m in ('pandas', 'sklearn', 'sqlalchemy', 'alembic', 'psycopg') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == ""
