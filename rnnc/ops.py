"""The op registry: each op's shape rule, level rule, VJP and NumPy lowering, in one entry.

Every graph node names an op here. An entry holds:
  shape(*operand_shapes, **attrs) -> shape | None   None: not enough known yet (shapes.py retries)
  level(*operand_levels, **attrs) -> level           GLOBAL (no batch axis), STATIC (per sequence)
                                                     or a time domain's name (per step)
  vjp(g, y, *operands, **attrs) -> [cotangent | None per operand]
                                  g, y and operands are graph.Sym handles whose operators add
                                  nodes, so a gradient is a graph in the same IR
  numpy: a template over operands {0} {1} ..., {args} (variadic), attrs by name, and the
         context {M} (the step mask of the op's domain), {T}, {t}, {B}, {dt}, {rng}
  cuda:  the same for one element in CUDA C, operands being scalars of type `real` (float or
         double); an elementwise op with one fuses into the per-step kernels (fuse.py), and
         the device functions it calls live in CUDA_PRELUDE
  cuda_row: for a reduction over the features (sum, mean, layernorm and its adjoint), the
         texts at the columns a thread holds, written with sums over the row's threads; such
         a kernel runs a block of threads per sequence
Ops used only inside gradients have vjp=None with a comment: rnnc takes first derivatives.
This module imports nothing from rnnc.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

GLOBAL, STATIC = "global", "static"
Shape = tuple[int, ...]


class ShapeError(Exception):
    """Raised by a shape rule; shapes.py adds the location and the operands' origins."""


def rank(level: str) -> int:
    return 0 if level == GLOBAL else 1 if level == STATIC else 2


def top_level(*levels: str, **attrs) -> str:
    return max(levels, key=rank) if levels else GLOBAL


@dataclass(frozen=True)
class Op:
    name: str
    arity: int | None  # None: variadic
    shape: Callable[..., Shape | None]
    numpy: str
    vjp: Callable[..., list[Any]] | None = None
    level: Callable[..., str] = top_level
    kind: str = "pointwise"  # 'pointwise' (per step) | 'collective' (whole sequence) | 'leaf'
    domain: str = "real"  # where tests sample operands: real | positive | away0 | unit
    smooth: bool = True  # False: a kink (relu); gradient checks sample away from it
    int_out: bool = False  # the value is a class index, not a real vector
    labels: bool = False  # operand 1 holds class labels (the fused cross-entropies)
    user: bool = True  # callable from a spec by its name
    sep: str = ", "  # between variadic operands in {args}
    prec: int = 9  # precedence of the rendered text (9: an atom or a call)
    slots: tuple[int, ...] = ()  # the precedence each operand's text needs (default 0)
    seq: str | None = None  # the template for a whole [T, B, ...] sequence, where it differs
    cuda: str | None = None  # one element in CUDA C (type `real`): ops with one fuse into kernels
    # a reduction over a row's features inside a kernel: cuda_row(r, *operands, **attrs), each
    # operand the texts of the columns one thread holds (a list; one text for a scalar), r the
    # kernel (r.let(text) -> a name, r.sum(texts) / r.max(texts) -> the whole row's, r.width);
    # returns this op's texts at those columns, or one text for a scalar per row
    cuda_row: Callable[..., list[str] | str] | None = None
    # CuPy: a statement adding this op's value into {out} (a cuBLAS GEMM with beta = 1)
    accumulate: str | None = None
    attrs: dict[str, Any] = field(default_factory=dict)  # keyword arguments and defaults
    spelling: str | None = None  # the name a spec calls it by, where it differs from the IR's
    # ONNX: onnx(b, *operand names, **attrs) -> the value's name, b being export.py's builder
    # (b.op(type, *inputs, **attributes), b.shape: this value's feature shape, b.ints, b.f)
    onnx: Callable[..., str] | None = None
    # the sequence whose every step s the value holds (attention), from the operands' own:
    # pair(*operand_pairs, **attrs) -> a domain or None
    pair: Callable[..., str | None] | None = None


OPS: dict[str, Op] = {}


def defop(name: str, arity: int | None, shape, numpy: str, **rules) -> Op:
    """Register an op. Its rules may name only the attrs they use; the rest are not passed."""
    shape = takes_attrs(shape)
    for key in ("vjp", "level", "pair"):
        if rules.get(key) is not None:
            rules[key] = takes_attrs(rules[key])
    OPS[name] = op = Op(name, arity, shape, numpy, **rules)
    return op


def takes_attrs(fn: Callable) -> Callable:
    """Wrap a rule so that it is passed only the keyword attrs its signature names."""
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return fn
    names = {k for k, p in params.items() if p.kind is p.KEYWORD_ONLY or p.default is not p.empty}
    names |= {k for k, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD}

    @functools.wraps(fn)
    def rule(*args, **attrs):
        return fn(*args, **{k: v for k, v in attrs.items() if k in names})

    return rule


# ----- Shape rules -----


def same(*shapes: Shape | None) -> Shape | None:
    """Elementwise: equal shapes; a feature scalar () broadcasts against any vector."""
    known = [s for s in shapes if s is not None]
    big = {s for s in known if s != ()}
    if len(big) > 1:
        raise ShapeError("shapes differ: " + " vs ".join(fmt_shape(s) for s in known))
    if big:
        return big.pop()
    return () if len(known) == len(shapes) else None


def elementwise(op: Op) -> bool:
    """The op maps each feature on its own (its shape rule is `same`): it commutes with
    slicing, f(x[a:b]) == f(x)[a:b]."""
    return getattr(op.shape, "__wrapped__", op.shape) is same


def vector(s: Shape | None) -> Shape | None:
    if s is not None and len(s) != 1:
        raise ShapeError(f"expects a vector, got {fmt_shape(s)}")
    return s


