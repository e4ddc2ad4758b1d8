"""Text -> Program: the lark LALR parser, a transformer to syntax.py dataclasses, worded errors."""

from __future__ import annotations

import functools
import itertools
import math
import re
import threading
from importlib import resources

from lark import Lark, Token, Transformer_NonRecursive, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, VisitError

from . import syntax as S
from .errors import RnncError, Span

MAX_SOURCE = 1_000_000  # bytes; a spec is a page of equations
MAX_NAME = 64
MAX_DEPTH = 200  # expression nesting; deeper ones overflow recursive passes and CPython
MAX_TERMS = 500  # operands of one chain a + b + c + ... (a chain counts as one level)
MAX_INT = 10**9  # a whole number in a spec (dims, delays, stack(n)); larger is a typo
MAX_DELAY = 1000  # h[t-k]: k rows of state are kept per sequence
MAX_STACK = 16  # stack(n) layers (compile and gradcheck stay within seconds)

# Terminal names lark shows in `expected` sets, in words.
WORDS = {
    "NAME": "a name",
    "INT": "a whole number",
    "NUMBER": "a number",
    "LPAR": "'('",
    "RPAR": "')'",
    "LSQB": "'['",
    "RSQB": "']'",
    "LBRACE": "'{'",
    "RBRACE": "'}'",
    "COMMA": "','",
    "COLON": "':'",
    "EQUAL": "'='",
    "PLUS": "'+'",
    "MINUS": "'-'",
    "STAR": "'*'",
    "SLASH": "'/'",
    "AT": "'@'",
    "STRING": "a quoted path",
    "$END": "the end of the file",
}
KEYWORDS = [
    "model",
    "cell",
    "dim",
    "input",
    "target",
    "param",
    "generate",
    "bidirectional",
    "reverse",
    "stack",
    "sequence",
    "static",
    "of",
    "class",
    "use",
    "from",
]


def word(terminal: str) -> str:
    if terminal in WORDS:
        return WORDS[terminal]
    if terminal.lower() in KEYWORDS:
        return f"'{terminal.lower()}'"
    if terminal.startswith("__ANON") or terminal == "MINUS_ARROW":
        return "'->'"
    return terminal.lower()


_local = threading.local()  # per thread: the comments the lexer met in this thread's parse


def _collect_comment(tok: Token) -> None:
    _local.comments.append(tok)


@functools.cache
def parser() -> Lark:
    """The LALR parser for grammars/rnn.lark, built once per process."""
    grammar = resources.files("rnnc").joinpath("rnn.lark").read_text()
    return Lark(
        grammar,
        parser="lalr",
        propagate_positions=True,
        maybe_placeholders=True,
        lexer_callbacks={"COMMENT": _collect_comment},
    )


def span_of(file: str, meta_or_tok) -> Span:
    m = meta_or_tok
    if getattr(m, "empty", False):
        return Span(file)
    return Span(file, m.line, m.column, m.end_line, m.end_column)


