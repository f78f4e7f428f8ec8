"""The floors: pipeline/ (CLI, executors) on stages/ and train/, both on common/. Nothing
under train/ (train/families/ included) may import pipeline/ (the build), directly or
through the modules it imports from this project; nothing under stages/ or common/ (any
depth: stages/annotators/, stages/shards/, ...) may import pipeline/ either. The globs are
recursive: a module placed in a subfolder is checked too (a `glob("*.py")` here missed
train/families/ and stages/annotators/ until it was made `rglob`)."""

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


def python_files(folder: str) -> list[Path]:
    return sorted(p for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


def test_the_checks_see_every_subfolder():
    """The globs reach the subpackages (train/families, stages/annotators, stages/shards)."""
    seen = {p.parent.relative_to(ROOT).as_posix() for folder in ("train", "stages") for p in python_files(folder)}
    assert {"train/families", "stages/annotators", "stages/shards", "stages/steps"} <= seen, seen


def test_no_datasets_package_shadows_hugging_face():
    assert not (ROOT / "datasets" / "__init__.py").exists()


def test_no_module_under_train_imports_pipeline():
    offenders = {str(p.relative_to(ROOT)): sorted(n for n in imported_modules(p) if n.split(".")[0] == "pipeline")
                 for p in python_files("train")}
    assert not {k: v for k, v in offenders.items() if v}, offenders
    for shared in ("common", "stages"):  # what train/ may import must not lead back to pipeline/
        for p in python_files(shared):
            assert not any(n.split(".")[0] == "pipeline" for n in imported_modules(p)), p


def test_importing_every_train_module_loads_no_pipeline_module():
    modules = [".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__") for p in python_files("train")]
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "loaded = sorted(m for m in sys.modules if m == 'pipeline' or m.startswith('pipeline.'))\n"
            "print(loaded); sys.exit(1 if loaded else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
