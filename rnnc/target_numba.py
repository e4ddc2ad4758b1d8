"""The native CPU target: the CuPy target's plan run on the CPU, each time loop compiled by numba.

A loop over t is where NumPy code pays its per-call cost T times (a call ~0.5-1 us, dozens a
step). Here each step's pointwise work is the fused kernels fuse.py makes for the GPU, written
as Python loops over (sequence, column) where CUDA has a thread for each (python_kernel), and
each time loop moves whole into a function of its own (`<function>_steps<k>`, jit_loops) that
the function calls with what the loop reads and gets back what it leaves for later statements.
At its first call numba compiles it, with every helper and kernel it calls, once per float type
(Native rewrites what numba types differently from NumPy) and caches the machine code on disk
beside the module. The module reads as the NumPy target's: the same statements under the same
equation comments.

A loop numba cannot type runs as Python (the same text, so the same results), and the module's
NATIVE and NATIVE_WHY tables say so."""

from __future__ import annotations

import ast
import builtins
import re
import textwrap
from dataclasses import dataclass
from typing import Any

from .fuse import Accumulate, Kernel
from .graph import operands
from .ops import OPS
from .target_cupy import CupyTarget
from .target_numpy import INIT_PARAMS, NumpyTarget

NATIVE_IMPORTS = "import ast\nimport inspect\nimport re\nimport textwrap\n\nimport llvmlite.ir\nimport numba\nimport numba.extending\nimport numpy as np\n"