def to_scalar(*shapes: Shape | None) -> Shape | None:
    return ()


def over_features(s: Shape | None) -> Shape | None:
    """A reduction over a vector's features: one number per step (or sequence)."""
    vector(s)
    return ()


def expanded(s: Shape | None, n: int = 0) -> Shape | None:
    return (n,)


def matvec(w: Shape | None, x: Shape | None) -> Shape | None:
    if w is None:
        return None
    if len(w) != 2:
        raise ShapeError(f"the left side of @ must be a matrix, got {fmt_shape(w)}")
    if x is not None:
        if len(x) != 1:
            raise ShapeError(f"the right side of @ must be a vector, got {fmt_shape(x)}")
        if x[0] != w[1]:
            raise ShapeError(
                f"{fmt_shape(w)} @ {fmt_shape(x)}: the matrix has {w[1]} columns, "
                f"the vector {x[0]} entries"
            )
    return (w[0],)


def matvec_t(w: Shape | None, g: Shape | None) -> Shape | None:
    return None if w is None else (w[1],)


def outer_shape(a: Shape | None, b: Shape | None) -> Shape | None:
    return None if a is None or b is None else (a[0], b[0])


def concat_shape(*shapes: Shape | None, axis: int = -1) -> Shape | None:
    if any(s is None for s in shapes):
        return None
    ranks = {len(s) for s in shapes}  # type: ignore[arg-type]
    if ranks != {1} and ranks != {2}:
        raise ShapeError("concat joins vectors: " + ", ".join(fmt_shape(s) for s in shapes))
    (r,) = ranks
    if axis != int(axis) or not -r <= axis < r:
        raise ShapeError(f"concat of {'vectors' if r == 1 else 'matrices'} has no axis {axis:g}"
                         f" (axis=-1 joins features)")  # fmt: skip
    axis = int(axis)
    first = list(shapes[0])  # type: ignore[arg-type]
    for s in shapes[1:]:
        for i, (a, b) in enumerate(zip(first, s, strict=True)):  # type: ignore[arg-type]
            if i != axis % len(first) and a != b:
                raise ShapeError("concat: shapes differ off the joined axis")
    first[axis] = sum(s[axis] for s in shapes)  # type: ignore[index]
    return tuple(first)


def slice_shape(s: Shape | None, start: int = 0, stop: int = 0, axis: int = -1) -> Shape | None:
    if s is None:
        return None
    n = s[axis]
    if not 0 <= start < stop <= n:
        raise ShapeError(f"slice [{start}:{stop}] is outside 0..{n} of {fmt_shape(s)}")
    out = list(s)
    out[axis] = stop - start
    return tuple(out)


def pad_shape(s: Shape | None, start: int = 0, n: int = 0, axis: int = -1) -> Shape | None:
    if s is None:
        return None
    out = list(s)
    out[axis] = n
    return tuple(out)


def first_shape(s: Shape | None, *rest: Shape | None, **attrs) -> Shape | None:
    return s


def pairs_shape(s: Shape | None) -> Shape | None:
    return None if s is None else (2 * vector(s)[0],)  # type: ignore[index]


def half_shape(g: Shape | None, h: Shape | None) -> Shape | None:
    return h


def class_loss(z: Shape | None, y: Shape | None) -> Shape | None:
    if z is not None and y is not None and z != y:
        raise ShapeError(f"{fmt_shape(z)} scores for {y[0]} classes")
    vector(z)
    return ()


def grad_like(z: Shape | None, y: Shape | None) -> Shape | None:
    return z


def fmt_shape(s: Shape | None) -> str:
    return "?" if s is None else "[" + ", ".join(map(str, s)) + "]" if s else "scalar"


# ----- Level rules -----


def to_global(*levels: str, **attrs) -> str:
    return GLOBAL


def to_static(*levels: str, **attrs) -> str:
    return STATIC


def like_second(*levels: str, **attrs) -> str:
    return levels[1]


def at_dom(*levels: str, **attrs) -> str:
    return attrs["dom"]


def reduce_level(*levels: str, **attrs) -> str:
    return attrs["level"]


# ----- Pair rules: a value per step s of another sequence (attention) -----


def common_pair(*pairs: str | None, **attrs) -> str | None:
    """Operands that hold every step s of a sequence combine only if it is the same one."""
    known = {p for p in pairs if p is not None}
    if len(known) > 1:
        raise ShapeError("combines values per step s of two different sequences: "
                         + " and ".join(sorted(known)))  # fmt: skip
    return known.pop() if known else None


def pair_of(op: Op, pairs: list[str | None], attrs: dict[str, Any], level: str | None) -> str | None:
    """A model-wide value (a weight's gradient) sums over every step s."""
    return None if level == GLOBAL else (op.pair or common_pair)(*pairs, **attrs)


# ----- Leaves: values that come from outside the graph -----
# Lowered by lower.py itself (params, inputs, targets); the templates here serve the interpreter.

defop("param", 0, lambda **a: None, "params[{name!r}]", kind="leaf", level=to_global)
defop("input", 0, lambda **a: None, "inputs[{name!r}]", kind="leaf", level=at_dom)
defop("target", 0, lambda **a: None, "targets[{name!r}]", kind="leaf", level=at_dom)
defop("state_init", 0, lambda **a: None, "state_init({state!r})", kind="leaf", level=to_static)
defop("const", 0, lambda value=0.0, **a: (), "{value!r}", kind="leaf", level=to_global)
defop("carry", 0, lambda **a: None, "carry[{state!r}][{s}]", kind="leaf", level=to_static)
defop("zeros", 0, lambda shape=(), **a: tuple(shape), "np.zeros(({B},) + {shape!r}, {dt})",
      kind="leaf", level=to_static)  # fmt: skip

# ----- Elementwise -----

