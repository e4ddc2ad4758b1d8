"""Program -> text: the canonical layout of a spec; parse(format(p)) == p, comments kept."""

from __future__ import annotations

from . import syntax as S

# Precedence of each printed form, lowest to highest (the grammar's ladder).
PREC = {"+": 1, "-": 1, "*": 2, "/": 2, "@": 3}
UNARY, POSTFIX, ATOM = 4, 5, 6


def fmt_num(v: float) -> str:
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return repr(v)


def fmt_dim(d: S.DimExpr, parent: int = 0, right: bool = False) -> str:
    match d:
        case S.DNum(v):
            return str(v)
        case S.DName(n):
            return n
        case S.DBin(op, lhs, rhs):
            p = 2 if op == "*" else 1
            text = f"{fmt_dim(lhs, p)} {op} {fmt_dim(rhs, p, right=True)}"
            return f"({text})" if p < parent or (right and p == parent) else text
    raise TypeError(d)


def fmt_dims(dims: tuple[S.DimExpr, ...]) -> str:
    """Shapes print compactly, as people write them: [H, H+I]."""
    return ", ".join(fmt_dim(d).replace(" ", "") for d in dims)


def prec(e: S.Expr) -> int:
    match e:
        case S.BinOp(op):
            return PREC[op]
        case S.Neg():
            return UNARY
        case S.Slice() | S.TimeRef() | S.Every():
            return POSTFIX
    return ATOM


def fmt_expr(e: S.Expr) -> str:
    match e:
        case S.Num(v):
            return fmt_num(v)
        case S.Name(n):
            return n
        case S.Every(n):
            return f"{n}[s]"
        case S.TimeRef(n, 0):
            return f"{n}[t]"
        case S.TimeRef(n, k):
            return f"{n}[t-{k}]" if k > 0 else f"{n}[t+{-k}]"
        case S.Slice(x, a, b):
            base = fmt_expr(x) if prec(x) >= POSTFIX else f"({fmt_expr(x)})"
            lo = fmt_dim(a).replace(" ", "") if a is not None else ""
            hi = fmt_dim(b).replace(" ", "") if b is not None else ""
            return f"{base}[{lo}:{hi}]"
        case S.Neg(x):
            inner = fmt_expr(x)
            return f"-{inner}" if prec(x) >= UNARY else f"-({inner})"
        case S.BinOp(op, lhs, rhs):
            p = PREC[op]
            left = fmt_expr(lhs) if prec(lhs) >= p else f"({fmt_expr(lhs)})"
            right = fmt_expr(rhs) if prec(rhs) > p else f"({fmt_expr(rhs)})"
            return f"{left} {op} {right}"
        case S.Call(fn, args, kwargs, mods):
            parts = [fmt_expr(a) for a in args] + [f"{k}={fmt_expr(v)}" for k, v in kwargs]
            prefix = "".join(fmt_mod(m) + " " for m in mods)
            return f"{prefix}{fn}({', '.join(parts)})"
    raise TypeError(e)


def fmt_mod(m: S.Modifier) -> str:
    if m.kind == "stack":
        return f"stack({m.arg})"
    if m.kind == "bidirectional" and m.arg is not None:
        return f"bidirectional({m.arg})"
    return m.kind


def fmt_init(i: S.Init) -> str:
    if i.kind == "constant" and len(i.args) == 1:
        return fmt_num(i.args[0])
    if not i.args:
        return i.kind
    return f"{i.kind}({', '.join(fmt_num(a) for a in i.args)})"


def fmt_stmt(s: S.Stmt) -> str:
    match s:
        case S.DimDecl(items):
            return "dim " + ", ".join(
                it.name + (f" = {fmt_dim(it.default)}" if it.default is not None else "")
                for it in items
            )
        case S.InputDecl(name, dims, kind, _, like):
            return f"input {name}[{fmt_dims(dims)}] : {kind}" + (f" like {like}" if like else "")
        case S.TargetDecl(name, dims, kind, classes):
            shape = f"[{fmt_dims(dims)}]" if dims is not None else ""
            if classes is None:
                what = kind
            elif kind == "sequence":
                what = f"sequence of class({fmt_dim(classes)})"
            else:
                what = f"class({fmt_dim(classes)})"
            return f"target {name}{shape} : {what}"
        case S.ParamDecl(items):
            return "param " + ", ".join(
                f"{it.name}[{fmt_dims(it.dims)}]"
                + (f" = {fmt_init(it.init)}" if it.init is not None else "")
                for it in items
            )
        case S.Equation(name, expr, gen):
            return ("generate " if gen else "") + f"{name} = {fmt_expr(expr)}"
    raise TypeError(s)


def fmt_use(item: S.Use) -> str:
    return "use " + ", ".join(item.names) + (f' from "{item.source}"' if item.source is not None else "")


def fmt_header(item: S.Model | S.Cell) -> str:
    if isinstance(item, S.Model):
        return f"model {item.name} {{"
    ins = ", ".join(f"{p.name}[{fmt_dims(p.dims)}]" for p in item.inputs)
    out = item.output
    return f"cell {item.name}({ins}) -> {out.name}[{fmt_dims(out.dims)}] {{"


def format_program(program: S.Program) -> str:
    """The canonical text: 2-space bodies, one statement a line, comments where they were."""
    comments = sorted(program.comments)
    used: set[int] = set()
    src_lines = program.source.splitlines()

    def blank_before(line: int) -> bool:
        return 1 < line <= len(src_lines) + 1 and src_lines[line - 2].strip() == ""

    def leading(before_line: int, indent: str) -> list[str]:
        out, last = [], None
        for i, (ln, _, text) in enumerate(comments):
            if i not in used and ln < before_line:
                used.add(i)
                if last is not None and ln - last > 1 and blank_before(ln):
                    out.append("")  # comment paragraphs stay apart
                out.append(indent + text)
                last = ln
        return out

    def trailing(start: int, end: int) -> str:
        found = []
        for i, (ln, _, text) in enumerate(comments):
            if i not in used and start <= ln <= end:
                used.add(i)
                found.append(text)
        return ("  " + "  ".join(found)) if found else ""

    out: list[str] = []
    for n, item in enumerate(program.items):
        if isinstance(item, S.Use):  # consecutive uses stay together
            if n and not isinstance(program.items[n - 1], S.Use):
                out.append("")
            out.extend(leading(item.span.line, ""))
            out.append(fmt_use(item) + trailing(item.span.line, item.span.end_line))
            continue
        if n:
            out.append("")
        out.extend(leading(item.span.line, ""))
        out.append(fmt_header(item) + trailing(item.span.line, item.span.line))
        prev_end = item.span.line
        for stmt in item.body:
            lead = leading(stmt.span.line, "  ")
            if (
                prev_end
                and stmt.span.line
                and stmt.span.line - prev_end > 1
                and (
                    blank_before(stmt.span.line - len(lead))
                    or (lead and blank_before(stmt.span.line))
                )
            ):
                out.append("")
            out.extend(lead)
            out.append("  " + fmt_stmt(stmt) + trailing(stmt.span.line, stmt.span.end_line))
            prev_end = stmt.span.end_line
        out.extend(leading(item.span.end_line, "  "))
        out.append("}" + trailing(item.span.end_line, item.span.end_line))
    rest = [text for i, (_, _, text) in enumerate(comments) if i not in used]
    if rest:
        out.append("")
        out.extend(rest)
    return "\n".join(out) + "\n"