RUNTIME = r"""def native(steps):
    # a time loop compiled by numba, once per float type (cached on disk beside this file);
    # where numba cannot type it, the loop itself runs: the same statements, the same results.
    # NATIVE[name] says which ran, NATIVE_WHY[name] why not compiled
    made = {}
    steps.time_loop = True  # its subscript stores write rows (Native.visit_Assign)

    def run(*args):
        real = next((a.dtype for a in args if isinstance(a, np.ndarray) and a.dtype.kind == "f"),
                    np.dtype(np.float64))
        fast = made.get(real)
        if fast is None:
            try:
                fast = made[real] = compiled(steps, real, {})
            except OSError as e:  # this file is gone: its source cannot be read again
                fast = made[real] = False
                NATIVE[steps.__name__], NATIVE_WHY[steps.__name__] = False, str(e)
        if fast is not False:
            try:
                out = fast(*args)
                NATIVE[steps.__name__] = True
                return out
            except ModuleNotFoundError:  # numba's disk cache, written under another module name
                made[real] = compiled(steps, real, {}, cache=False)
                return run(*args)
            except (numba.core.errors.NumbaError, NotImplementedError) as e:  # not typed, not lowered
                made[real] = False
                NATIVE[steps.__name__] = False
                NATIVE_WHY[steps.__name__] = why(e)
        return steps(*args)

    run.steps, run.made = steps, made  # the loop's text; its compiled forms by float type
    return run


def why(e):
    # numba's message without its colours and repeated stage lines: what it could not type
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "nopython" not in ln
             and not ln.strip().startswith(("-", "File", "During", "^"))]
    return " / ".join(lines[:3])[:300]


class Native(ast.NodeTransformer):
    # what numba types differently from NumPy, rewritten: a reduction over the last axis
    # (numba has no axis= or keepdims= for max, mean, var) calls last_<kind>[_keep]; in a
    # float32 loop each number in arithmetic becomes real(number), as numba would type a
    # Python number as float64 and promote float32 arrays with it
    def __init__(self, typed, scalar, rows=False):
        self.typed, self.scalar = typed, scalar  # scalar: a function of numbers (the prelude)
        self.tanh = "tanh32" if typed else "tanh64"  # float32 / float64: no libm, SIMD
        self.rows = rows  # a time loop's function: its subscript stores are arrays

    def visit_Subscript(self, node):
        node.value = self.visit(node.value)
        return node  # indices stay integers

    def visit_Assign(self, node):
        # in a time loop (not a kernel, whose stores are numbers): a row stored with put()
        node = self.generic_visit(node)
        (target,) = node.targets
        if not self.rows or not isinstance(target, ast.Subscript):
            return node
        view = ast.Subscript(target.value, target.slice, ast.Load())
        return ast.Expr(ast.Call(ast.Name("put", ast.Load()), [view, node.value], []))

    def visit_keyword(self, node):
        return node  # axis=-1 and the like

    def visit_BinOp(self, node):
        if isinstance(node.op, ast.MatMult):  # one cblas call on NumPy's BLAS
            return ast.Call(ast.Name("matmul", ast.Load()), [self.visit(node.left), self.visit(node.right)], [])
        node.left = self.visit(node.left)
        if not isinstance(node.op, ast.Pow):
            node.right = self.visit(node.right)  # x ** 2 keeps an integer power
        return node

    def visit_Call(self, node):
        if isinstance(node.func, ast.Name) and node.func.id in ("range", "int", "len"):
            return node
        name = ast.unparse(node.func)
        if name == "sigmoid_":
            node.func = ast.Name(f"sigmoid{self.tanh[-2:]}_", ast.Load())
        elif name == "np.tanh" and self.scalar:
            node.func = ast.Name(self.tanh + "_scalar", ast.Load())
        elif name == "np.tanh" and self.typed:  # a float32 array's tanh (a ufunc); float64's stays NumPy's
            node.func = ast.Name("tanh32", ast.Load())
        f, kw = node.func, {k.arg: ast.literal_eval(k.value) for k in node.keywords
                            if isinstance(k.value, (ast.Constant, ast.UnaryOp))}
        if (isinstance(f, ast.Attribute) and f.attr in ("sum", "max", "min", "mean", "var")
                and not node.args and kw.get("axis") == -1 and len(kw) == len(node.keywords)
                and set(kw) <= {"axis", "keepdims"}):
            name = f"last_{f.attr}" + ("_keep" if kw.get("keepdims") else "")
            return ast.Call(ast.Name(name, ast.Load()), [self.visit(f.value)], [])
        if self.typed and ast.unparse(node.func) == "np.where":
            node.args[1:] = [ast.Call(ast.Name("real", ast.Load()), [a], [])
                             if isinstance(a, ast.Constant) and type(a.value) is int else a
                             for a in node.args[1:]]  # fmt: skip
        return self.generic_visit(node)

    def visit_Constant(self, node):
        # floats only: an integer is a size, an axis or a count (B * 64, reshape(-1)) but for
        # np.where's choices, which visit_Call wraps
        if self.typed and isinstance(node.value, float):
            return ast.Call(ast.Name("real", ast.Load()), [node], [])
        return node


def compiled(fn, real, done, cache=True):
    # fn compiled for float type `real`, with every helper it calls compiled the same way
    if fn.__name__ in done:
        return done[fn.__name__]
    tree = ast.parse(textwrap.dedent(inspect.getsource(getattr(fn, "steps", fn))))
    f = tree.body[0]
    f.decorator_list = []
    scalar = fn.__name__ in SCALAR  # the prelude's functions of numbers: tanh is one call
    rows = getattr(getattr(fn, "steps", fn), "time_loop", False)  # a time loop's own function
    tree = ast.fix_missing_locations(Native(real != np.float64, scalar, rows).visit(tree))
    space = dict(fn.__globals__, real=real.type)
    exec(compile(tree, fn.__code__.co_filename, "exec"), space)
    done[fn.__name__] = fast = numba.njit(space[f.name], cache=cache, error_model="numpy")
    for name in space[f.name].__code__.co_names:
        v = space.get(name)
        if callable(v) and getattr(v, "__module__", None) == fn.__module__ and name in HELPERS:
            space[name] = compiled(v, real, done, cache)
    return fast


def numpy_blas():
    # NumPy's own OpenBLAS (its wheels bundle scipy-openblas64), for the GEMMs of a compiled
    # step: numba's `@` calls SciPy's OpenBLAS, whose threads then contend with NumPy's on
    # every step; one BLAS is one pool of threads. Called by symbol name, so that numba's
    # disk cache holds the loop. None where NumPy links another BLAS
    import ctypes
    import glob
    import os

    import llvmlite.binding

    where = os.path.join(os.path.dirname(np.__file__), "..", "numpy.libs", "libscipy_openblas64_*.so")
    try:
        lib = ctypes.CDLL(sorted(glob.glob(where))[0])
        out = []
        i, n, p = numba.int32, numba.int64, numba.types.voidptr
        for x, real in (("s", numba.float32), ("d", numba.float64)):
            for kind, sig in (("gemm", numba.void(i, i, i, n, n, n, real, p, n, p, n, real, p, n)),
                              ("gemv", numba.void(i, i, n, n, real, p, n, p, n, real, p, n))):
                name = f"scipy_cblas_{x}{kind}64_"
                llvmlite.binding.add_symbol(name, ctypes.cast(getattr(lib, name), ctypes.c_void_p).value)
                out.append(numba.types.ExternalFunction(name, sig))
        return tuple(out)  # sgemm, sgemv, dgemm, dgemv
    except (IndexError, OSError, AttributeError):
        return None


BLAS = numpy_blas()


def matmul(a, b):
    return a @ b


@numba.extending.overload(matmul)
def matmul_blas(a, b):
    # a @ b of two matrices, each C-ordered or a transposed view of one, as one cblas call
    if (BLAS is None or a.ndim != 2 or b.ndim != 2 or a.dtype != b.dtype or "A" in (a.layout, b.layout)
            or a.dtype not in (numba.float32, numba.float64)):
        return lambda a, b: a @ b
    gemm, gemv = BLAS[:2] if a.dtype == numba.float32 else BLAS[2:]
    ta, tb = (111 if a.layout == "C" else 112), (111 if b.layout == "C" else 112)
    one, zero = (np.float32(1), np.float32(0)) if a.dtype == numba.float32 else (1.0, 0.0)

    def blas(a, b):
        M, K = a.shape
        N = b.shape[1]
        out = np.empty((M, N), a.dtype)
        if M == 1 and N and K:  # one sequence: a matrix-vector product costs a third of a GEMM call
            if tb == 111:  # b is [K, N] row-major: out = b^T a
                gemv(101, 112, K, N, one, b.ctypes, max(N, 1), a.ctypes, 1, zero, out.ctypes, 1)
            else:  # b is W^T with W [N, K] row-major: out = W a
                gemv(101, 111, N, K, one, b.ctypes, max(K, 1), a.ctypes, 1, zero, out.ctypes, 1)
        elif M and N and K:
            lda = max(K if ta == 111 else M, 1)
            ldb = max(N if tb == 111 else K, 1)
            gemm(101, ta, tb, M, N, K, one, a.ctypes, lda, b.ctypes, ldb, zero, out.ctypes, max(N, 1))
        else:
            out[:] = 0.0
        return out

    return blas


# the module-level helpers are not cached on disk: a cache names the module that wrote it, and
# this file may be loaded under another name (a compiled loop then recompiles uncached)
@numba.njit(inline="always")
def tanh32_scalar(a):
    # float32 tanh as a rational function (Eigen's fast tanh): 6 ulp at most, where libm's
    # scalar tanhf, all numba has without Intel's SVML, runs ~50x slower than NumPy's SIMD one
    x = min(max(a, np.float32(-7.90531110763549805)), np.float32(7.90531110763549805))
    x2 = x * x
    p = np.float32(-2.76076847742355e-16)
    p = p * x2 + np.float32(2.00018790482477e-13)
    p = p * x2 + np.float32(-8.60467152213735e-11)
    p = p * x2 + np.float32(5.12229709037114e-08)
    p = p * x2 + np.float32(1.48572235717979e-05)
    p = p * x2 + np.float32(6.37261928875436e-04)
    p = p * x2 + np.float32(4.89352455891786e-03)
    q = np.float32(1.19825839466702e-06)
    q = q * x2 + np.float32(1.18534705686654e-04)
    q = q * x2 + np.float32(2.26843463243900e-03)
    q = q * x2 + np.float32(4.89352518554385e-03)
    return a if abs(a) < np.float32(0.0004) else x * p / q


tanh32 = numba.vectorize(tanh32_scalar.py_func)  # compiled at its first call (float32 arrays)


@numba.extending.intrinsic
def double_from_bits(typingctx, n):
    # the float64 whose bits are the int64 n (2.0 ** k is (k + 1023) << 52)
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llvmlite.ir.DoubleType())
    return numba.float64(numba.int64), codegen


@numba.njit(inline="always", error_model="numpy")
def exp64(a):
    # float64 exp without libm, so that a kernel's loop vectorizes (libm's scalar exp and tanh
    # made a float64 step slower than NumPy's SIMD ones): Cephes' rational function on
    # |r| <= ln2 / 2, then 2 ** n from its bits; within 2 ulp of libm. Below -708.39 (where
    # exp is subnormal) it gives 0; a NaN stays NaN
    x = min(a, 709.08)
    n = np.floor(x * 1.4426950408889634 + 0.5)
    n = n if n > -1022.0 else -1022.0  # also a NaN's n: a number to convert
    r = x - n * 6.93145751953125e-1 - n * 1.42860682030941723212e-6
    rr = r * r
    p = r * ((1.26177193074810590878e-4 * rr + 3.02994407707441961300e-2) * rr + 9.99999999999999999910e-1)
    q = ((3.00198505138664455042e-6 * rr + 2.52448340349684104192e-3) * rr + 2.27265548208155028766e-1) * rr + 2.0
    e = (1.0 + 2.0 * p / (q - p)) * double_from_bits((np.int64(n) + 1023) << 52)
    return 0.0 if a < -708.39 else e


@numba.njit(inline="always", error_model="numpy")
def tanh64_scalar(a):
    # float64 tanh without libm (Cephes): an odd rational function for |a| <= 0.625, else
    # 1 - 2 / (exp(2|a|) + 1); both computed and one chosen, so the loop vectorizes; 2 ulp
    x = abs(a)
    big = 1.0 - 2.0 / (exp64(2.0 * min(x, 22.0)) + 1.0)
    z = a * a
    p = (-9.64399179425052238628e-1 * z - 9.92877231001918586564e1) * z - 1.61468768441708447952e3
    q = ((z + 1.12811678491632931402e2) * z + 2.23548839060100448583e3) * z + 4.84406305325125486048e3
    small = a + a * z * p / q
    return (big if a > 0.0 else -big) if x > 0.625 else small  # a NaN: small, NaN


def put(dst, src):
    dst[...] = src


@numba.extending.overload(put)
def put_row(dst, src):
    # a step's row of a stored value, written from an array of its shape, as a loop: numba's
    # slice assignment compiles the formatting of its shape-mismatch message (3.6 of a first
    # compile's 7 seconds for the LSTM's loss_and_grads)
    if isinstance(src, numba.types.Array) and src.ndim == dst.ndim:
        def copy(dst, src):
            if dst.shape != src.shape:
                raise ValueError("a row and the value stored in it differ in shape")
            for i in np.ndindex(dst.shape):
                dst[i] = src[i]
        return copy

    def assign(dst, src):
        dst[...] = src
    return assign
""" + "".join(f"""

@numba.njit
def last_{kind}{keep}(a):
    r = np.ascontiguousarray(a).reshape(-1, a.shape[-1])
    out = np.empty(r.shape[0], a.dtype)
    for i in range(r.shape[0]):
        out[i] = r[i].{kind}()
    return out.reshape(a.shape[:-1]{" + (1,)" if keep else ""})""" for kind in ("sum", "max", "min", "mean", "var") for keep in ("", "_keep"))