defop(
    "add",
    2,
    same,
    "{0} + {1}",
    user=False,  # written as an operator; the name is the IR's
    prec=1,
    slots=(1, 2),
    vjp=lambda g, y, a, b: [g, g],
    cuda="{0} + {1}",
)
defop(
    "sub",
    2,
    same,
    "{0} - {1}",
    user=False,  # written as an operator; the name is the IR's
    prec=1,
    slots=(1, 2),
    vjp=lambda g, y, a, b: [g, -g],
    cuda="{0} - {1}",
)
defop(
    "mul",
    2,
    same,
    "{0} * {1}",
    user=False,  # written as an operator; the name is the IR's
    prec=2,
    slots=(2, 3),
    vjp=lambda g, y, a, b: [g * b, g * a],
    cuda="{0} * {1}",
)
defop("div", 2, same, "{0} / {1}", prec=2, slots=(2, 3), vjp=lambda g, y, a, b: [g / b, -(g * y) / b],
      domain="away0", cuda="{0} / {1}", user=False)  # fmt: skip
defop("neg", 1, same, "-{0}", prec=4, slots=(4,), vjp=lambda g, y, x: [-g], cuda="-{0}", user=False)
defop("identity", 1, same, "{0}", vjp=lambda g, y, x: [g], cuda="{0}")
defop(
    "sum",
    None,
    same,
    "{args}",
    prec=1,
    slots=(1, 2),
    vjp=lambda g, y, *xs: [g] * len(xs),
    user=False,
    sep=" + ",
    cuda="{args}",
)
defop("tanh", 1, same, "np.tanh({0})", vjp=lambda g, y, x: [g * (1 - y * y)], cuda="tanh({0})")
defop("sigmoid", 1, same, "sigmoid({0})", vjp=lambda g, y, x: [g * y * (1 - y)],
      cuda="sigmoid_({0})")  # fmt: skip
defop("relu", 1, same, "np.maximum({0}, 0)", vjp=lambda g, y, x: [g * x.op("step")], smooth=False,
      cuda="relu_({0})")  # fmt: skip
defop("exp", 1, same, "np.exp({0})", vjp=lambda g, y, x: [g * y], cuda="exp({0})")
defop("log", 1, same, "np.log({0})", vjp=lambda g, y, x: [g / x],
      domain="positive", cuda="log({0})")  # fmt: skip
defop("softplus", 1, same, "np.logaddexp({0}, 0)", vjp=lambda g, y, x: [g * x.op("sigmoid")],
      cuda="softplus_({0})")  # fmt: skip
defop("elu", 1, same, "elu({0}, {alpha!r})", smooth=False, attrs={"alpha": 1.0},
      vjp=lambda g, y, x, alpha: [g * x.op("elu_d", alpha=alpha)], cuda="elu_({0}, {alpha!r})")  # fmt: skip
defop("leaky_relu", 1, same, "np.where({0} > 0, {0}, {alpha!r} * {0})", smooth=False,
      attrs={"alpha": 0.01}, vjp=lambda g, y, x, alpha: [g * x.op("leaky_d", alpha=alpha)],
      cuda="leaky_({0}, {alpha!r})")  # fmt: skip
defop("hard_sigmoid", 1, same, "np.clip(0.2 * {0} + 0.5, 0, 1)", smooth=False,
      vjp=lambda g, y, x: [g * x.op("hard_sigmoid_d")], cuda="hard_sigmoid_({0})")  # fmt: skip
# derivatives of the kinked activations (used only inside gradients)
defop("step", 1, same, "step({0})", user=False, cuda="step_({0})")
defop("elu_d", 1, same, "np.where({0} > 0, 1, {alpha!r} * np.exp(np.minimum({0}, 0)))", user=False,
      cuda="elu_d_({0}, {alpha!r})")  # fmt: skip
defop("leaky_d", 1, same, "np.where({0} > 0, 1, {alpha!r})",
      user=False, cuda="leaky_d_({0}, {alpha!r})")  # fmt: skip
defop("hard_sigmoid_d", 1, same, "0.2 * (np.abs({0}) < 2.5)",
      user=False, cuda="hard_sigmoid_d_({0})")  # fmt: skip
defop("sqrt", 1, same, "np.sqrt({0})", vjp=lambda g, y, x: [g * 0.5 / y], domain="positive",
      cuda="sqrt({0})")  # fmt: skip
defop("rsqrt", 1, same, "1 / np.sqrt({0})", prec=2, vjp=lambda g, y, x: [g * (y * y * y) * -0.5],
      domain="positive", cuda="R(1) / sqrt({0})")  # fmt: skip
defop("abs", 1, same, "np.abs({0})", vjp=lambda g, y, x: [g * x.op("sign")], smooth=False,
      cuda="fabs({0})")  # fmt: skip
defop("sign", 1, same, "np.sign({0})", user=False, cuda="sign_({0})")  # only in gradients (abs)
defop("square", 1, same, "np.square({0})", vjp=lambda g, y, x: [g * x * 2.0], cuda="{0} * {0}")
# minimum/maximum: at a tie the gradient goes to the second operand
defop("minimum", 2, same, "np.minimum({0}, {1})", smooth=False,
      vjp=lambda g, y, a, b: [g * (b - a).op("step"), g * (1.0 - (b - a).op("step"))],
      cuda="fmin({0}, {1})")  # fmt: skip
defop("maximum", 2, same, "np.maximum({0}, {1})", smooth=False,
      vjp=lambda g, y, a, b: [g * (a - b).op("step"), g * (1.0 - (a - b).op("step"))],
      cuda="fmax({0}, {1})")  # fmt: skip
