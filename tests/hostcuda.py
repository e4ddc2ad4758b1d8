"""Running the CuPy target without a GPU, for tests: a stand-in `cupy` module whose arrays are
NumPy arrays and whose RawKernels are the generated CUDA source compiled as host C++ (g++),
each kernel run once per thread index. The kernels' arithmetic, indexing, argument order,
masks and buffers are the real ones; only the device is emulated."""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import types

import numpy as np

HOST_PRELUDE = """
#include <cmath>
using namespace std;
#define __global__
#define __device__
#define __forceinline__ inline
struct rnnc_dim3 { int x; };
static rnnc_dim3 blockIdx = {0}, blockDim = {1}, threadIdx = {0};
"""

CACHE = os.path.join(tempfile.gettempdir(), "rnnc-hostcuda")


def have_compiler() -> bool:
    return shutil.which("g++") is not None


def driver(source: str) -> str:
    """A host function per kernel that runs it for every thread index 0..n-1."""
    out = []
    for m in re.finditer(r'extern "C" __global__ void (\w+)\(([^)]*)\)', source):
        name, params = m.group(1), m.group(2)
        names = [p.split()[-1] for p in params.split(",")]
        out.append(
            f'extern "C" void drive_{name}({params}) {{\n'
            f"  for (int t = 0; t < n; ++t) {{ threadIdx.x = t; {name}({', '.join(names)}); }}\n}}"
        )
    return "\n".join(out)


def build(source: str) -> ctypes.CDLL:
    """Compile (cached by content) the kernels of one dtype into a shared library."""
    text = HOST_PRELUDE + source + "\n" + driver(source)
    os.makedirs(CACHE, exist_ok=True)
    digest = hashlib.sha1(text.encode()).hexdigest()[:16]
    lib = os.path.join(CACHE, f"k{digest}.so")
    if not os.path.exists(lib):
        src = os.path.join(CACHE, f"k{digest}.cpp")
        with open(src, "w") as f:
            f.write(text)
        tmp = lib + f".{os.getpid()}.tmp"
        subprocess.run(["g++", "-O1", "-shared", "-fPIC", "-o", tmp, src], check=True,
                       capture_output=True)  # fmt: skip
        os.replace(tmp, lib)
    return ctypes.CDLL(lib)


class HostKernel:
    def __init__(self, lib: ctypes.CDLL, name: str, real: type):
        self.fn = getattr(lib, f"drive_{name}")
        self.real = real
        self.launches = 0

    def __call__(self, grid, block, args) -> None:
        assert grid[0] * block[0] >= int(args[-1])  # enough threads for n
        cargs = []
        for a in args:
            if isinstance(a, np.ndarray):
                assert a.flags.c_contiguous
                cargs.append(ctypes.c_void_p(a.ctypes.data))
            elif isinstance(a, np.int32):
                cargs.append(ctypes.c_int(int(a)))
            else:
                cargs.append(self.real(float(a)))
        self.fn(*cargs)
        self.launches += 1


def fake_cupy(ns: dict) -> types.ModuleType:
    """A `cupy` for one generated module (namespace `ns`, filled once it is loaded): NumPy
    for arrays, host C++ for its kernels."""
    cp = types.ModuleType("cupy")
    libs: dict[str, ctypes.CDLL] = {}
    cp.counts = {}

    def raw_kernel(code: str, name: str) -> HostKernel:
        real = "float" if code.startswith("typedef float") else "double"
        if real not in libs:
            all_kernels = "\n".join(ns["KERNELS"].values())
            libs[real] = build(f"typedef {real} real;\n" + ns["PRELUDE"] + all_kernels)
        k = HostKernel(libs[real], name, ctypes.c_float if real == "float" else ctypes.c_double)
        cp.counts[name] = k
        return k

    cp.RawKernel = raw_kernel
    cp.ndarray = np.ndarray
    cp.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=lambda: 1))
    cp.__getattr__ = lambda name: getattr(np, name)  # the rest of the API: NumPy's
    return cp


def load_with_fake_cupy(source: str) -> types.ModuleType:
    """The generated CuPy module, loaded against the stand-in."""
    mod = types.ModuleType("rnnc_cupy_host")
    cp = fake_cupy(mod.__dict__)
    saved = sys.modules.get("cupy")
    sys.modules["cupy"] = cp
    try:
        exec(compile(source, "<cupy module>", "exec"), mod.__dict__)
    finally:
        if saved is None:
            del sys.modules["cupy"]
        else:
            sys.modules["cupy"] = saved
    mod.fake = cp
    return mod