@dataclass
class Steps:
    """One loop moved out of a function: its lines, what it reads and what it hands back."""

    name: str
    first: int  # 0-based line of the `for` statement in the module text
    last: int  # 0-based, inclusive
    reads: list[str]
    gives: list[str]


def names(nodes, ctx) -> set[str]:
    """The plain names the nodes use in context ctx (ast.Load, ast.Store or ast.Del)."""
    return {
        n.id for node in nodes for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ctx)
    }


def loops_of(fn: ast.FunctionDef, module_names: set[str]) -> list[Steps]:
    """The top-level `for t in ...` loops of a generated function, each with the names it
    reads from before it and the names it assigns that later statements read."""
    out = []
    body = fn.body
    params = {a.arg for a in fn.args.args}
    for i, stmt in enumerate(body):
        if not (isinstance(stmt, ast.For) and isinstance(stmt.target, ast.Name) and stmt.target.id == "t"):
            continue
        if any(isinstance(n, (ast.Yield, ast.YieldFrom, ast.Return)) for n in ast.walk(stmt)):
            continue
        before = names(body[:i], ast.Store) | params
        augmented = {n.target.id for n in ast.walk(stmt) if isinstance(n, ast.AugAssign)
                     and isinstance(n.target, ast.Name)}  # x += ... reads x
        reads = ((names([stmt], ast.Load) | augmented) & before) - module_names - {stmt.target.id}
        # an iter read (range(T_x)) is evaluated before the loop: it is an argument too
        later = names(body[i + 1 :], ast.Load) | names(body[i + 1 :], ast.Del)
        gives = sorted(names(stmt.body, ast.Store) & later)
        out.append(Steps(f"{fn.name}_steps{len(out)}", stmt.lineno - 1, stmt.end_lineno - 1,
                         sorted(reads), gives))  # fmt: skip
    return out