# clip(x, lo, hi) = minimum(maximum(x, lo), hi); lo and hi may be numbers or values
defop("clip", 3, same, "np.clip({0}, {1}, {2})", smooth=False, vjp=lambda g, y, x, lo, hi: clip_vjp(g, y, x, lo, hi),
      cuda="fmin(fmax({0}, {1}), {2})")  # fmt: skip

# The device functions the cuda templates call. `real` is float or double (a typedef put in
# front by the generated module); constants are cast so float kernels stay in float.
CUDA_PRELUDE = r"""
#define R(x) ((real)(x))
#define pick_(m, a, b) ((m) ? (a) : (b))  /* a masked read: a inside the sequence, else b */
__device__ __forceinline__ real sigmoid_(real x) {  /* no overflow, no underflow to 0 */
  real e = exp(-fabs(x));
  return (x < R(0) ? e : R(1)) / (R(1) + e);
}
__device__ __forceinline__ real relu_(real x) { return x > R(0) ? x : (x != x ? x : R(0)); }
__device__ __forceinline__ real softplus_(real x) {
  return (x > R(0) ? x : R(0)) + log1p(exp(-fabs(x)));  /* log(1 + e^x), no overflow */
}
__device__ __forceinline__ real elu_(real x, real a) { return x > R(0) ? x : a * expm1(x); }
__device__ __forceinline__ real leaky_(real x, real a) { return x > R(0) ? x : a * x; }
__device__ __forceinline__ real hard_sigmoid_(real x) {
  real y = R(0.2) * x + R(0.5);
  return y < R(0) ? R(0) : (y > R(1) ? R(1) : y);
}
__device__ __forceinline__ real step_(real x) { return x > R(0) ? R(1) : R(0); }
__device__ __forceinline__ real max_(real a, real b) { return (a != a || a >= b) ? a : b; }
/* a row's sum (or max) over the block's threads, one per thread's part; every thread of
   the block calls it and gets the total. Pairwise, in the same order on every run. */
__device__ real row_sum_(real v, real* red) {
  const int j = threadIdx.x, n = blockDim.x;
  red[j] = v;
  __syncthreads();
  for (int s = 1; s < n; s <<= 1) {
    if (j % (2 * s) == 0 && j + s < n) red[j] += red[j + s];
    __syncthreads();
  }
  const real total = red[0];
  __syncthreads();
  return total;
}
__device__ real row_max_(real v, real* red) {
  const int j = threadIdx.x, n = blockDim.x;
  red[j] = v;
  __syncthreads();
  for (int s = 1; s < n; s <<= 1) {
    if (j % (2 * s) == 0 && j + s < n) red[j] = max_(red[j], red[j + s]);
    __syncthreads();
  }
  const real top = red[0];
  __syncthreads();
  return top;
}
__device__ __forceinline__ real sign_(real x) { return x > R(0) ? R(1) : (x < R(0) ? R(-1) : x); }
__device__ __forceinline__ real elu_d_(real x, real a) { return x > R(0) ? R(1) : a * exp(x); }
__device__ __forceinline__ real leaky_d_(real x, real a) { return x > R(0) ? R(1) : a; }
__device__ __forceinline__ real hard_sigmoid_d_(real x) { return fabs(x) < R(2.5) ? R(0.2) : R(0); }
"""

# ----- Over the feature axis -----


def row_mean(r, xs: list[str]) -> str:
    return r.let(f"{r.sum(xs)} / R({r.width})")


def row_centered(r, xs: list[str]) -> list[str]:
    """x - mean(x), the first of the variance's two passes."""
    m = row_mean(r, xs)
    return [r.let(f"{x} - {m}") for x in xs]


def row_inv_root(r, xs: list[str], eps: float) -> str:
    """1 / sqrt(mean(x²) + eps), eps inside the root."""
    return r.let(f"R(1) / sqrt({r.sum([f'{x} * {x}' for x in xs])} / R({r.width}) + R({eps!r}))")


def row_layernorm(r, xs: list[str], eps: float) -> list[str]:
    cs = row_centered(r, xs)
    s = row_inv_root(r, cs, eps)
    return [f"{c} * {s}" for c in cs]


def row_layernorm_d(r, gs: list[str], ys: list[str], xs: list[str], eps: float) -> list[str]:
    s = row_inv_root(r, row_centered(r, xs), eps)
    mg = row_mean(r, gs)
    mgy = row_mean(r, [f"{g} * {y}" for g, y in zip(gs, ys, strict=True)])
    return [f"{s} * ({g} - {mg} - {y} * {mgy})" for g, y in zip(gs, ys, strict=True)]


def row_rmsnorm(r, xs: list[str], eps: float) -> list[str]:
    s = row_inv_root(r, xs, eps)
    return [f"{x} * {s}" for x in xs]


def row_rmsnorm_d(r, gs: list[str], ys: list[str], xs: list[str], eps: float) -> list[str]:
    s = row_inv_root(r, xs, eps)
    mgy = row_mean(r, [f"{g} * {y}" for g, y in zip(gs, ys, strict=True)])
    return [f"{s} * ({g} - {y} * {mgy})" for g, y in zip(gs, ys, strict=True)]


def row_var(r, xs: list[str]) -> str:
    return row_mean(r, [f"{c} * {c}" for c in row_centered(r, xs)])


defop("softmax", 1, vector, "softmax({0})",
      vjp=lambda g, y, x: [y * (g - (g * y).op("sum_f"))])  # fmt: skip
defop("log_softmax", 1, vector, "log_softmax({0})",
      vjp=lambda g, y, x: [g - y.op("exp") * g.op("sum_f")])  # fmt: skip
# reductions over the features keep the level: one number per step (or per sequence, or model)
defop("sum_f", 1, over_features, "{0}.sum(axis=-1)", slots=(9,), spelling="sum",
      cuda_row=lambda r, xs: r.sum(xs), vjp=lambda g, y, x: [g.op("expand", n=x.shape[-1])])  # fmt: skip
