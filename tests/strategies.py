"""Hypothesis strategies: random well-formed programs (as ASTs) and random recurrent cells."""

from __future__ import annotations

from hypothesis import strategies as st

from rnnc import syntax as S

UNARY = ["tanh", "sigmoid", "softplus", "identity", "elu", "leaky_relu"]


def over_features(e: S.Expr, form: int) -> S.Expr:
    """e under one of the feature-wise forms (issue 12): normalizations, reductions that
    broadcast back, roots, and a dimension read as a number."""
    call = lambda f, *a: S.Call(f, a)  # noqa: E731
    one = S.Num(1.0)
    return [
        call("layernorm", e),
        call("rmsnorm", e),
        S.BinOp("-", e, call("mean", e)),
        S.BinOp("*", e, call("rsqrt", S.BinOp("+", call("var", e), one))),
        S.BinOp("/", e, call("sqrt", S.BinOp("+", one, call("square", e)))),
        S.BinOp("+", e, S.BinOp("/", call("sum", e), S.Name("H"))),
    ][form]
NAMES = st.sampled_from(["a", "b", "c", "h", "g", "q", "z", "u", "v", "w1"])


@st.composite
def dim_exprs(draw, names=("H", "I")):
    leaf = st.one_of(st.integers(1, 9).map(S.DNum), st.sampled_from(names).map(S.DName))
    d = draw(leaf)
    for _ in range(draw(st.integers(0, 2))):
        d = S.DBin(draw(st.sampled_from("+-*")), d, draw(leaf))
    return d


@st.composite
def exprs(draw, depth=3):
    """Any expression the grammar admits (for format round trips, not for compiling)."""
    atoms = st.one_of(
        st.floats(0, 100, allow_nan=False).map(lambda v: S.Num(round(v, 3))),
        NAMES.map(S.Name),
        st.tuples(NAMES, st.integers(-3, 3)).map(lambda p: S.TimeRef(*p)),
        NAMES.map(S.Every),  # x[s]: every step, for attention
    )
    if depth == 0:
        return draw(atoms)
    sub = exprs(depth=depth - 1)
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return draw(atoms)
    if kind == 1:
        return S.BinOp(draw(st.sampled_from("+-*/@")), draw(sub), draw(sub))
    if kind == 2:
        return S.Neg(draw(sub))
    if kind == 3:
        args = tuple(draw(st.lists(sub, min_size=1, max_size=3)))
        kwargs = tuple(draw(st.lists(st.one_of(st.tuples(st.sampled_from(["H", "alpha"]), sub),
                                                st.just(("over", S.Name("s")))), max_size=1)))  # fmt: skip
        mods = tuple(draw(st.lists(st.sampled_from([
            S.Modifier("reverse"), S.Modifier("stack", 2), S.Modifier("bidirectional"),
            S.Modifier("bidirectional", "sum")]), max_size=2)))  # fmt: skip
        return S.Call(draw(st.sampled_from(["tanh", "LSTM", "concat", "f"])), args, kwargs, mods)
    if kind == 4:
        lo = draw(st.one_of(st.none(), dim_exprs()))
        hi = draw(st.one_of(st.none(), dim_exprs()))
        return S.Slice(draw(sub), lo, hi)
    return draw(atoms)


@st.composite
def programs(draw):
    """A syntactically valid program: cells and models with every kind of statement."""
    items = []
    for i in range(draw(st.integers(1, 3))):
        body = [
            S.DimDecl(
                (
                    S.DimItem(
                        "H",
                        draw(st.one_of(st.none(), dim_exprs(("K",)))),
                    ),
                )
            )
        ]
        body.append(
            S.InputDecl("x", (draw(dim_exprs()),), draw(st.sampled_from(["sequence", "static"])))
        )
        if draw(st.booleans()):  # a second input on x's clock
            body.append(S.InputDecl("x2", (draw(dim_exprs()),), "sequence", like="x"))
        body.append(draw(st.sampled_from([
            S.TargetDecl("y", None, "sequence", S.DName("K")),
            S.TargetDecl("y", (S.DName("H"),), "static"),
            S.TargetDecl("y", None, "static", S.DNum(3)),
        ])))  # fmt: skip
        init = draw(st.one_of(st.none(), st.sampled_from([
            S.Init("constant", (1.0,)), S.Init("glorot"), S.Init("uniform", (-0.1, 0.1)),
            S.Init("normal", (0.0, 0.01)), S.Init("orthogonal"), S.Init("constant", (-2.5,))])))  # fmt: skip
        body.append(S.ParamDecl((S.ParamItem("W", (S.DName("H"), draw(dim_exprs())), init),)))
        for name in draw(st.lists(NAMES, min_size=1, max_size=4, unique=True)):
            body.append(S.Equation(name, draw(exprs()), draw(st.booleans())))
        if draw(st.booleans()):
            items.append(S.Model(f"m{i}", tuple(body)))
        else:
            eqs = tuple(s for s in body if isinstance(s, (S.Equation, S.ParamDecl)))
            items.append(S.Cell(f"C{i}", (S.Port("x", (S.DName("I"),)),),
                                S.Port("h", (S.DName("H"),)), eqs))  # fmt: skip
    return S.Program(tuple(items))