def jit_loops(source: str) -> str:
    """The module text with each function's time loops moved into compiled functions."""
    tree = ast.parse(source)
    lines = source.split("\n")
    defs = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    module_names = {n.name for n in defs} | names([n for n in tree.body if not isinstance(n, ast.FunctionDef)], ast.Store)
    module_names |= set(dir(builtins)) | {"np", "numba"}
    api = next(i for i, n in enumerate(defs) if n.name == "init_params")
    found = [s for fn in defs[api:] for s in loops_of(fn, module_names)]
    if not found:
        return source
    steps_defs = []
    for s in found:
        body = textwrap.dedent("\n".join(lines[s.first : s.last + 1])).split("\n")
        ret = ", ".join(s.gives) + ("," if len(s.gives) == 1 else "") if s.gives else "None"
        steps_defs.append("\n".join(
            ["@native", f"def {s.name}({', '.join(s.reads)}):"]
            + ["    " + ln if ln.strip() else ln for ln in body]
            + [f"    return {ret}"]
        ))  # fmt: skip
    # each loop becomes a call, from the last so that line numbers hold
    for s in reversed(found):
        line = lines[s.first]
        call = f"{s.name}({', '.join(s.reads)})"
        if s.gives:
            call = f"{', '.join(s.gives)}{',' if len(s.gives) == 1 else ''} = {call}"
        lines[s.first : s.last + 1] = [line[: len(line) - len(line.lstrip())] + call]
    text = "\n".join(lines)
    at = text.index("\ndef init_params(")
    helpers = sorted(n.name for n in defs if n.lineno - 1 < text[:at].count("\n"))
    def literal(names: list[str]) -> str:  # sorted: the same text in every process
        return "{" + ", ".join(map(repr, sorted(names))) + "}"

    table = "\n".join([
        "NATIVE = {}  # a loop's name -> True: it ran compiled; False: as Python (NATIVE_WHY)",
        "NATIVE_WHY = {}",
        f"HELPERS = {literal(helpers)}  # what a compiled loop may call",
        f"SCALAR = {literal(scalar_names())}  # functions of numbers",
    ])  # fmt: skip
    return text[:at] + "\n" + "\n\n\n".join([table, RUNTIME, *steps_defs]) + "\n\n" + text[at:]


