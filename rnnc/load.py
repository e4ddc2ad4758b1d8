"""Source -> module: generated code is loaded from a real file, so tracebacks and pdb show it."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import types


def load_source(source: str, name: str = "rnnc_model") -> types.ModuleType:
    digest = hashlib.sha1(source.encode()).hexdigest()[:12]
    folder = os.path.join(tempfile.gettempdir(), "rnnc-cache")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}_{digest}.py")
    if not os.path.exists(path):
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".py")
        with os.fdopen(fd, "w") as f:
            f.write(source)
        os.replace(tmp, path)
    spec = importlib.util.spec_from_file_location(f"{name}_{digest}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # numba's on-disk cache finds a compiled loop's module by name
    spec.loader.exec_module(module)
    return module
