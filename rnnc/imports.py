"""Program -> Program: `use` statements replaced by the cells they name.

`use LSTM, GRU` takes cells from rnnc's library (rnnc/cells.rnn); `use Mine from "x.rnn"`
from a file, by a path relative to the spec that says it (files may use other files; a cycle
is refused). A name defined twice — a cell of the spec and an imported one, or two imports —
is a located error, as is a name the source does not define."""

from __future__ import annotations

import difflib
import os
from importlib import resources

from . import syntax as S
from .errors import RnncError, Span
from .parse import parse, read_source

LIBRARY = "rnnc's library"


def library_text() -> tuple[str, str]:
    """(text, file name) of the library of cells shipped with rnnc."""
    ref = resources.files("rnnc").joinpath("cells.rnn")
    return ref.read_text(encoding="utf-8"), str(ref)


def source_of(use: S.Use, importer: str) -> tuple[str, str]:
    """(text, file name) of the file a `use` reads."""
    if use.source is None:
        return library_text()
    base = os.path.dirname(importer) if importer not in ("<spec>", "") else os.getcwd()
    path = os.path.normpath(os.path.join(base, use.source))
    try:
        return read_source(path), path
    except FileNotFoundError:
        raise RnncError(f"use ... from \"{use.source}\": no file '{path}'", use.span,
                        hint="the path is relative to the spec that says `use`", code="E217") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RnncError(f"use ... from \"{use.source}\": cannot read '{path}' ({e})", use.span,
                        code="E217") from None  # fmt: skip


def cells_of(text: str, file: str, chain: tuple[str, ...]) -> dict[str, S.Cell]:
    """The cells a file defines, its own imports resolved."""
    program = with_imports(parse(text, file), chain)
    return {c.name: c for c in program.items if isinstance(c, S.Cell)}


def with_imports(program: S.Program, chain: tuple[str, ...] = ()) -> S.Program:
    """The program with each `use` replaced by the cells it names (appended after its own)."""
    uses = [u for u in program.items if isinstance(u, S.Use)]
    if not uses:
        return program
    own = [i for i in program.items if not isinstance(i, S.Use)]
    defined: dict[str, Span] = {i.name: i.span for i in own}
    imported: list[S.Cell] = []
    files: dict[str, dict[str, S.Cell]] = {}
    for use in uses:
        text, file = source_of(use, program.file)
        key = os.path.realpath(file)
        if key in chain:
            raise RnncError(f"use ... from \"{use.source}\": the files use each other in a cycle",
                            use.span, code="E217")  # fmt: skip
        if key not in files:
            files[key] = cells_of(text, file, (*chain, os.path.realpath(program.file)))
        available = files[key]
        where = LIBRARY if use.source is None else f"'{use.source}'"
        for name, span in zip(use.names, use.name_spans or (use.span,) * len(use.names), strict=False):
            if name not in available:
                close = difflib.get_close_matches(name, available, 1)
                raise RnncError(f"{where} has no cell '{name}'", span,
                                hint=f"did you mean '{close[0]}'?" if close
                                else "its cells: " + ", ".join(available), code="E217")  # fmt: skip
            if name in defined:
                raise RnncError(f"'{name}' is defined twice: here (from {where}) and at {defined[name]}",
                                span, hint=f"rename one of them, or drop `use {name}`", code="E202")  # fmt: skip
            for needed in [name, *sorted(calls(available[name], available) - {name})]:
                if needed == name or needed not in {c.name for c in imported}:
                    if needed != name and needed in defined:
                        raise RnncError(f"'{needed}' (which {name} uses) is defined twice: in {where} and "
                                        f"at {defined[needed]}", span, hint=f"rename your '{needed}'",
                                        code="E202")  # fmt: skip
                    defined[needed] = span
                    imported.append(available[needed])
    return S.Program((*own, *imported), program.file, program.source, program.comments)


def calls(cell: S.Cell, cells: dict[str, S.Cell], seen: set[str] | None = None) -> set[str]:
    """The cells `cell` instantiates, directly or through others, among `cells`."""
    seen = set() if seen is None else seen
    todo = [s.expr for s in cell.body if isinstance(s, S.Equation)]
    while todo:
        e = todo.pop()
        if isinstance(e, S.Call):
            if e.fn in cells and e.fn not in seen:
                seen.add(e.fn)
                calls(cells[e.fn], cells, seen)
            todo += list(e.args)
        elif isinstance(e, S.BinOp):
            todo += [e.lhs, e.rhs]
        elif isinstance(e, (S.Neg, S.Slice)):
            todo.append(e.expr)
    return seen