defop("mean", 1, over_features, "{0}.mean(axis=-1)", slots=(9,), cuda_row=row_mean,
      vjp=lambda g, y, x: [(g * (1.0 / x.shape[-1])).op("expand", n=x.shape[-1])])  # fmt: skip
defop("var", 1, over_features, "{0}.var(axis=-1)", slots=(9,), cuda_row=row_var,  # two passes
      vjp=lambda g, y, x: [(x - x.op("mean")) * (g * (2.0 / x.shape[-1])).op("expand", n=x.shape[-1])])  # fmt: skip
defop("max", 1, over_features, "{0}.max(axis=-1)", slots=(9,), smooth=False,
      cuda_row=lambda r, xs: r.max(xs), vjp=lambda g, y, x: [g.op("expand", n=x.shape[-1]) * x.op("max_mask")])  # fmt: skip
defop("min", 1, over_features, "{0}.min(axis=-1)", slots=(9,), smooth=False,
      cuda_row=lambda r, xs: f"-{r.max([f'-({x})' for x in xs])}", vjp=lambda g, y, x: [g.op("expand", n=x.shape[-1]) * x.op("min_mask")])  # fmt: skip
defop("expand", 1, expanded, "expand({0}, {n})", user=False, cuda="{0}")  # only in gradients (reductions)
defop("max_mask", 1, same, "max_mask({0})", user=False)  # only in gradients (max)
defop("min_mask", 1, same, "min_mask({0})", user=False)  # only in gradients (min)
# normalization over the features, each with one fused adjoint; gain and bias as the spec writes
defop("layernorm", 1, vector, "layernorm({0}, {eps!r})", attrs={"eps": 1e-5},
      cuda_row=row_layernorm, vjp=lambda g, y, x, eps: [g.op("layernorm_d", y, x, eps=eps)])  # fmt: skip
defop("layernorm_d", 3, first_shape, "layernorm_d({0}, {1}, {2}, {eps!r})", user=False,
      cuda_row=row_layernorm_d)  # fmt: skip
defop("rmsnorm", 1, vector, "rmsnorm({0}, {eps!r})", attrs={"eps": 1e-5},
      cuda_row=row_rmsnorm, vjp=lambda g, y, x, eps: [g.op("rmsnorm_d", y, x, eps=eps)])  # fmt: skip
defop("rmsnorm_d", 3, first_shape, "rmsnorm_d({0}, {1}, {2}, {eps!r})", user=False,
      cuda_row=row_rmsnorm_d)  # fmt: skip
defop("concat", None, concat_shape, "np.concatenate(({args},), axis={axis})", attrs={"axis": -1},
      vjp=lambda g, y, *xs, axis=-1: concat_vjp(g, xs, axis))  # fmt: skip
defop("slice", 1, slice_shape, "{0}[..., {start}:{stop}]", slots=(9,), user=False, attrs={"axis": -1},
      vjp=lambda g, y, x, start, stop: [g.op("pad", start=start, n=x.shape[-1], axis=-1)])  # fmt: skip
defop("slice_rows", 1, lambda s, start=0, stop=0, axis=-2: slice_shape(s, start, stop, -2),
      "{0}[..., {start}:{stop}, :]", slots=(9,), user=False, attrs={"axis": -2},
      vjp=lambda g, y, x, start, stop: [g.op("pad", start=start, n=x.shape[-2], axis=-2)])  # fmt: skip
defop("pad", 1, pad_shape, "pad({0}, {start}, {n}, {axis})", user=False,
      vjp=lambda g, y, x, start, n, axis: [g.op("slice" if axis == -1 else "slice_rows",
                                               start=start, stop=start + x.shape[axis])])  # fmt: skip


def clip_vjp(g, y, x, lo, hi):
    """y = minimum(maximum(x, lo), hi), as np.clip (so hi wins where lo > hi)."""
    above_lo, below_hi = (x - lo).op("step"), (hi - y).op("step")
    return [g * above_lo * below_hi, g * (1.0 - above_lo) * below_hi, g * (1.0 - below_hi)]


def concat_vjp(g, xs, axis):
    out, start = [], 0
    for x in xs:
        n = x.shape[axis]
        out.append(g.op("slice" if axis == -1 else "slice_rows", start=start, stop=start + n))
        start += n
    return out


# ----- Linear algebra -----

# prec 2: Python's @ binds like * and / (left to right), so `a * (x @ W.T)` keeps its parentheses
defop("matmul", 2, matvec, "{1} @ {0}.T", prec=2, slots=(9, 3), seq="linear({1}, {0})",
      vjp=lambda g, y, w, x: [g.op("outer", x), w.op("matmul_t", g)],
      accumulate="cublas.gemm('N', 'T', {1}, {0}, out={out}, beta=1.0)", user=False)  # fmt: skip
# matmul_t(W, g) = W^T g, and outer(g, x) = Σ over time and batch of g ⊗ x: only in gradients
defop("matmul_t", 2, matvec_t, "{1} @ {0}", prec=2, slots=(9, 3), level=like_second, user=False,
      seq="linear_t({1}, {0})", accumulate="cublas.gemm('N', 'N', {1}, {0}, out={out}, beta=1.0)")  # fmt: skip
defop("outer", 2, outer_shape, "outer({0}, {1})", level=to_global, user=False)
# the adjoint of a value the loss reaches through no differentiable path: zeros like it
defop("zeros_like", 1, first_shape, "np.zeros_like({0})", user=False)
# a model-wide value (a param h0) as one value per sequence: a learned initial state
defop("batch", 1, first_shape, "np.broadcast_to({0}, ({B},) + {0}.shape)", level=to_static,
      user=False, vjp=lambda g, y, x: [g.op("reduce_to", keep=len(x.shape), level=GLOBAL)])  # fmt: skip
