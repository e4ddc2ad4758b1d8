"""The CuPy target: the NumPy target's array code on the device (CuPy mirrors NumPy), each
loop body's pointwise work as generated CUDA kernels (fuse.py), launched with one call a
step, and cuBLAS GEMMs that add into a kernel's row. What lowering asks a target, this
module answers for the GPU; see target_numpy.py for the interface."""

from __future__ import annotations

import re
from typing import Any

from .fuse import Accumulate, Arg, Kernel, loop_kernels
from .graph import is_seq, operands
from .interpret import context
from .ops import CUDA_PRELUDE, OPS
from .schedule import Loop, Plan
from .target_numpy import NumpyTarget

HOST_HELPERS = ("initialize", "check_data")  # run on the host in the CuPy target too (NumPy's
# generator; shapes only)

CUPY_LAUNCH = """@functools.cache
def kernel(name, real):
    # one compile per kernel and dtype (CuPy also caches the binary on disk)
    return cp.RawKernel(f"typedef {real} real;\\n" + PRELUDE + KERNELS[name], name)


def launch(name, n, dt, *args, block=128):
    # n threads: one per (sequence, column), in blocks of `block` (a kernel that reduces over
    # rows has a block per sequence); arrays are passed as pointers to their first element
    k = kernel(name, "float" if dt == np.float32 else "double")
    args = tuple(cp.ascontiguousarray(a) if isinstance(a, cp.ndarray) else a for a in args)
    k(((n + block - 1) // block,), (block,), args + (np.int32(n),))"""

INIT_PARAMS_CUPY = '''def init_params(seed=0, dtype=np.float32):
    """Fresh parameters on the device, reproducible from `seed` (the NumPy target's values)."""
    rng = np.random.default_rng(seed)
    return {k: cp.asarray(initialize(rng, s, kind, a).astype(dtype))
            for k, (s, kind, a) in PARAMS.items()}'''


def to_cupy(line: str) -> str:
    return re.sub(r"\bnp\.", "cp.", line)


