"""The trainer stands on the shard format alone: nothing under train/ may import pipeline/
(the build), directly or through the modules it imports from this project."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_no_module_under_train_imports_pipeline():
    offenders = {str(p.relative_to(ROOT)): sorted(n for n in imported_modules(p) if n.split(".")[0] == "pipeline")
                 for p in sorted((ROOT / "train").glob("*.py"))}
    assert not {k: v for k, v in offenders.items() if v}, offenders
    for shared in ("common", "stages"):  # what train/ may import must not lead back to pipeline/
        for p in sorted((ROOT / shared).glob("*.py")):
            assert not any(n.split(".")[0] == "pipeline" for n in imported_modules(p)), p


def test_importing_every_train_module_loads_no_pipeline_module():
    modules = [f"train.{p.stem}" for p in sorted((ROOT / "train").glob("*.py")) if p.stem != "__init__"]
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "loaded = sorted(m for m in sys.modules if m == 'pipeline' or m.startswith('pipeline.'))\n"
            "print(loaded); sys.exit(1 if loaded else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
