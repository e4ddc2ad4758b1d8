"""Each pipeline stage imports only earlier ones; modules stay small."""

from __future__ import annotations

import ast
import os
from pathlib import Path

ROOT = os.path.join(os.path.dirname(__file__), "..", "rnnc")
ORDER = ["errors", "ops", "syntax", "kernels", "parse", "format", "imports", "graph", "elaborate", "shapes",
         "check", "unroll", "interpret", "grad", "optimize", "schedule", "fuse", "target_numpy", "target_cupy", "target_numba", "lower", "explain",
         "load", "memory", "remat", "files", "data", "parallel", "picture", "compiler", "interop", "torch", "export", "gradcheck", "tasks", "decode", "train", "cli", "cli_entry"]  # fmt: skip


def imports(module: str) -> set[str]:
    """The rnnc modules `module` imports, anywhere in it (inside functions too), in any form:
    `from .x import y`, `from . import x`, `from rnnc.x import y`, `import rnnc.x`."""
    return imported(Path(ROOT, module + ".py").read_text())


def imported(source: str) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            parts = (node.module or "").split(".")
            if node.level == 0 and parts[0] != "rnnc":
                continue
            parts = parts[1:] if node.level == 0 else parts
            if parts and parts[0]:
                out.add(parts[0])
            else:  # from . import x, y  /  from rnnc import x
                out |= {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("rnnc.")}
    return out


def test_every_import_form_is_seen():
    forms = ["from . import lower", "def f():\n    from .lower import Emitter",
             "from rnnc.lower import x", "import rnnc.lower", "from rnnc import lower"]  # fmt: skip
    for src in forms:
        assert imported(src) == {"lower"}, src
    assert imported("import numpy\nfrom numpy import linalg") == set()


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


def test_a_target_is_one_module_behind_one_interface():
    """Lowering asks its target (target_numpy.NumpyTarget's methods); nothing in lower.py
    branches on which target it writes for, or writes CuPy itself."""
    import re

    from rnnc.target_cupy import CupyTarget
    from rnnc.target_numpy import NumpyTarget

    lower = Path(ROOT, "lower.py").read_text()
    assert not re.search(r"target ==|target !=|\bcp\.|cupy", lower.replace("target_cupy import CupyTarget", "")
                         .replace('"cupy": CupyTarget', "")), "a target branch in lower.py"  # fmt: skip
    base = {n for n in vars(NumpyTarget) if not n.startswith("_")}
    extra = {n for n in vars(CupyTarget) if not n.startswith("_")} - base
    # the CuPy target's own helpers are what its interface methods call
    assert extra == {"kernel_buffers", "row", "launch", "launch_call", "kernel_arg", "first_step", "accumulate",
                     "read_later"}