defop("reduce_to", 1, first_shape, "reduce_to({0}, {keep})", level=reduce_level, user=False)

def over_s(over, causal, t=None) -> dict[str, Any]:
    """The attrs of a reduction over s and its adjoint: the same steps count (an unrolled
    step's copy also keeps its t)."""
    return {"over": over, "causal": causal, **({"t": t} if t is not None else {})}


# Attention. `e[s]` (every) is the whole of sequence e as one value per sequence, an array
# [S, B, ...] whose leading axis is e's steps; what combines it with a value per step t holds
# [S, B, ...] at each t ([T, S, B, ...] over the whole sequence), and a reduction `over=s`
# (masked by e's lengths; causal, s <= t, where e runs on the reader's own clock) brings it
# back to [B, ...]. `over` names e's domain, `causal` says s <= t.
defop("every", 1, first_shape, "{0}", level=to_static, kind="collective", user=False,
      pair=lambda x, over: over, vjp=lambda g, y, x, over: [g.op("unevery", over=over)])  # fmt: skip
defop("unevery", 1, first_shape, "{0}", level=lambda x, over: over, kind="collective", user=False,
      pair=lambda x, over: None)  # fmt: skip
defop("sum_s", 1, first_shape, "sum_s({0}, {Mo}, {r}, {upto})", user=False, pair=lambda x, **a: None,
      attrs={"over": None, "causal": False},
      vjp=lambda g, y, x, over, causal, t=None: [g.op("bcast_s", **over_s(over, causal, t))])  # fmt: skip
# the adjoint of sum_s: a copy at every step s that counts (S = the attended sequence's steps)
defop("bcast_s", 1, first_shape, "bcast_s({0}, {To}, {Mo}, {r}, {upto})", user=False,
      pair=lambda g, over, **a: over, attrs={"over": None, "causal": False},
      vjp=lambda g, y, x, over, causal, t=None: [g.op("sum_s", **over_s(over, causal, t))])  # fmt: skip
defop("softmax_s", 1, first_shape, "softmax_s({0}, {Mo}, {r}, {upto})", user=False,
      attrs={"over": None, "causal": False},
      vjp=lambda g, y, x, over, causal, t=None: [
          y * (g - (g * y).op("sum_s", **over_s(over, causal, t)).op("bcast_s", **over_s(over, causal, t)))])  # fmt: skip
# the unrolled DAG's forms: every step's copy stacked, and the adjoint's row i back
defop("stack", None, first_shape, "np.stack(({args},))", level=to_static, kind="collective",
      user=False, pair=lambda *xs, over: over,
      vjp=lambda g, y, *xs, over: [g.op("unstack", i=i) for i in range(len(xs))])  # fmt: skip
defop("unstack", 1, first_shape, "{0}[{i}]", slots=(9,), user=False, pair=lambda x, i: None)

# ----- Losses (each reduced to one number: sum or mean over time, mean over the batch) -----

defop("ce_logits", 2, class_loss, "ce_logits({0}, {1})", user=False, labels=True,
      vjp=lambda g, y, z, c: [g * z.op("ce_logits_d", c), None])  # fmt: skip
defop("ce_logits_d", 2, grad_like, "ce_logits_d({0}, {1})", user=False)
defop("ce_probs", 2, class_loss, "ce_probs({0}, {1})", user=False, domain="unit", labels=True,
      vjp=lambda g, y, p, c: [g * p.op("ce_probs_d", c), None])  # fmt: skip
defop("ce_probs_d", 2, grad_like, "ce_probs_d({0}, {1})", user=False)
# cross_entropy(sigmoid(z), y) fused: -log σ(z[y]) = softplus(-z[y]), exact where σ underflows
defop("ce_sigmoid", 2, class_loss, "ce_sigmoid({0}, {1})", user=False, labels=True,
      vjp=lambda g, y, z, c: [g * z.op("ce_sigmoid_d", c), None])  # fmt: skip
defop("ce_sigmoid_d", 2, grad_like, "ce_sigmoid_d({0}, {1})", user=False)
defop("sqerr", 2, lambda a, b: same(a, b) and (), "((({0}) - ({1})) ** 2).mean(axis=-1)",
      vjp=lambda g, y, a, b: sqerr_vjp(g, a, b), user=False)  # fmt: skip
defop("loss_reduce", 1, to_scalar, "loss_reduce({0}, {M}, {mode!r}, {window})", level=to_global,
      kind="collective", user=False,
      vjp=lambda g, y, per_step, mode, dom: [g.op("loss_spread", per_step, mode=mode, dom=dom)])  # fmt: skip
defop("loss_spread", 2, half_shape, "loss_spread({0}, {1}, {M}, {mode!r}, {window})", level=like_second,
      kind="collective", user=False)  # fmt: skip


def sqerr_vjp(g, a, b):
    d = (a - b) * (2.0 / a.shape[-1])
    return [g * d, -(g * d)]


# ----- Time: whole-sequence ops -----
# `dom` names the time domain an op produces or reads; the mask {M} is that domain's.

defop("last", 1, first_shape, "last_step({0}, {M})", level=to_static, kind="collective",
      vjp=lambda g, y, h, dom: [g.op("on_last", h, dom=dom)])  # fmt: skip
defop("first", 1, first_shape, "{0}[0]", slots=(9,), level=to_static, kind="collective",
      vjp=lambda g, y, h, dom: [g.op("on_first", h, dom=dom)])  # fmt: skip
defop("on_last", 2, half_shape, "on_last({0}, {1}, {M})", level=like_second, kind="collective",
      vjp=lambda g, y, v, h, dom: [g.op("last", dom=dom), None], user=False)  # fmt: skip
