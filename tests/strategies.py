"""Hypothesis strategies: random well-formed programs (as ASTs) and random recurrent cells."""

from __future__ import annotations

from hypothesis import strategies as st

from rnnc import syntax as S

UNARY = ["tanh", "sigmoid", "softplus", "identity", "elu", "leaky_relu"]
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
        kwargs = tuple(draw(st.lists(st.tuples(st.sampled_from(["H", "alpha"]), sub), max_size=1)))
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
def cells(draw, allow_lengths=True):
    """A random recurrent cell inside a model that compiles: (program AST, options).

    Equations e0..en are vectors [H]; each is an op over earlier equations (same step),
    any equation at delays 1..3 (or -1..-3: a backward cell), params, the input projection."""
    sign = draw(st.sampled_from([1, 1, -1]))
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
            ref = S.TimeRef(f"e{j}", sign * draw(st.integers(1, 3)))
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
            kind = draw(st.sampled_from(["unary", "binary", "binary", "gate"]))
            if kind == "unary":
                e = S.Call(draw(st.sampled_from(UNARY)), (e,))
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
    mods = draw(st.sampled_from([(), (), (S.Modifier("bidirectional"),), (S.Modifier("stack", 2),),
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