@v_args(meta=True)
class ToAst(Transformer_NonRecursive):
    """One method per grammar alias; children are named, never indexed blindly."""

    def __init__(self, file: str):
        super().__init__()
        self.file = file

    def _s(self, meta) -> Span:
        return span_of(self.file, meta)

    def _name(self, tok: Token) -> str:
        if len(tok) > MAX_NAME:
            raise RnncError(
                f"name is {len(tok)} characters long; the limit is {MAX_NAME}",
                span_of(self.file, tok),
                code="E105",
            )
        return str(tok)

    # ----- program structure -----
    def start(self, meta, items):
        return tuple(items)

    def model(self, meta, ch):
        name, *body = ch
        return S.Model(self._name(name), tuple(body), self._s(meta))

    def cell(self, meta, ch):
        name, *rest = ch
        ports = [c for c in rest if isinstance(c, S.Port)]
        body = tuple(c for c in rest if not isinstance(c, S.Port))
        return S.Cell(self._name(name), tuple(ports[:-1]), ports[-1], body, self._s(meta))

    def use(self, meta, ch):
        names = [c for c in ch[:-1]]
        source = None if ch[-1] is None else str(ch[-1])[1:-1]
        if ch[-1] is not None and not source:
            raise RnncError("use ... from \"\": the path is empty", span_of(self.file, ch[-1]), code="E110")
        return S.Use(tuple(self._name(n) for n in names), source, self._s(meta),
                     tuple(span_of(self.file, n) for n in names))  # fmt: skip

    def port(self, meta, ch):
        name, dims = ch
        return S.Port(self._name(name), dims, self._s(meta))

    def dims(self, meta, ch):
        return tuple(ch)

    # ----- declarations -----
    def dim_decl(self, meta, items):
        return S.DimDecl(tuple(items), self._s(meta))

    def dim_item(self, meta, ch):
        name, default = ch
        return S.DimItem(self._name(name), default, self._s(meta))

    def input_decl(self, meta, ch):
        name, dims, (kind, like) = ch
        return S.InputDecl(self._name(name), dims, kind, self._s(meta), like)

    def sequence(self, meta, ch):
        return ("sequence", self._name(ch[0]) if ch and ch[0] is not None else None)

    def static(self, meta, ch):
        return ("static", None)

    def seq_class_target(self, meta, ch):
        return ("sequence", ch[0])

    def static_class_target(self, meta, ch):
        return ("static", ch[0])

    def target_decl(self, meta, ch):
        name, dims, (kind, classes) = ch
        if classes is not None and dims is not None:
            raise RnncError(
                "a class target has no feature shape: its size is the number of classes",
                self._s(meta),
                hint=f"write `target {name} : {kind} of class(K)`"
                if kind == "sequence"
                else f"write `target {name} : class(K)`",
                code="E106",
            )
        if classes is None and dims is None:
            raise RnncError(
                f"target '{name}' needs a shape or a class count",
                self._s(meta),
                hint=f"write `target {name}[K] : {kind}` or `target {name} : {kind} of class(K)`",
                code="E106",
            )
        return S.TargetDecl(self._name(name), dims, kind, classes, self._s(meta))

    def param_decl(self, meta, items):
        return S.ParamDecl(tuple(items), self._s(meta))

    def param_item(self, meta, ch):
        name, dims, init = ch
        return S.ParamItem(self._name(name), dims, init, self._s(meta))

    def init_const(self, meta, ch):
        return S.Init("constant", (ch[0],), self._s(meta))

    def init_named(self, meta, ch):
        return S.Init(str(ch[0]), (), self._s(meta))

    def init_call(self, meta, ch):
        name, *args = ch
        return S.Init(str(name), tuple(args), self._s(meta))

    def _float(self, tok: Token) -> float:
        v = float(tok)
        if not math.isfinite(v):
            raise RnncError(f"the number {tok} is too large for float64", span_of(self.file, tok),
                            hint="numbers in a spec are at most about 1.8e308", code="E109")  # fmt: skip
        return v

    def _int(self, tok: Token, limit: int = MAX_INT, what: str = "a whole number here") -> int:
        if len(tok) > len(str(limit)) or int(tok) > limit:
            raise RnncError(f"{tok if len(tok) < 20 else tok[:16] + '...'} is too large: "
                            f"{what} is at most {limit:,}", span_of(self.file, tok),
                            code="E109")  # fmt: skip
        return int(tok)

    def signed(self, meta, ch):
        return self._float(ch[0])

    def negative(self, meta, ch):
        return -self._float(ch[0])

    def equation(self, meta, ch):
        name, expr = ch
        return S.Equation(self._name(name), expr, False, self._s(meta))

    def generate(self, meta, ch):
        name, expr = ch
        return S.Equation(self._name(name), expr, True, self._s(meta))

    # ----- dimension expressions -----
    def dim_num(self, meta, ch):
        return S.DNum(self._int(ch[0]), self._s(meta))

    def dim_name(self, meta, ch):
        return S.DName(self._name(ch[0]), self._s(meta))

    def dim_add(self, meta, ch):
        return S.DBin("+", ch[0], ch[1], self._s(meta))

    def dim_sub(self, meta, ch):
        return S.DBin("-", ch[0], ch[1], self._s(meta))

    def dim_mul(self, meta, ch):
        return S.DBin("*", ch[0], ch[1], self._s(meta))

    # ----- expressions -----
    def number(self, meta, ch):
        return S.Num(self._float(ch[0]), self._s(meta))

    def name(self, meta, ch):
        return S.Name(self._name(ch[0]), self._s(meta))

    def _bin(op):
        def rule(self, meta, ch):
            return S.BinOp(op, ch[0], ch[1], self._s(meta))

        return rule

    add, sub, mul, div, matmul = _bin("+"), _bin("-"), _bin("*"), _bin("/"), _bin("@")

    def neg(self, meta, ch):
        return S.Neg(ch[0], self._s(meta))

    def time_ref(self, meta, ch):
        base, index = ch
        span = self._s(meta)
        delay = time_offset(index)
        if index == S.DName("s"):
            if not isinstance(base, S.Name):
                raise RnncError("only a named sequence can be read at every step s", span,
                                hint="give the expression a name first: `k = ...`, then use k[s]", code="E107")  # fmt: skip
            return S.Every(base.name, span)
        if delay is None:
            raise RnncError(
                "an index in brackets must be a time step: t, t-k, t+k, or s (every step)",
                index.span,
                hint="to take features a to b, write a slice: z[a:b]",
                code="E107",
            )
        if not isinstance(base, S.Name):
            raise RnncError(
                "only a named variable can be read at another time step",
                span,
                hint="give the expression a name first: `a = ...`, then use a[t-1]",
                code="E107",
            )
        if abs(delay) > MAX_DELAY:
            raise RnncError(f"a delay of {abs(delay):,} steps; the limit is {MAX_DELAY}",
                            index.span, hint="every state keeps k rows per sequence for t-k",
                            code="E109")  # fmt: skip
        return S.TimeRef(base.name, delay, span)

    def slice(self, meta, ch):
        base, start, stop = ch
        return S.Slice(base, start, stop, self._s(meta))

    def call(self, meta, ch):
        mods = tuple(c for c in ch if isinstance(c, S.Modifier))
        rest = [c for c in ch if not isinstance(c, S.Modifier)]
        fn, *args = rest
        pos = tuple(a[1] for a in args if a is not None and a[0] is None)
        kws = tuple(a for a in args if a is not None and a[0] is not None)
        seen = [k for k, _ in kws]
        first_kw = next((i for i, a in enumerate(args) if a is not None and a[0] is not None), None)
        if first_kw is not None and any(a is not None and a[0] is None for a in args[first_kw:]):
            raise RnncError(
                "a positional argument follows a keyword argument",
                self._s(meta),
                hint="put arguments like x first, keywords like H=64 after them",
                code="E108",
            )
        dup = {k for k in seen if seen.count(k) > 1}
        if dup:
            raise RnncError(
                f"keyword '{sorted(dup)[0]}' is given twice", self._s(meta), code="E108"
            )
        return S.Call(self._name(fn), pos, kws, mods, self._s(meta))

    def pos_arg(self, meta, ch):
        return (None, ch[0])

    def kw_arg(self, meta, ch):
        return (self._name(ch[0]), ch[1])

    def bidirectional(self, meta, ch):
        merge = str(ch[0]) if ch[0] is not None else None
        return S.Modifier("bidirectional", merge, self._s(meta))

    def reverse(self, meta, ch):
        return S.Modifier("reverse", None, self._s(meta))

    def stack(self, meta, ch):
        n = self._int(ch[0], MAX_STACK, "the number of stacked layers")
        return S.Modifier("stack", n, self._s(meta))