# the CUDA prelude's device functions as Python scalar functions: a fused kernel's statements
# run unchanged, compiled by numba (sigmoid_ through tanh where it is float32: SIMD, no libm)
SCALAR_PRELUDE = """def R(x):
    return x


def pick_(m, a, b):
    return a if m else b


def tanh(x):
    return np.tanh(x)


def exp(x):
    return np.exp(x)


def expm1(x):
    return np.expm1(x)


def log(x):
    return np.log(x)


def log1p(x):
    return np.log1p(x)


def sqrt(x):
    return np.sqrt(x)


def fabs(x):
    return abs(x)


def fmin(a, b):
    return b if a != a or b < a else a


def fmax(a, b):
    return b if a != a or b > a else a


def sigmoid_(x):
    e = np.exp(-abs(x))
    return (e if x < 0.0 else 1.0) / (1.0 + e)


def sigmoid32_(x):
    # 0.5 + 0.5 tanh(x / 2) in float32, without a branch, so that a kernel's loop vectorizes
    # (a branch to exp for x < -8 made the LSTM step's kernel 6x slower): absolute error at
    # most 1.2e-7, which is all of sigmoid's value below x = -16 (it never reaches 0)
    return 0.5 + 0.5 * np.tanh(0.5 * x)


def sigmoid64_(x):
    # float64 sigmoid through exp64 (no libm: the loop vectorizes), as sigmoid_ computes it
    e = exp64(-abs(x))
    return (e if x < 0.0 else 1.0) / (1.0 + e)


def relu_(x):
    return x if x > 0.0 or x != x else 0.0 * x


def softplus_(x):
    return max(x, 0.0) + np.log1p(np.exp(-abs(x)))


def elu_(x, a):
    return x if x > 0.0 else a * np.expm1(x)


def leaky_(x, a):
    return x if x > 0.0 else a * x


def hard_sigmoid_(x):
    y = 0.2 * x + 0.5
    return 0.0 * y if y < 0.0 else (1.0 + 0.0 * y if y > 1.0 else y)


def step_(x):
    return 1.0 + 0.0 * x if x > 0.0 else 0.0 * x


def max_(a, b):
    return a if a != a or a >= b else b


def sign_(x):
    return 1.0 + 0.0 * x if x > 0.0 else (-1.0 + 0.0 * x if x < 0.0 else x)


def elu_d_(x, a):
    return 1.0 + 0.0 * x if x > 0.0 else a * np.exp(x)


def leaky_d_(x, a):
    return 1.0 + 0.0 * x if x > 0.0 else a + 0.0 * x


def hard_sigmoid_d_(x):
    return 0.2 + 0.0 * x if abs(x) < 2.5 else 0.0 * x


def flat(a):
    # a kernel's array as one row of numbers (a copy only where a view is strided)
    return np.ascontiguousarray(a).reshape(-1)"""