defop("on_first", 2, half_shape, "on_first({0}, {1})", level=like_second, kind="collective",
      vjp=lambda g, y, v, h, dom: [g.op("first", dom=dom), None], user=False)  # fmt: skip
# first(v) of a per-sequence v: v enters at step 0 only (image captioning)
defop("impulse", 1, first_shape, "on_first_T({0}, {T}, {carried})", level=at_dom, kind="collective",
      vjp=lambda g, y, v, dom: [g.op("first", dom=dom)], user=False)  # fmt: skip
defop("pairs", 1, pairs_shape, "pairs({0})", level=at_dom, kind="collective",
      vjp=lambda g, y, h, dom: [g.op("unpairs", h)])  # fmt: skip
defop("unpairs", 2, half_shape, "unpairs({0}, {1})", level=like_second, kind="collective",
      user=False)  # fmt: skip
defop("edge_sum", 1, first_shape, "edge_sum({0}, {k}, {M}, {carried})", level=to_static,
      kind="collective", user=False)  # adjoint of an initial state read at delay k  # fmt: skip

# ----- The unrolled reference's forms of the time ops (unroll.py emits them per step) -----

defop("loss_step", 1, to_scalar, "loss_step({0}, {M}, {T}, {t}, {mode!r})", level=to_global,
      user=False,
      vjp=lambda g, y, per_step, t, mode, dom: [g.op("loss_step_d", per_step, t=t, mode=mode, dom=dom)])  # fmt: skip
defop("loss_step_d", 2, half_shape, "loss_step_d({0}, {1}, {M}, {T}, {t}, {mode!r})",
      level=like_second, user=False)  # fmt: skip
defop("select_valid", 2, same, "select_valid({0}, {1}, {M}, {t}, {s})", user=False,
      vjp=lambda g, y, u, f, t, s, dom: [g.op("where_valid", t=t, s=s, inside=True, dom=dom),
                                         g.op("where_valid", t=t, s=s, inside=False, dom=dom)])  # fmt: skip
defop("where_valid", 1, same, "where_valid({0}, {M}, {t}, {s}, {inside})", user=False)
defop("pick_last", None, same, "pick_last([{args}], {M})", level=to_static, user=False,
      vjp=lambda g, y, *hs, dom: [g.op("at_last", t=t, dom=dom) for t in range(len(hs))])  # fmt: skip
defop("at_last", 1, same, "at_last({0}, {M}, {T}, {t})", user=False)

# ----- Randomness: dropout and zoneout read a mask, a leaf the compiled module fills -----
# The mask of `dropout(x, p)` is 1/(1-p) or 0 per feature, of `zoneout(h, p)` 1 (keep the
# previous value) or 0; drawn per step, or per sequence (`per=sequence`); in evaluation
# (no rng) dropout's mask is 1 and zoneout's is p, its expectation. Gradients are exact for
# the drawn mask; the mask is an operand of the fused kernels, not a pass of its own.

defop("mask", 0, lambda **a: None, "inputs[{name!r}]", kind="leaf", level=lambda **a: STATIC)
defop("dropout", 2, same, "{0} * {1}", prec=2, slots=(2, 3), attrs={"p": 0.5},
      vjp=lambda g, y, x, m: [g * m, None], cuda="{0} * {1}")  # fmt: skip
# zoneout(h, p) inside `h = ...`: each unit keeps h[t-1] where the mask is 1
defop("zoneout", 3, same, "{2} * {1} + (1 - {2}) * {0}", prec=1, attrs={"p": 0.1},
      vjp=lambda g, y, new, old, m: [g * (1.0 - m), g * m, None],
      cuda="{2} * {1} + (R(1) - {2}) * {0}")  # fmt: skip
NOISE = ("dropout", "zoneout")

# ----- Sampling (generation only; not differentiable) -----

defop("sample", 1, vector, "sample({0}, {rng})", int_out=True)
defop("onehot", 1, vector, "onehot({0}, {n}, {dt})")

# ----- ONNX lowerings (export.py): each forward op as ONNX operators (opset 18) -----


def unary(kind: str, **fixed):
    return lambda b, x, **a: b.op(kind, x, **fixed)


def binary(kind: str):
    return lambda b, x, y, **a: b.op(kind, x, y)


def reduce_last(kind: str):
    return lambda b, x, **a: b.op(kind, x, b.ints([-1]), keepdims=0)


def onnx_var(b, x, **a):
    c = b.op("Sub", x, b.op("ReduceMean", x, b.ints([-1]), keepdims=1))
    return b.op("ReduceMean", b.op("Mul", c, c), b.ints([-1]), keepdims=0)


def onnx_rmsnorm(b, x, eps, **a):
    ms = b.op("ReduceMean", b.op("Mul", x, x), b.ints([-1]), keepdims=1)
    return b.op("Div", x, b.op("Sqrt", b.op("Add", ms, b.f(eps))))