def time_offset(index: S.DimExpr) -> int | None:
    """t -> 0, t-k -> k, t+k -> -k; anything else is not a time index."""
    match index:
        case S.DName("t"):
            return 0
        case S.DBin("-", S.DName("t"), S.DNum(k)):
            return k
        case S.DBin("+", S.DName("t"), S.DNum(k)):
            return -k
    return None


def read_source(path: str) -> str:
    """A spec file's text, read no further than one character past MAX_SOURCE (so that a device
    or an endless pipe is refused by `parse`, not read forever). OSError and UnicodeDecodeError
    are the caller's to word."""
    with open(path, encoding="utf-8") as f:
        return f.read(MAX_SOURCE + 1)


def parse(text: str, file: str = "<spec>") -> S.Program:
    """Parse a whole .rnn file; any mistake raises RnncError with its location."""
    if len(text) > MAX_SOURCE:
        raise RnncError(
            f"spec is {len(text)} bytes; the limit is {MAX_SOURCE}", Span(file), code="E100"
        )
    text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark, as some editors write
    check_characters(text, file)
    _local.comments = found = []
    try:
        tree = parser().parse(text)
    except UnexpectedInput as u:
        raise syntax_error(u, text, file) from None
    finally:
        _local.comments = []
    comments = tuple((c.line, c.column, str(c).rstrip()) for c in found)
    try:
        items = ToAst(file).transform(tree)
    except VisitError as e:
        raise e.orig_exc from None
    program = S.Program(items, file, text, comments)
    check_depth(program, file)
    check_one_per_line(program, file)
    return program