@st.composite
def cells(draw, allow_lengths=True, causal=False):
    """A random recurrent cell inside a model that compiles: (program AST, options).

    Equations e0..en are vectors [H]; each is an op over earlier equations (same step),
    any equation at delays 1..3 (or -1..-3: a backward cell), params, the input projection.
    causal=True: forward cells reading only t-1, stacked or not (what checkpointing cuts)."""
    sign = 1 if causal else draw(st.sampled_from([1, 1, -1]))
    n_eq = draw(st.integers(1, 4))
    eqs = []
    params = [S.ParamItem("U", (S.DName("H"), S.DName("I"))), S.ParamItem("b", (S.DName("H"),))]

    def operand(i):
        choices = ["x", "b"] + [f"e{j}" for j in range(i)] + ["past"]
        pick = draw(st.sampled_from(choices))
        if pick == "x":
            return S.BinOp("@", S.Name("U"), S.Name("x"))
        if pick == "past":
            j = draw(st.integers(0, n_eq - 1))
            ref = S.TimeRef(f"e{j}", sign * (1 if causal else draw(st.integers(1, 3))))
            if draw(st.booleans()):
                w = f"W{len(params)}"
                params.append(S.ParamItem(w, (S.DName("H"), S.DName("H"))))
                return S.BinOp("@", S.Name(w), ref)
            return ref
        return S.Name(pick)

    for i in range(n_eq):
        e = S.BinOp("@", S.Name("U"), S.Name("x"))  # every equation sees the input sequence
        if draw(st.booleans()):
            e = S.BinOp(draw(st.sampled_from("+-*")), e, operand(i))
        for _ in range(draw(st.integers(1, 3))):
            kind = draw(st.sampled_from(["unary", "binary", "binary", "gate", "features", "noise"]))
            if kind == "unary":
                e = S.Call(draw(st.sampled_from(UNARY)), (e,))
            elif kind == "features":
                e = over_features(e, draw(st.integers(0, 5)))
            elif kind == "noise":  # dropout per step or per sequence; zoneout keeps e_i[t-1]
                form = draw(st.integers(0, 2))
                per = (("per", S.Name("sequence")),) if form == 1 else ()
                e = S.Call("zoneout" if form == 2 else "dropout", (e, S.Num(0.3)), per)
            elif kind == "binary":
                e = S.BinOp(draw(st.sampled_from("+-*")), e, operand(i))
            else:  # a gated mix, as in GRU and LSTM
                e = S.BinOp("*", S.Call("sigmoid", (operand(i),)), S.Call("tanh", (e,)))
        eqs.append(S.Equation(f"e{i}", e))
    # make sure some equation is really recurrent
    last = eqs[-1]
    eqs[-1] = S.Equation(
        last.name, S.Call("tanh", (S.BinOp("+", last.expr, S.TimeRef(f"e{n_eq - 1}", sign)),))
    )
    cell = S.Cell("C", (S.Port("x", (S.DName("I"),)),), S.Port(f"e{n_eq - 1}", (S.DName("H"),)),
                  (S.ParamDecl(tuple(params)), *eqs))  # fmt: skip
    mods = draw(st.sampled_from([(), (S.Modifier("stack", 2),)] if causal else
                                [(), (), (S.Modifier("bidirectional"),), (S.Modifier("stack", 2),),
                                 (S.Modifier("reverse"),),
                                 (S.Modifier("stack", 2), S.Modifier("bidirectional", "sum"))]))  # fmt: skip
    width = "2*H" if mods and mods[-1].kind == "bidirectional" and mods[-1].arg is None else "H"
    H, n_in, K = draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(2, 4))
    classify = draw(st.booleans())
    wdim = S.DBin("*", S.DNum(2), S.DName("H")) if width == "2*H" else S.DName("H")
    body = [
        S.DimDecl((S.DimItem("H", S.DNum(H)), S.DimItem("I", S.DNum(n_in)), S.DimItem("K", S.DNum(K)))),
        S.InputDecl("x", (S.DName("I"),), "sequence"),
        S.TargetDecl("y", None, "sequence", S.DName("K")) if classify
        else S.TargetDecl("y", (S.DName("K"),), "sequence"),
        S.ParamDecl((S.ParamItem("Wy", (S.DName("K"), wdim)), S.ParamItem("by", (S.DName("K"),)))),
        S.Equation("h", S.Call("C", (S.Name("x"),), (("H", S.Name("H")),), mods)),
    ]  # fmt: skip
    head = S.BinOp("+", S.BinOp("@", S.Name("Wy"), S.Name("h")), S.Name("by"))
    loss = S.Call("cross_entropy", (S.Call("softmax", (head,)), S.Name("y"))) if classify else \
        S.Call("mse", (head, S.Name("y")))  # fmt: skip
    body.append(S.Equation("loss", loss))
    program = S.Program((cell, S.Model("random", tuple(body))))
    T = draw(st.integers(1, 7))
    B = draw(st.integers(1, 3))
    lengths = draw(st.booleans()) if allow_lengths else False
    return program, {"T": T, "B": B, "lengths": lengths, "seed": draw(st.integers(0, 2**16))}


