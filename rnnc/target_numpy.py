"""The NumPy target, the readable reference every other target is checked against; and the
interface of a target: what lowering (lower.py) asks about the code it writes — the array
module, how a loop body is fused, how a line, a parameter and the module are written."""

from __future__ import annotations

from typing import Any

from .schedule import Loop, Plan

INIT_PARAMS = '''def init_params(seed=0, dtype=np.float32):
    """Fresh parameters, reproducible from `seed`."""
    rng = np.random.default_rng(seed)
    return {k: initialize(rng, s, kind, a).astype(dtype) for k, (s, kind, a) in PARAMS.items()}'''


def at(t: str, k: int) -> str:
    """The index text of step t + k."""
    return t if k == 0 else f"{t} + {k}" if k > 0 else f"{t} - {-k}"


class NumpyTarget:
    name, xp = "numpy", "np"  # the target's name, and the array module generated code calls
    running = True  # keeps a plan's running adjoints as one [B, ...] value (Plan.running)
    texts: tuple[str, ...] = ()  # module-level code the target adds (its names are taken)

    @classmethod
    def reserved(cls) -> set[str]:
        """The names the target's own module code defines or imports: no value may take one."""
        import ast

        out = {cls.xp}
        for text in cls.texts:
            for node in ast.parse(text).body:
                if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                    out.add(node.name)
                elif isinstance(node, ast.Assign):
                    out |= {t.id for t in node.targets if isinstance(t, ast.Name)}
                elif isinstance(node, (ast.Import, ast.ImportFrom)):
                    out |= {(a.asname or a.name).split(".")[0] for a in node.names}
        return out
    paired = False  # (a target whose kernels read and write rows keeps two rows of them)

    def fuse(self, plan: Plan, fname: str, namer) -> dict[int, list]:
        """Loop index -> its body as node lists (array code) and the target's own items
        (kernels); a loop left out is all array code."""
        return {}

    def rewrite(self, line: str) -> str:
        """A line of the NumPy array code, for this target."""
        return line

    def helper(self, name: str, source: str) -> str:
        """A kernels.py helper's source, for this target."""
        return source

    def prologue(self) -> list[str]:
        """Lines at the top of each function, after the data are checked."""
        return []

    def param(self, binding: str) -> str:
        """The line binding a parameter (`name = params['...']`)."""
        return binding

    def module(self, header: str, meta: str, body: str, helpers, kernels: list) -> str:
        """The module's text: imports, the helpers `helpers(code)` picks, the tables and
        functions."""
        code = meta + "\n\n\n" + INIT_PARAMS + "\n\n\n" + body + "\n"
        return f"{header}\n\nimport numpy as np\n\n\n{helpers(code)}\n\n\n{code}"

    def before_loop(self, em: Any, items: list, T: str) -> None:
        """Buffers the target's loop items need, before `for t in ...`."""

    def loop_start(self, em: Any, items: list, loop: Loop, T: str, seen: set) -> None:
        """Lines at the top of the loop body."""

    def item(self, em: Any, item: Any, loop: Loop, seen: set) -> None:
        """One of the target's own loop items (fuse's), written through the emitter em."""
        raise TypeError(f"the {self.name} target makes no loop items of its own: {item!r}")