def check_one_per_line(program: S.Program, file: str) -> None:
    """Refuse a statement that begins on the line where the one before it ends: it reads as a
    continuation (`d = LSTM(x, H=H) init=final(e)` is two equations, the second unused)."""
    for item in program.items:
        for prev, stmt in itertools.pairwise(getattr(item, "body", ())):
            if not (prev.span.end_line and stmt.span.line == prev.span.end_line):
                continue
            name = getattr(stmt, "name", "")
            hint = "put each statement on its own line"
            if isinstance(stmt, S.Equation) and name == "init":
                hint = "an initial state goes inside the call: `d = LSTM(x, H=H, init=final(e))`"
            raise RnncError(
                "a new statement starts on the line where the previous one ends",
                stmt.span,
                hint=hint,
                code="E106",
            )


CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def check_characters(text: str, file: str) -> None:
    """Refuse control characters (a NUL byte would end up in the generated module)."""
    m = CONTROL.search(text)
    if m is None:
        return
    line = text.count("\n", 0, m.start()) + 1
    col = m.start() - (text.rfind("\n", 0, m.start()) + 1) + 1
    raise RnncError(f"control character U+{ord(m.group()):04X} in the spec",
                    Span(file, line, col, line, col + 1),
                    hint="a spec is plain text: remove it (was the file saved as text?)",
                    code="E101")  # fmt: skip


def syntax_error(u: UnexpectedInput, text: str, file: str) -> RnncError:
    """Turn lark's exception into one worded, located error."""
    if isinstance(u, UnexpectedCharacters):
        ch = text[u.pos_in_stream] if u.pos_in_stream < len(text) else "?"
        hint = None
        if ch == ";":
            hint = "statements need no ';': put each on its own line"
        elif False:
            hint = None
        elif ch == "^":
            hint = "there is no power operator; write x * x"
        return RnncError(
            f"unexpected character {ch!r}",
            Span(file, u.line, u.column, u.line, u.column + 1),
            hint=hint,
            code="E101",
        )
    tok = getattr(u, "token", None)
    expected = sorted({word(t) for t in getattr(u, "expected", set()) or set()})
    if isinstance(u, UnexpectedEOF) or (tok is not None and tok.type == "$END"):
        line, col = end_position(text)
        msg = "unexpected end of file"
        if expected:
            msg += f"; expected {join_words(expected)}"
        hint = "a '{' is not closed" if text.count("{") > text.count("}") else None
        return RnncError(msg, Span(file, line, col, line, col + 1), hint=hint, code="E102")
    assert tok is not None
    what = f"'{tok}'" if tok.type not in ("NAME", "NUMBER", "INT") else f"{word(tok.type)} '{tok}'"
    if tok.type.lower() in KEYWORDS or str(tok) in KEYWORDS:
        what = f"keyword '{tok}'"
    msg = f"unexpected {what}"
    if expected:
        msg += f"; expected {join_words(expected)}"
    end = tok.end_column if tok.end_column else u.column + len(str(tok))
    return RnncError(
        msg, Span(file, u.line, u.column, u.line, end), hint=token_hint(tok, expected), code="E103"
    )


def token_hint(tok: Token, expected: list[str]) -> str | None:
    if str(tok) in KEYWORDS and "a name" in expected:
        return f"'{tok}' is a keyword; choose another name"
    if str(tok) == "=" and "'=='" not in expected:
        return "an equation is `name = expression`; the left side must be a single name"
    if str(tok) == "(" and "'='" in expected:
        return "a function call cannot stand alone; assign it: `name = f(...)`"
    if ("')'" in expected and str(tok) in ("}", "=")) or (str(tok) == "}" and "')'" in expected):
        return "a '(' is not closed before this"
    if tok.type == "NUMBER" and "a whole number" in expected:
        return "dimensions, delays and slice bounds are whole numbers"
    return None