@st.composite
def models(draw):
    """A random model as text, reaching the shapes that once broke rnnc (issue 10): nested
    projections inside activations, packed weights read through slices, a forward and a
    backward recurrence over one input, inputs read at other steps, a param (or one per state) as the initial
    state, first(v) of a per-sequence input, last/first heads, several delays.

    Returns (text, options): T, B, lengths, seed, and `windows` (forward-only models, where a
    sequence cut in two windows with the carry must equal the whole)."""
    sign = draw(st.sampled_from([1, 1, -1]))
    n_eq = draw(st.integers(1, 3))
    params = ["U[H, I]", "b[H]", "P[3*H, I]"]
    eqs: list[str] = []

    def operand(i: int, reads_x: bool = False) -> str:
        every = ["x", "b", "packed", "xdelay", "nested", "past", "past", "eq"]
        pick = draw(st.sampled_from(every[:5] if reads_x else every))
        if pick == "b" and reads_x:
            pick = "x"
        if pick == "eq" and i == 0:
            pick = "past"
        if pick == "x":
            return "U @ x"
        if pick == "packed":  # a packed weight read through a slice of its product
            j = draw(st.integers(0, 2))
            return f"(P @ x)[{j}*H:{j + 1}*H]" if j else "(P @ x)[0:H]"
        if pick == "xdelay":
            k = sign * draw(st.integers(1, 2))
            return f"U @ x[t{'-' if k > 0 else '+'}{abs(k)}]"
        if pick == "past" or pick == "nested":
            j = draw(st.integers(0, n_eq - 1))
            k = sign * draw(st.integers(1, 3))
            ref = f"e{j}[t{'-' if k > 0 else '+'}{abs(k)}]"
            w = f"W{len(params)}"
            params.append(f"{w}[H, H]")
            if pick == "nested":  # a projection of the loop inside an activation
                a = f"A{len(params)}"
                params.append(f"{a}[H, I]")
                return f"tanh({a} @ x + {w} @ {ref})"
            return f"{w} @ {ref}" if draw(st.booleans()) else ref
        if pick == "eq":
            return f"e{draw(st.integers(0, i - 1))}"
        return "b"

    for i in range(n_eq):
        e = operand(i, reads_x=True)  # every equation sees the input sequence
        for _ in range(draw(st.integers(1, 3))):
            kind = draw(st.sampled_from(["unary", "binary", "binary", "gate"]))
            if kind == "unary":
                e = f"{draw(st.sampled_from(UNARY))}({e})"
            elif kind == "binary":
                e = f"{e} {draw(st.sampled_from('+-*'))} {operand(i)}"
            else:
                e = f"sigmoid({operand(i)}) * tanh({e})"
        if i == n_eq - 1:  # the output is a recurrence
            e = f"tanh({e} + e{i}[t{'-' if sign > 0 else '+'}1])"
        eqs.append(f"  e{i} = {e}")
    lines = "\n".join(eqs)
    cell = f"cell C(x[I]) -> e{n_eq - 1}[H] {{\n  param {', '.join(params)}\n{lines}\n}}\n"
    mods = draw(st.sampled_from(["", "", "bidirectional(sum) ", "stack(2) ", "reverse "]))
    init = draw(st.sampled_from([None, "h0", "learned"]))  # a param, or one per state
    other = draw(st.booleans())  # a model-level recurrence running the other way
    image = draw(st.booleans())  # first(P @ img): a static input entering at step 0
    many_to_one = draw(st.booleans())
    H, n_in, K = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(2, 3))
    body = [f"  dim H = {H}, I = {n_in}, K = {K}, F = 2", "  input x[I] : sequence"]
    if image:
        body.append("  input img[F] : static")
    body.append("  target y : class(K)" if many_to_one else "  target y[K] : sequence")
    body.append("  param Wy[K, H], by[K]" + (", h0[H]" if init == "h0" else "") +
                (", Ug[H, I], Wg[H, H], Vg[K, H]" if other else "") +
                (", Pi[H, F], Ui[H, I], Wi[H, H], Vi[K, H]" if image else ""))  # fmt: skip
    body.append(f"  h = {mods}C(x, H=H{f', init={init}' if init else ''})")
    heads = ["Wy @ {h}"]
    if other:
        back = "t+1" if sign > 0 else "t-1"
        body.append(f"  g = tanh(Ug @ x + Wg @ g[{back}])")
        heads.append("Vg @ {g}")
    if image:
        body.append("  s = tanh(Ui @ x + Wi @ s[t-1] + first(Pi @ img))")
        heads.append("Vi @ {s}")
    backward_h = (sign < 0) != (mods == "reverse ")
    ends = {"h": "first(h)" if backward_h else "last(h)", "g": "first(g)" if sign > 0 else "last(g)",
            "s": "last(s)"}  # fmt: skip
    if many_to_one:
        head = " + ".join(x.format(**ends) for x in heads)
        body.append(f"  loss = cross_entropy(softmax({head} + by), y)")
    else:
        head = " + ".join(x.format(h="h", g="g", s="s") for x in heads)
        body.append(f"  loss = mse({head} + by, y)")
    text = cell + "model m {\n" + "\n".join(body) + "\n}\n"
    forward_only = not backward_h and not other and not many_to_one and "bidirectional" not in mods
    opts = {"T": draw(st.integers(2, 7)), "B": draw(st.integers(1, 3)),
            "lengths": draw(st.booleans()), "seed": draw(st.integers(0, 2**16)),
            "windows": forward_only}  # fmt: skip
    return text, opts