def scalar_names() -> list[str]:
    return sorted(n.name for n in ast.parse(SCALAR_PRELUDE).body if isinstance(n, ast.FunctionDef))


def number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def python_kernel(k: Kernel) -> str:
    """A fused kernel's CUDA source as a Python function over its B * width elements: the
    same statements, a loop over (sequence, column) where CUDA has a thread for each. A kernel
    that reduces over a row (row_sum_, row_max_: the block's threads together) runs in phases
    split at each reduction: a loop over the columns fills `part`, the reduction sums it, the
    next loop goes on; a column's value that a later phase reads is kept in `<name>_j[j]`."""
    params = [a.name for a in k.args] + (["more"] if k.ahead else []) + ["n"]
    phases: list[list[str]] = [[]]
    reductions: list[str] = []
    for line in k.source.split("\n")[4:-1]:
        text = line.strip()
        if text.startswith("__shared__"):
            continue
        if text.startswith("//"):
            phases[-1].append("# " + text[2:].strip())
            continue
        text = text.rstrip(";")
        guards = []
        while text.startswith("if ("):
            cond, text = text[4:].split(") ", 1)
            guards.append(cond)
        if text.startswith("const real "):
            text = text[len("const real ") :]
        text = re.sub(r"R\(([^()]*)\)", lambda m: repr(float(m[1])) if number(m[1]) else m[1], text)
        red = re.fullmatch(r"(\w+) = row_(sum|max)_\((.*), rnnc_red\)", text)
        if red:  # the phase ends: its columns' parts, then one number for the row
            phases[-1].append(f"part[j] = {red[3]}")
            reductions.append(f"{red[1]} = part.{red[2]}()")
            phases.append([])
            continue
        phases[-1].append(f"if {' and '.join(guards)}:\n    {text}" if guards else text)
    defined = [{m[1] for ln in ph for m in [re.match(r"(\w+) = ", ln)] if m} for ph in phases]
    # a column's value read in a later phase: kept per column
    kept = sorted({v for i, names in enumerate(defined) for v in names
                   if any(re.search(rf"\b{v}\b", ln) for ph in phases[i + 1 :] for ln in ph)})  # fmt: skip
    out = [f"def {k.name}({', '.join(params)}):"]
    first_out = next(a.name for a in k.args if a.out)
    if len(phases) > 1:
        out.append(f"    part = np.empty({k.width}, {first_out}.dtype)")
        out += [f"    {v}_j = np.empty({k.width}, {first_out}.dtype)" for v in kept]
    out.append(f"    for b in range(n // {k.width}):")
    for i, ph in enumerate(phases):
        out.append(f"        for j in range({k.width}):")
        for ln in ph:
            if i:  # an earlier phase's column values
                ln = re.sub(r"\b(" + "|".join(kept) + r")\b(?! = )", r"\1_j[j]", ln) if kept else ln
            for piece in ln.split("\n"):
                out.append("            " + piece)
            m = re.match(r"(\w+) = ", ln)
            if m and m[1] in kept:
                out.append(f"            {m[1]}_j[j] = {m[1]}")
        if i < len(reductions):
            out.append("        " + reductions[i])
    return "\n".join(out)