def join_words(words: list[str]) -> str:
    if len(words) > 6:
        words = [*words[:6], "..."]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def end_position(text: str) -> tuple[int, int]:
    """Line and column just after the last non-blank character (where EOF errors point)."""
    stripped = text.rstrip()
    if not stripped:
        return 1, 1
    line = stripped.count("\n") + 1
    col = len(stripped) - (stripped.rfind("\n") + 1) + 1
    return line, col


GROUPS = {"+": 1, "-": 1, "*": 2, "/": 2, "@": 3}  # operators that chain left to right


def check_depth(program: S.Program, file: str) -> None:
    """Refuse expressions nested deeper than MAX_DEPTH, chains (a + b + c ...) longer than
    MAX_TERMS, and dimension expressions nested deeper than MAX_DEPTH (iterative walks: no
    recursion here). A chain counts as one level: a flat sum is not nesting."""
    for item in program.items:
        dims: list[S.DimExpr] = []
        if isinstance(item, S.Cell):
            dims += [d for p in (*item.inputs, item.output) for d in p.dims]
        for stmt in getattr(item, "body", ()):
            dims += statement_dims(stmt)
            if isinstance(stmt, S.Equation):
                dims += check_expr(stmt)
        for d in dims:
            check_dim_depth(d, file)


def statement_dims(stmt) -> list[S.DimExpr]:
    match stmt:
        case S.DimDecl(items):
            return [it.default for it in items if it.default is not None]
        case S.InputDecl(_, dims):
            return list(dims)
        case S.TargetDecl(_, dims, _, classes):
            return [*(dims or ()), *([classes] if classes is not None else [])]
        case S.ParamDecl(items):
            return [d for it in items for d in it.dims]
    return []


def check_expr(stmt: S.Equation) -> list[S.DimExpr]:
    """Check one equation's nesting; return the dimension expressions of its slices."""
    dims: list[S.DimExpr] = []
    stack = [(stmt.expr, 1, 1)]  # (expression, nesting level, terms so far in its chain)
    while stack:
        e, d, terms = stack.pop()
        span = getattr(e, "span", stmt.span)
        if d > MAX_DEPTH:
            raise RnncError(f"expression nested more than {MAX_DEPTH} levels deep", span,
                            hint="split it into several named equations", code="E104")  # fmt: skip
        if isinstance(e, S.BinOp) and terms + 1 > MAX_TERMS:  # a chain of n ops has n + 1 terms
            raise RnncError(f"a chain of more than {MAX_TERMS} terms", span,
                            hint="sum the terms in parts: `a = ...`, `b = ...`, then `a + b`",
                            code="E104")  # fmt: skip
        if isinstance(e, S.BinOp):
            same = isinstance(e.lhs, S.BinOp) and GROUPS[e.lhs.op] == GROUPS[e.op]
            stack.append((e.lhs, d, terms + 1) if same else (e.lhs, d + 1, 1))
            stack.append((e.rhs, d + 1, 1))
            continue
        if isinstance(e, S.Slice):
            dims += [x for x in (e.start, e.stop) if x is not None]
        stack.extend((c, d + 1, 1) for c in children(e))
    return dims


def check_dim_depth(dim: S.DimExpr, file: str) -> None:
    stack = [(dim, 1, 1)]
    while stack:
        x, d, terms = stack.pop()
        if d > MAX_DEPTH:
            raise RnncError(f"dimension expression nested more than {MAX_DEPTH} levels deep",
                            x.span, code="E104")  # fmt: skip
        if isinstance(x, S.DBin) and terms + 1 > MAX_TERMS:
            raise RnncError(f"a dimension expression of more than {MAX_TERMS} terms", x.span,
                            code="E104")  # fmt: skip
        if isinstance(x, S.DBin):
            same = isinstance(x.lhs, S.DBin) and GROUPS[x.lhs.op] == GROUPS[x.op]
            stack.append((x.lhs, d, terms + 1) if same else (x.lhs, d + 1, 1))
            stack.append((x.rhs, d + 1, 1))


def children(e: S.Expr) -> tuple[S.Expr, ...]:
    match e:
        case S.BinOp(_, lhs, rhs):
            return (lhs, rhs)
        case S.Neg(x) | S.Slice(x, _, _):
            return (x,)
        case S.Call(_, args, kwargs):
            return args + tuple(v for _, v in kwargs)
    return ()
