"""The AST of the .rnn language: frozen dataclasses, each with a span that equality ignores."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import NOWHERE, Span

# ----- Dimension expressions -----


@dataclass(frozen=True, slots=True)
class DNum:
    value: int
    span: Span = field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class DName:
    name: str
    span: Span = field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class DBin:
    op: str  # '+', '-', '*'
    lhs: DimExpr
    rhs: DimExpr
    span: Span = field(default=NOWHERE, compare=False, repr=False)


DimExpr = DNum | DName | DBin


# ----- Expressions -----


@dataclass(frozen=True, slots=True)
class Num:
    value: float
    span: Span = field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Name:
    name: str
    span: Span = field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class TimeRef:
    """`name[t-k]` has delay k; `name[t+k]` has delay -k (a read from the future)."""

    name: str
    delay: int
    span: Span = field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Every:
    """`name[s]`: every step s of a sequence, read from each step of another (attention); a
    reduction `over=s` brings it back to one value per step."""

    name: str
    span: Span = field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Slice:
    """`expr[start:stop]` over the feature axis (gate slicing)."""

    expr: Expr
    start: DimExpr | None
    stop: DimExpr | None
    span: Span = field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class BinOp:
    op: str  # '+', '-', '*', '/', '@'
    lhs: Expr
    rhs: Expr
    span: Span = field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Neg:
    expr: Expr
    span: Span = field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Modifier:
    """`bidirectional(merge)`, `reverse` or `stack(n)` in front of a cell call."""

    kind: str  # 'bidirectional', 'reverse', 'stack'
    arg: str | int | None = None
    span: Span = field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Call:
    fn: str
    args: tuple[Expr, ...] = ()
    kwargs: tuple[tuple[str, Expr], ...] = ()
    mods: tuple[Modifier, ...] = ()
    span: Span = field(default=NOWHERE, compare=False, repr=False)


Expr = Num | Name | TimeRef | Every | Slice | BinOp | Neg | Call


# ----- Declarations and statements -----


@dataclass(frozen=True, slots=True)
class DimItem:
    name: str
    default: DimExpr | None = None
    span: Span = field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class DimDecl:
    items: tuple[DimItem, ...]
    span: Span = field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class InputDecl:
    name: str
    dims: tuple[DimExpr, ...]
    kind: str  # 'sequence' | 'static'
    span: Span = field(default=NOWHERE, compare=False, repr=False)
    like: str | None = None  # `sequence like x`: on the clock of input x


@dataclass(frozen=True, slots=True)
class TargetDecl:
    """A target: real-valued (`dims`) or class labels (`classes`), per step or per sequence."""

    name: str
    dims: tuple[DimExpr, ...] | None
    kind: str  # 'sequence' | 'static'
    classes: DimExpr | None = None
    span: Span = field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Init:
    """A parameter initializer: `constant(v)`, `zeros`, `uniform(a, b)`, `glorot`, ..."""

    kind: str
    args: tuple[float, ...] = ()
    span: Span = field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class ParamItem:
    name: str
    dims: tuple[DimExpr, ...]
    init: Init | None = None
    span: Span = field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class ParamDecl:
    items: tuple[ParamItem, ...]
    span: Span = field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Equation:
    name: str
    expr: Expr
    generate: bool = False  # `generate x = ...`: replaces input x when sampling
    span: Span = field(default=NOWHERE, compare=False, repr=False)


Stmt = DimDecl | InputDecl | TargetDecl | ParamDecl | Equation


@dataclass(frozen=True, slots=True)
class Port:
    name: str
    dims: tuple[DimExpr, ...]
    span: Span = field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Cell:
    name: str
    inputs: tuple[Port, ...]
    output: Port
    body: tuple[Stmt, ...]
    span: Span = field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Model:
    name: str
    body: tuple[Stmt, ...]
    span: Span = field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Use:
    """`use A, B` (the library) or `use A from "file.rnn"`: cells defined elsewhere."""

    names: tuple[str, ...]
    source: str | None  # a path relative to the spec; None: rnnc's library
    span: Span = field(default=NOWHERE, compare=False, repr=False)
    name_spans: tuple[Span, ...] = field(default=(), compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Program:
    items: tuple[Model | Cell | Use, ...]
    file: str = field(default="<spec>", compare=False)
    source: str = field(default="", compare=False, repr=False)
    # (line, col, text) of every comment, so that `rnnc fmt` never loses one
    comments: tuple[tuple[int, int, str], ...] = field(default=(), compare=False, repr=False)
