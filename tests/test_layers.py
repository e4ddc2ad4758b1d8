"""Each pipeline stage imports only earlier ones; modules stay small."""

from __future__ import annotations

import ast
import os
from pathlib import Path

ROOT = os.path.join(os.path.dirname(__file__), "..", "rnnc")
ORDER = ["errors", "ops", "syntax", "kernels", "parse", "format", "graph", "elaborate", "shapes",
         "check", "unroll", "interpret", "grad", "optimize", "schedule", "fuse", "lower", "explain",
         "load", "files", "data", "picture", "compiler", "gradcheck", "tasks", "train", "cli", "cli_entry"]  # fmt: skip


def imports(module: str) -> set[str]:
    tree = ast.parse(Path(ROOT, module + ".py").read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out.add((node.module or "").split(".")[0])
    return out


def test_stages_import_only_earlier_stages():
    for i, module in enumerate(ORDER):
        if not os.path.exists(os.path.join(ROOT, module + ".py")):
            continue
        later = imports(module) & set(ORDER[i + 1 :])
        assert not later, f"{module} imports later stages {later}"


def test_ops_and_errors_import_nothing_from_rnnc():
    assert imports("ops") == set() and imports("errors") == set() and imports("kernels") == set()


def test_every_module_is_listed_and_documented():
    for f in os.listdir(ROOT):
        if f.endswith(".py") and f != "__init__.py":
            assert f[:-3] in ORDER, f
            tree = ast.parse(Path(ROOT, f).read_text())
            assert ast.get_docstring(tree), f"{f} has no docstring"
