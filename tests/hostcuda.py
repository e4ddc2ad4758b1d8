"""Running the CuPy target without a GPU, for tests: a stand-in `cupy` module whose arrays are
device arrays (NumPy arrays behind a wall that, like CuPy's, refuses
mixing with host arrays) and whose RawKernels are the generated CUDA source compiled as host C++ (g++),
each kernel run once per thread index. The kernels' arithmetic, indexing, argument order,
masks and buffers are the real ones; only the device is emulated."""

from __future__ import annotations

import ctypes
import hashlib
import linecache
import os
import re
import shutil
import subprocess
import sys
import tempfile
import types

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin

HOST_PRELUDE = """
#include <barrier>
#include <cmath>
#include <thread>
#include <vector>
using namespace std;
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static  /* blocks run one after another: one copy serves them all */
struct rnnc_dim3 { int x; };
static thread_local rnnc_dim3 blockIdx = {0}, blockDim = {1}, threadIdx = {0};
static std::barrier<>* rnnc_block_barrier = nullptr;
static void __syncthreads() { rnnc_block_barrier->arrive_and_wait(); }
"""

CACHE = os.path.join(tempfile.gettempdir(), "rnnc-hostcuda")


def have_compiler() -> bool:
    return shutil.which("g++") is not None


def driver(source: str) -> str:
    """A host function per kernel that runs it for every thread index 0..n-1: one after
    another; or, for a kernel whose threads meet at __syncthreads (a block per row), each
    block's threads as real threads meeting at a barrier, one block after another."""
    out = []
    found = list(re.finditer(r'extern "C" __global__ void (\w+)\(([^)]*)\)', source))
    for m, nxt in zip(found, [*found[1:], None], strict=True):
        name, params = m.group(1), m.group(2)
        names = ", ".join(p.split()[-1] for p in params.split(","))
        body = source[m.end() : nxt.start() if nxt else len(source)]
        if "__shared__" not in body:
            out.append(
                f'extern "C" void drive_{name}({params}, const int block) {{\n'
                f"  for (int t = 0; t < n; ++t) {{ threadIdx.x = t; {name}({names}); }}\n}}"
            )
            continue
        out.append(f"""extern "C" void drive_{name}({params}, const int block) {{
  for (int b0 = 0; b0 * block < n; ++b0) {{
    std::barrier<> meet(block);
    rnnc_block_barrier = &meet;
    std::vector<std::thread> threads;
    for (int t = 0; t < block; ++t)
      threads.emplace_back([&, t] {{
        blockIdx.x = b0; blockDim.x = block; threadIdx.x = t; {name}({names});
      }});
    for (auto& th : threads) th.join();
  }}
}}""")
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
        subprocess.run(["g++", "-O1", "-std=c++20", "-pthread", "-shared", "-fPIC", "-o", tmp, src],
                       check=True, capture_output=True)  # fmt: skip
        os.replace(tmp, lib)
    return ctypes.CDLL(lib)


