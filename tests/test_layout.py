"""The package's shape, checked: every module short, and imports that only run down the layers, so a concern is
found by its folder and a lower layer never needs a higher one (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "loop"
MAX_LINES = 400

# Lower numbers are lower layers: a module may import modules of its own layer or below, never above.
LAYERS = {"config": 0, "extras": 0, "files": 0, "languages": 0, "data": 1, "model": 2, "run": 3, "eval": 4, "ship": 5}
TOP = 6  # the loop itself: train.py, train_log.py, results.py, optimizers.py, cli.py


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], TOP) if len(parts) > 1 else TOP


def loop_imports(path: Path) -> set[str]:
    """Every `loop` module `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "loop":
                found |= {f"loop.{alias.name}" for alias in node.names}
            elif node.module.startswith("loop."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("loop.")}
    return found


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_no_module_is_longer_than_the_limit():
    long = {str(p.relative_to(ROOT)): n for p in modules() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by concern): {long}"


def test_every_module_is_in_a_known_layer():
    loose = [module_name(p) for p in modules() if layer(module_name(p)) == TOP and module_name(p).count(".") > 1]
    assert not loose, f"subpackages without a layer in LAYERS: {loose}"


def test_imports_only_run_down_the_layers():
    upward = []
    for path in modules():
        importer = module_name(path)
        for imported in loop_imports(path):
            if layer(imported) > layer(importer):
                upward.append(f"{importer} (layer {layer(importer)}) imports {imported} (layer {layer(imported)})")
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(sorted(upward))


def test_nothing_in_the_package_imports_the_training_loop():
    importers = [module_name(p) for p in modules() if "loop.train" in loop_imports(p)]
    assert not importers, f"loop/train.py is the top: {importers} import it"


def test_the_layer_check_sees_an_upward_import(tmp_path):
    """The check itself can fail: a data module importing eval is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("from loop.eval.metrics import compute_metrics\n")
    assert "loop.eval.metrics" in loop_imports(bad)
    assert layer("loop.eval.metrics") > layer("loop.data.prepare")