ONNX = {
    "add": binary("Add"), "sub": binary("Sub"), "mul": binary("Mul"), "div": binary("Div"),
    "neg": unary("Neg"), "identity": unary("Identity"), "sum": lambda b, *xs, **a: b.op("Sum", *xs),
    "tanh": unary("Tanh"), "sigmoid": unary("Sigmoid"), "relu": unary("Relu"), "exp": unary("Exp"),
    "log": unary("Log"), "softplus": unary("Softplus"),
    "elu": lambda b, x, alpha, **a: b.op("Elu", x, alpha=float(alpha)),
    "leaky_relu": lambda b, x, alpha, **a: b.op("LeakyRelu", x, alpha=float(alpha)),
    "hard_sigmoid": unary("HardSigmoid", alpha=0.2, beta=0.5),
    "sqrt": unary("Sqrt"), "rsqrt": lambda b, x, **a: b.op("Reciprocal", b.op("Sqrt", x)),
    "abs": unary("Abs"), "square": lambda b, x, **a: b.op("Mul", x, x),
    "minimum": binary("Min"), "maximum": binary("Max"),
    "clip": lambda b, x, lo, hi, **a: b.op("Min", b.op("Max", x, lo), hi),
    "softmax": unary("Softmax", axis=-1), "log_softmax": unary("LogSoftmax", axis=-1),
    "sum_f": reduce_last("ReduceSum"), "mean": reduce_last("ReduceMean"), "max": reduce_last("ReduceMax"),
    "min": reduce_last("ReduceMin"), "var": onnx_var,
    "layernorm": lambda b, x, eps, **a: b.op("LayerNormalization", x, b.fill(b.shape, 1.0), b.fill(b.shape, 0.0),
                                          axis=-1, epsilon=float(eps)),
    "rmsnorm": onnx_rmsnorm,
    "concat": lambda b, *xs, axis=-1, **a: b.op("Concat", *xs, axis=int(axis)),
    "slice": lambda b, x, start, stop, axis=-1, **a: b.op("Slice", x, b.ints([start]), b.ints([stop]), b.ints([axis])),
    "matmul": lambda b, w, x, **a: b.op("MatMul", x, b.op("Transpose", w)),  # x @ W.T
    "batch": lambda b, p, **a: b.op("Expand", p, b.batch_shape(b.shape)),
    "first": lambda b, h, **a: b.op("Gather", h, b.ints(0), axis=0),
    "last": lambda b, h, **a: b.op("Gather", h, b.ints(-1), axis=0),  # full-length sequences
    "impulse": lambda b, v, **a: b.impulse(v),
    "pairs": lambda b, h, **a: b.pairs(h),
    "dropout": lambda b, x, m, **a: b.op("Mul", x, m),
    # losses (an export with targets): the label's entry by GatherElements, then reduced
    "ce_logits": lambda b, z, y, **a: b.op("Sub", b.op("ReduceLogSumExp", z, b.ints([-1]), keepdims=0), b.at_label(z, y)),
    "ce_probs": lambda b, p, y, **a: b.op("Neg", b.op("Log", b.op("Max", b.at_label(p, y), b.f(1.1754944e-38)))),
    "ce_sigmoid": lambda b, z, y, **a: b.op("Softplus", b.op("Neg", b.at_label(z, y))),
    "sqerr": lambda b, x, y, **a: b.op("ReduceMean", b.op("Mul", d := b.op("Sub", x, y), d), b.ints([-1]), keepdims=0),
    "loss_reduce": lambda b, l, mode, **a: b.loss_reduce(l, mode),
    "zoneout": lambda b, new, old, m, **a: b.op("Add", b.op("Mul", m, old), b.op("Mul", b.op("Sub", b.f(1.0), m), new)),
}  # fmt: skip
for _name, _rule in ONNX.items():
    OPS[_name] = dataclasses.replace(OPS[_name], onnx=_rule)

# Op names a spec may call, and the losses elaborate.py expands.
LOSSES = ("cross_entropy", "mse", "dot")  # dot(a, b): Σ_i a_i b_i per step (a linear loss)
TIME_FUNCS = ("last", "first", "final", "pairs")
BY_SPELLING = {op.spelling or n: op for n, op in OPS.items() if op.user and op.kind != "leaf"}
USER_OPS = sorted(BY_SPELLING) + list(LOSSES)


# ----- Rendering a template (the interpreter and lower.py share it) -----


def needs_feature_axis(shape: Shape, level: str, out_shape: Shape) -> bool:
    """A per-step or per-sequence feature scalar is an array [T, B] or [B]: against vectors it
    needs a trailing axis to broadcast (NumPy, ONNX). Parameters already align on trailing axes."""
    return shape == () and out_shape != () and level != GLOBAL


def operand_text(text: str, shape: Shape, level: str, out_shape: Shape) -> str:
    """An operand as it must be written so NumPy broadcasting means what the op means."""
    return f"{text}[..., None]" if needs_feature_axis(shape, level, out_shape) else text


@functools.cache
def slot_prec_of(name: str, i: int) -> int:
    return slot_prec(OPS[name], i)


def slot_prec(op: Op, i: int) -> int:
    """The precedence operand i's text needs inside op's template: as declared in `slots`,
    else 0 where {i} stands alone as a call argument, else 9 (an atom)."""
    if op.slots:
        return op.slots[min(i, len(op.slots) - 1)]
    if op.arity is None:
        return 0
    spots = [m.start() for m in re.finditer(re.escape(f"{{{i}}}"), op.numpy)]
    alone = all(
        re.search(r"[(,\[]\s*$", op.numpy[:at]) and re.match(r"\s*[,)\]]", op.numpy[at + 3 :])
        for at in spots
    )
    return 0 if alone else 9


def slot_uses(op: Op, i: int) -> int:
    """How often operand i appears in the template (inlining it twice would compute it twice)."""
    return 1 if op.arity is None else op.numpy.count(f"{{{i}}}")


def render(op: Op, args: list[str], attrs: dict[str, Any], ctx: dict[str, Any],
           whole: bool = False) -> str:  # fmt: skip
    """The op's NumPy text for operand texts `args`; ctx names M, T, t, B, dt, rng, n.
    `whole`: the operands are whole sequences [T, B, ...] (a step outside any loop)."""
    fields = {**ctx, **attrs}
    if attrs.get("causal"):  # attention over a sequence's own steps: those s <= t
        fields["upto"] = "'all'" if whole else ctx["t"]
    elif "causal" in op.attrs:
        fields["upto"] = "None"
    if op.arity is None:
        fields["args"] = op.sep.join(args)
    template = op.seq if whole and op.seq else op.numpy
    return template.format(*args, **fields)