class DeviceArray(NDArrayOperatorsMixin):
    """A "device" array: a NumPy array behind a wall. As with CuPy, mixing it with a host
    (NumPy) array raises TypeError, np.asarray on it raises, and .get() copies it back; NumPy
    functions and ufuncs given only device arrays run and return device arrays."""

    __slots__ = ("a",)

    def __init__(self, a: np.ndarray):
        self.a = a

    def get(self) -> np.ndarray:
        return self.a.copy()

    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. "
                        "Please use `.get()` to construct a NumPy array explicitly.")  # fmt: skip

    def __array_ufunc__(self, ufunc, method, *inputs, **kw):
        out = kw.get("out")
        result = getattr(ufunc, method)(*on_device(inputs), **on_device(kw))
        if out is not None:  # in place (a += b): the same device arrays
            return out[0] if len(out) == 1 else out
        return wrap(result)

    def __array_function__(self, func, types, args, kwargs):
        return wrap(func(*on_device(args), **on_device(kwargs)))

    def __getattr__(self, name: str):
        if name.startswith("__"):  # no __array_interface__ & co: NumPy must not see through
            raise AttributeError(name)
        if name not in API["cupy.ndarray"]:
            raise AttributeError(f"cupy.ndarray has no attribute {name!r}")
        value = getattr(self.a, name)
        if callable(value):
            return lambda *args, **kw: wrap(value(*on_device(args), **on_device(kw)))
        return wrap(value)

    def __getitem__(self, key):
        return wrap(self.a[on_device(key)])

    def __setitem__(self, key, value) -> None:
        self.a[on_device(key)] = on_device(value)

    def __len__(self) -> int:
        return len(self.a)

    def __iter__(self):
        return (wrap(row) for row in self.a)

    def __dlpack__(self, *args, **kw):  # DLPack, as CuPy's arrays have it (here: host memory)
        return self.a.__dlpack__(*args, **kw)

    def __dlpack_device__(self):
        return self.a.__dlpack_device__()

    def __float__(self) -> float:
        return float(self.a)

    def __int__(self) -> int:
        return int(self.a)

    def __bool__(self) -> bool:
        return bool(self.a)

    def __repr__(self) -> str:
        return f"device({self.a!r})"


def cupy_api() -> dict[str, frozenset[str]]:
    """The public names of cupy and of cupy.ndarray (tests/cupy_api.txt)."""
    out: dict[str, set[str]] = {}
    section = None
    with open(os.path.join(os.path.dirname(__file__), "cupy_api.txt")) as f:
        for line in f:
            line = line.strip()
            if line.startswith("["):
                section = out.setdefault(line[1:-1], set())
            elif line and not line.startswith("#") and section is not None:
                section.add(line)
    return {k: frozenset(v) for k, v in out.items()}


API = cupy_api()


def on_device(x):
    """The NumPy arrays behind device arrays (in tuples, lists and dicts); a host array here
    is the mistake CuPy would raise on."""
    if isinstance(x, DeviceArray):
        return x.a
    if isinstance(x, np.ndarray):
        raise TypeError(f"a host (NumPy) array {x.shape} where CuPy needs a device array")
    if isinstance(x, (tuple, list)):
        return type(x)(on_device(v) for v in x)
    if isinstance(x, dict):
        return {k: on_device(v) for k, v in x.items()}
    return x


def wrap(x):
    """Arrays NumPy returned, as device arrays (0-d ones too: CuPy returns no scalars)."""
    if isinstance(x, (np.ndarray, np.generic)) and not isinstance(x, np.dtype):
        return DeviceArray(np.asarray(x))
    if isinstance(x, tuple):
        return tuple(wrap(v) for v in x)
    if isinstance(x, list):
        return [wrap(v) for v in x]
    return x


def to_device(x, *args, **kw):
    """cp.asarray / cp.array: the one explicit way onto the device."""
    a = x.a if isinstance(x, DeviceArray) else x
    return DeviceArray(np.asarray(a, *args, **kw))


class HostKernel:
    def __init__(self, lib: ctypes.CDLL, name: str, real: type):
        self.fn = getattr(lib, f"drive_{name}")
        self.real = real
        self.launches = 0
        self.blocks: set[int] = set()  # the threads per block it was launched with

    def __call__(self, grid, block, args) -> None:
        assert grid[0] * block[0] >= int(args[-1])  # enough threads for n
        cargs = []
        for a in args:
            assert not isinstance(a, np.ndarray), "a host array passed to a kernel"
            if isinstance(a, DeviceArray):
                assert a.a.flags.c_contiguous
                cargs.append(ctypes.c_void_p(a.a.ctypes.data))
            elif isinstance(a, np.int32):
                cargs.append(ctypes.c_int(int(a)))
            else:
                cargs.append(self.real(float(a)))
        self.fn(*cargs, ctypes.c_int(block[0]))
        self.launches += 1
        self.blocks.add(block[0])