@st.composite
def attention_models(draw):
    """A random encoder-decoder with attention, as text: an encoder recurrence running either
    way over `src`; a score additive (Bahdanau), dot or general (Luong), from the decoder's
    previous state (its context feeds the decoder: input feeding) or from its current state
    (the context feeds the output only); values projected or not; sometimes also causal
    self-attention over the target's own steps. Source and target have clocks of their own.

    Returns (text, options): Ts (steps of src and of tgt), B, lengths, seed."""
    back = draw(st.booleans())
    enc = f"tanh(We @ src + Ue @ e[t{'+' if back else '-'}1] + be)"
    score = draw(st.sampled_from(["additive", "dot", "general"]))
    feed = draw(st.booleans())  # the context feeds the decoder's next step (else the head only)
    q = "d[t-1]" if feed else "d"
    s = {"additive": f"sum(va * tanh(Wa @ e[s] + Ua @ {q}))", "dot": f"sum({q} * e[s])",
         "general": f"sum({q} * (Wa @ e[s]))"}[score]  # fmt: skip
    value = draw(st.sampled_from(["e[s]", "(Wv @ e[s])"]))
    d_in = "Wd @ tgt + Ud @ d[t-1] + bd" + (" + Wc @ ctx[t-1]" if feed else "")
    selfatt = draw(st.booleans())
    lines = [
        f"  dim H = {draw(st.integers(1, 3))}, I = {draw(st.integers(1, 3))}, A = {draw(st.integers(1, 3))}, K = 2",
        "  input src[I] : sequence", "  input tgt[I] : sequence", "  target y[K] : sequence",
        "  param We[H, I], Ue[H, H], be[H], Wd[H, I], Ud[H, H], bd[H], Wc[H, H], Wv[H, H]",
        "  param va[A], Wa[" + ("A" if score == "additive" else "H") + ", H], Ua[A, H], Wy[K, 3 * H], by[K]",
        "  param Wq[H, I], Wk[H, I]",
        f"  e = {enc}",
        f"  a = softmax({s}, over=s)",
        f"  ctx = sum(a * {value}, over=s)",
        f"  d = tanh({d_in})",
    ]  # fmt: skip
    if selfatt:  # causal: each target step over the target's steps s <= t
        lines += ["  k = Wk @ tgt", "  self = sum(softmax(sum(tanh(Wq @ tgt) * k[s]), over=s) * k[s], over=s)"]
    lines.append(f"  loss = mse(Wy @ concat(d, ctx, {'self' if selfatt else 'd'}) + by, y)")
    text = "model att {\n" + "\n".join(lines) + "\n}\n"
    Ts = {"src": draw(st.integers(1, 5)), "tgt": draw(st.integers(1, 4))}
    return text, {"Ts": Ts, "B": draw(st.integers(1, 3)), "lengths": draw(st.booleans()),
                  "seed": draw(st.integers(0, 2**16))}  # fmt: skip