class CupyTarget(NumpyTarget):
    name, xp = "cupy", "cp"
    running = False  # kernels read and write rows of the adjoints' arrays:
    paired = True  # two rows of a running adjoint, t % 2
    texts = (CUPY_LAUNCH, "import functools\nimport cupy as cp\nfrom cupy import cublas\nPRELUDE = KERNELS = None")

    def fuse(self, plan: Plan, fname: str, namer) -> dict[int, list]:
        """Each loop body as array code, kernels and accumulating GEMMs."""
        return loop_kernels(plan, fname, namer)

    def rewrite(self, line: str) -> str:
        return to_cupy(line)

    def helper(self, name: str, source: str) -> str:
        return source if name in HOST_HELPERS else to_cupy(source)

    def prologue(self) -> list[str]:  # a carry may come from the host (a checkpoint)
        return [
            "    carry = None if carry is None else {k: cp.asarray(v, dt) for k, v in carry.items()}"
        ]

    def param(self, binding: str) -> str:
        # parameters may arrive as NumPy arrays (a checkpoint): copy them over once
        return binding.replace("= params[", "= cp.asarray(params[", 1) + ")"

    def module(self, header: str, meta: str, body: str, helpers, kernels: list[Kernel]) -> str:
        code = meta + "\n\n\n" + INIT_PARAMS_CUPY + "\n\n\n" + body + "\n"
        imports = "import cupy as cp\nimport numpy as np\n"
        if "cublas.gemm(" in code:
            imports += "from cupy import cublas\n"
        return (f"{header}\n\nimport functools\n\n{imports}\n\n"
                f"{helpers(code)}\n\n\n{cuda_section(kernels)}\n\n\n{code}")  # fmt: skip

    def before_loop(self, em: Any, items: list, T: str) -> None:
        for k in (j for i in items if isinstance(i, Kernel) for j in (i.ahead, i) if j):
            self.kernel_buffers(em, k, T)

    def loop_start(self, em: Any, items: list, loop: Loop, T: str, seen: set) -> None:
        for k in (k for k in items if isinstance(k, Kernel) and k.ahead):
            self.first_step(em, k, loop, T, seen)

    def item(self, em: Any, item: Any, loop: Loop, seen: set) -> None:
        if isinstance(item, Kernel):
            self.launch(em, item, loop, seen)
        else:
            self.accumulate(em, item, loop, seen)

    def kernel_buffers(self, em: Any, k: Kernel, T: str) -> None:
        """A per-step buffer for each kernel result that is not kept for every step; and the
        length masks the kernel reads, all true when no lengths are given."""
        for a in k.args:
            if a.out and a.node not in em.plan.stored:
                shape = tuple(em.g.nodes[a.node]["shape"])
                if a.node in two_rows(em):
                    line = f"    {em.name(a.node)}_rows = cp.empty((2, B) + {shape!r}, dt)"
                else:
                    line = f"    {em.name(a.node)}_t = cp.empty((B,) + {shape!r}, dt)"
                if line not in em.lines:
                    em.lines.append(line)
            if a.mask:
                V = em.mask_name(a.node, a.delay)
                line = f"    {V}_all = cp.ones(({T}, B), bool) if {V} is None else {V}"
                if line not in em.lines:
                    em.lines.append(line)

    def row(self, em: Any, u: int, k: int, loop: Loop, a: Arg | None = None) -> str:
        """The array a kernel reads for u at t-k: a row of its buffer, or this step's value.
        For an argument `ahead`, k counts from the next step, `tn`."""
        g = em.g
        d = g.nodes[u]
        if not is_seq(d["level"]):
            return em.name(u) if d["op"] != "const" else repr(d["attrs"]["value"])
        here = em.loops.get(u) == em.loop_ids[id(loop)]
        t = "tn" if a is not None and a.ahead else "t"
        if here and u in two_rows(em) and a is not None and a.out:
            return f"{em.name(u)}_rows[{t} % 2]"
        if here and u not in em.plan.stored and k == (loop.direction if t == "tn" else 0):
            return f"{em.name(u)}_t"
        past = em.plan.pads.get(u, (0, 0))[0]
        return em.row_text(u, t, past - k)

    def launch(self, em: Any, k: Kernel, loop: Loop, seen: set) -> None:
        for n in k.nodes:
            em.comment(n, "        ", seen)
        if k.ahead:
            T = context(em.g, loop.nodes[0])["T"]
            step = f"min(t + 1, {T} - 1)" if loop.direction > 0 else "max(t - 1, 0)"
            em.lines.append(f"        tn = {step}  # the next step")
        em.lines.append("        " + self.launch_call(em, k, loop))
        # array code later in the step reads a stored result as this step's row
        for a in k.args:
            if a.out and not a.ahead and a.node in em.plan.stored and self.read_later(em, a.node, k, loop):
                past = em.plan.pads.get(a.node, (0, 0))[0]
                em.lines.append(f"        {em.name(a.node)}_t = {em.row_text(a.node, 't', past)}")

    def launch_call(self, em: Any, k: Kernel, loop: Loop) -> str:
        """launch(name, threads, dt, *the rows and values k reads and writes)."""
        args = [self.kernel_arg(em, a, loop) for a in k.args]
        if k.ahead:
            args.append("np.int32(tn != t)")
        if k.rows:  # a block of threads per sequence: they reduce over its row together
            args.append(f"block={k.width}")
        return f"launch({k.name!r}, B * {k.width}, dt, {', '.join(args)})"

    def kernel_arg(self, em: Any, a: Arg, loop: Loop) -> str:
        """What a launch passes for one kernel argument: the step's row of a length mask, a
        number, or the row of an array."""
        if a.mask:
            return f"{em.mask_name(a.node, a.delay)}_all[{'tn' if a.ahead else 't'}]"
        if a.kind == "value":
            return f"dt.type(float({self.row(em, a.node, a.delay, loop, a)}))"
        return self.row(em, a.node, a.delay, loop, a)

    def first_step(self, em: Any, host: Kernel, loop: Loop, T: str, seen: set) -> None:
        """The kernel whose work each step does for the next one (fuse.rotated) runs on its
        own for the first step; then this step's results are read from where it wrote them."""
        k = host.ahead
        for n in k.nodes:
            em.comment(n, "        ", seen)
        first = "0" if loop.direction > 0 else f"{T} - 1"
        em.lines.append(f"        if t == {first}:  # later steps get these from the step before")
        em.lines.append("            " + self.launch_call(em, k, loop))
        for a in k.args:
            if not a.out:
                continue
            name = em.name(a.node)
            if a.node in two_rows(em):
                em.lines.append(f"        {name}_t = {name}_rows[t % 2]")
            elif self.read_later(em, a.node, k, loop):
                past = em.plan.pads.get(a.node, (0, 0))[0]
                em.lines.append(f"        {name}_t = {em.row_text(a.node, 't', past)}")

    def accumulate(self, em: Any, acc: Accumulate, loop: Loop, seen: set) -> None:
        """into = partial + W·x: the GEMM adds its product into the row the kernel before
        filled with `partial` (cuBLAS with beta = 1; no kernel for the add)."""
        g = em.g
        for n in (acc.gemm, acc.into):
            em.comment(n, "        ", seen)
        texts = [em.operand(u, k, loop)[0] for u, k in operands(g, acc.gemm)]
        out = self.row(em, acc.into, 0, loop)
        em.lines.append(
            "        " + OPS[g.nodes[acc.gemm]["op"]].accumulate.format(*texts, out=out)
        )

    def read_later(self, em: Any, n: int, k: Kernel, loop: Loop) -> bool:
        mine = set(k.nodes)
        body = set(loop.nodes)
        return any(v in body and v not in mine and e["delay"] == 0 and not em.in_kernel(v)
                   for _, v, e in em.g.out_edges(n, data=True))  # fmt: skip


def two_rows(em: Any) -> set[int]:
    """Kernel results made one step ahead and kept for no later step: two rows of them,
    this step's and the next one's."""
    return {a.node for k in em.kernels if k.ahead for a in k.args
            if a.out and a.ahead and a.node not in em.plan.stored}  # fmt: skip


def cuda_section(kernels: list[Kernel]) -> str:
    """The kernels' CUDA source, compiled on first use for the parameters' dtype."""
    parts = [f'PRELUDE = r"""{CUDA_PRELUDE}"""', "", "KERNELS = {"]
    for k in kernels:
        parts.append(f'    {k.name!r}: r"""\n{k.source}\n""",')
    parts.append("}")
    return "\n".join(parts) + "\n\n\n" + CUPY_LAUNCH
