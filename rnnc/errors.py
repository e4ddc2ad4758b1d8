"""User-facing errors: a source span, a worded message, a hint; rendered like rustc/Elm."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Span:
    """Where something is in a source file (1-based lines and columns, end exclusive)."""

    file: str = "<spec>"
    line: int = 0
    col: int = 0
    end_line: int = 0
    end_col: int = 0

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


NOWHERE = Span()


class RnncError(Exception):
    """An error in what the user wrote or asked for; the CLI prints it and exits 1.

    `code` groups errors by kind (E1xx syntax, E2xx names, E3xx shapes, E4xx time,
    E5xx data and files), so tests and documentation can refer to them.
    """

    def __init__(
        self, message: str, span: Span | None = None, hint: str | None = None, code: str = "E000"
    ):
        super().__init__(message)
        self.message = message
        self.span = span or NOWHERE
        self.hint = hint
        self.code = code

    def render(self, source: str | None = None) -> str:
        """`file:line:col: error[CODE]: message`, the source line, carets, `hint:`."""
        return render(self, source)


class UsageError(RnncError):
    """Command-line misuse: the CLI exits 2."""


class Warning_(RnncError):
    """A finding that does not stop compilation (unused input, unused param)."""


def render(err: RnncError, source: str | None = None, kind: str = "error") -> str:
    span = err.span
    if span.line <= 0:
        head = (
            f"{span.file}: {kind}[{err.code}]: {err.message}"
            if span.file != "<spec>"
            else (f"{kind}[{err.code}]: {err.message}")
        )
        return head + (f"\n  hint: {err.hint}" if err.hint else "")
    lines = [f"{span}: {kind}[{err.code}]: {err.message}"]
    text = source.splitlines() if source is not None else []
    if 0 < span.line <= len(text):
        src = printable(text[span.line - 1].expandtabs(1))
        gutter = f"{span.line:>4} | "
        end = (
            span.end_col if span.end_line == span.line and span.end_col > span.col else span.col + 1
        )
        end = min(max(end, span.col + 1), max(len(src) + 2, span.col + 1))
        src, col, end = window(src, span.col, end)
        lines.append(gutter + src)
        lines.append(" " * (len(gutter) - 2) + "| " + " " * (col - 1) + "^" * (end - col))
    if err.hint:
        lines.append(f"  hint: {err.hint}")
    return "\n".join(lines)


def optional(module: str, why: str, extra: str, code: str, hint: str = ""):
    """An optional package (an extra of rnnc), imported; or a worded error saying how to get it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise RnncError(why, hint=f"pip install 'rnnc[{extra}]'" + hint, code=code) from None


WIDTH = 100  # characters of a source line shown around the error


def printable(line: str) -> str:
    """The line with each control character shown as '?' (columns stay where they were)."""
    return "".join("?" if (ord(c) < 32 or ord(c) == 127) else c for c in line)


def window(src: str, col: int, end: int) -> tuple[str, int, int]:
    """At most WIDTH characters of a long line around columns col..end, marked with '...'."""
    if len(src) <= WIDTH:
        return src, col, end
    end = min(end, col + WIDTH // 2)  # a caret run longer than half the window is cut
    start = max(0, min(col - 1 - WIDTH // 4, len(src) - WIDTH))
    part = src[start : start + WIDTH]
    lead = "..." if start > 0 else ""
    tail = "..." if start + WIDTH < len(src) else ""
    shift = len(lead) - start
    return lead + part + tail, col + shift, end + shift