class NativeTarget(CupyTarget):
    """The NumPy target's code, each step's pointwise work fused into kernels (fuse.py, as for
    the GPU) written as Python loops over (sequence, column), and each time loop compiled with
    its kernels by numba."""

    name, xp = "native", "np"
    running = False  # kernels read and write rows of the adjoints' arrays (two rows: paired)
    texts = (NATIVE_IMPORTS, RUNTIME, SCALAR_PRELUDE, "NATIVE = NATIVE_WHY = HELPERS = SCALAR = None")

    # host arrays: helpers, parameters and carries as the NumPy target has them
    helper, prologue, param = NumpyTarget.helper, NumpyTarget.prologue, NumpyTarget.param

    def rewrite(self, line: str) -> str:
        return re.sub(r"\bcp\.", "np.", line)

    def module(self, header: str, meta: str, body: str, helpers, kernels: list) -> str:
        code = meta + "\n\n\n" + INIT_PARAMS + "\n\n\n" + body + "\n"
        used = [k for k in kernels if re.search(rf"\b{k.name}\(", body)]
        parts = [helpers(code), SCALAR_PRELUDE] + [python_kernel(k) for k in used]
        text = f"{header}\n\n{NATIVE_IMPORTS}\n\n" + "\n\n\n".join(parts) + f"\n\n\n{code}"
        return jit_loops(text)

    def kernel_arg(self, em: Any, a, loop) -> str:
        """A number as a Python float; an array as one flat row of numbers (written ones are
        rows of C arrays); a length mask's row as the CuPy target passes it."""
        if a.mask:
            return super().kernel_arg(em, a, loop)
        row = self.row(em, a.node, a.delay, loop, a)
        return f"float({row})" if a.kind == "value" else f"{row}.reshape(-1)" if a.out else f"flat({row})"

    def launch_call(self, em: Any, k: Kernel, loop) -> str:
        """The kernel's Python function, called over B * width elements."""
        args = [self.kernel_arg(em, a, loop) for a in k.args] + (["int(tn != t)"] if k.ahead else [])
        return f"{k.name}({', '.join(args)}, B * {k.width})"

    def accumulate(self, em: Any, acc: Accumulate, loop, seen: set) -> None:
        """into += x @ W.T (or x @ W): the GEMM adds its product into the row the kernel before
        filled with the partial sum."""
        g = em.g
        for n in (acc.gemm, acc.into):
            em.comment(n, "        ", seen)
        w, x = [em.operand(u, k, loop)[0] for u, k in operands(g, acc.gemm)]
        trans = ".T" if "'N', 'T'" in OPS[g.nodes[acc.gemm]["op"]].accumulate else ""
        em.lines.append(f"        {self.row(em, acc.into, 0, loop)} += {x} @ {w}{trans}")