def gemm(transa: str, transb: str, a, b, out=None, alpha=1.0, beta=0.0):
    """cupy.cublas.gemm: out = alpha * op(a) @ op(b) + beta * out, in place."""
    A, B = on_device(a), on_device(b)
    assert A.ndim == B.ndim == 2 and A.dtype == B.dtype
    product = alpha * ((A.T if transa == "T" else A) @ (B.T if transb == "T" else B))
    if out is None:
        return DeviceArray(product)
    assert out.shape == product.shape and out.dtype == A.dtype
    out.a *= beta
    out.a += product
    return out


def device_function(name: str):
    """cupy.<name>: NumPy's function on device arrays only (names CuPy has, only)."""
    if name not in API["cupy"]:
        raise AttributeError(f"module 'cupy' has no attribute {name!r}")
    f = getattr(np, name)
    if isinstance(f, type) or not callable(f):  # dtypes, constants
        return f
    return lambda *args, **kw: wrap(f(*on_device(args), **on_device(kw)))


def fake_cupy(ns: dict | None = None) -> types.ModuleType:
    """A `cupy`: device arrays over NumPy, host C++ for kernels. Given the namespace `ns` of
    one generated module (filled once it is loaded), all its kernels of a dtype compile as one
    library; without it, each RawKernel compiles its own code."""
    cp = types.ModuleType("cupy")
    libs: dict[str, ctypes.CDLL] = {}
    cp.counts = {}

    def raw_kernel(code: str, name: str) -> HostKernel:
        real = "float" if code.startswith("typedef float") else "double"
        if ns is None:
            lib = build(code)
        else:
            if real not in libs:
                all_kernels = "\n".join(ns["KERNELS"].values())
                libs[real] = build(f"typedef {real} real;\n" + ns["PRELUDE"] + all_kernels)
            lib = libs[real]
        k = HostKernel(lib, name, ctypes.c_float if real == "float" else ctypes.c_double)
        cp.counts[name] = k
        return k

    cp.RawKernel = raw_kernel
    cp.ndarray = DeviceArray
    cp.asarray = cp.array = to_device
    cp.cublas = types.SimpleNamespace(gemm=gemm)
    cp.cuda = types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDeviceCount=lambda: 1),
        Device=lambda *_: types.SimpleNamespace(synchronize=lambda: None),  # all ran already
        cublas=cp.cublas,  # what require_gpu probes: here, nothing to load
        nvrtc=types.SimpleNamespace(getVersion=lambda: (0, 0)),
    )
    cp.__getattr__ = device_function  # the rest of the API: NumPy's, on device arrays
    return cp


def load_with_fake_cupy(source: str) -> types.ModuleType:
    """The generated CuPy module, loaded against the stand-in."""
    mod = types.ModuleType("rnnc_cupy_host")
    cp = fake_cupy(mod.__dict__)
    saved = sys.modules.get("cupy")
    sys.modules["cupy"] = cp
    try:
        name = f"<cupy module {hashlib.sha1(source.encode()).hexdigest()[:8]}>"
        linecache.cache[name] = (len(source), None, source.splitlines(True), name)  # tracebacks
        exec(compile(source, name, "exec"), mod.__dict__)
    finally:
        if saved is None:
            del sys.modules["cupy"]
        else:
            sys.modules["cupy"] = saved
    mod.fake = cp
    return mod


if __name__ == "__main__" and sys.argv[1:] == ["--api"]:  # regenerate tests/cupy_api.txt
    import cupy

    print(f"# The public names of cupy {cupy.__version__} (the rnnc[cupy] extra) and of "
          "cupy.ndarray:\n# the stand-in (hostcuda.py) offers only these, so code that CuPy "
          "lacks fails here too.\n# Regenerate with CuPy installed: python tests/hostcuda.py "
          "--api > tests/cupy_api.txt")  # fmt: skip
    print("[cupy]", *sorted(n for n in dir(cupy) if not n.startswith("_")), sep="\n")
    print("[cupy.ndarray]", *sorted(n for n in dir(cupy.ndarray) if not n.startswith("_")),
          sep="\n")  # fmt: skip
