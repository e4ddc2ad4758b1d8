"""The pipeline in one place: parse -> elaborate -> shapes -> check -> optimize -> grad ->
optimize -> schedule -> lower -> load. The Python API and the CLI call it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from .check import check, require_loss
from .elaborate import elaborate
from .errors import RnncError, Span, UsageError
from .grad import grad
from .graph import Graph, forward_outputs, validate
from .load import load_source
from .lower import lower
from .parse import parse, read_source
from .schedule import Plan, components, schedule
from .shapes import infer_shapes
from .syntax import Program


def parse_dims(items: Sequence[str] | None) -> dict[str, int]:
    """--dim NAME=N values as a dict; a malformed one is a usage error."""
    out = {}
    for item in items or ():
        name, eq, value = item.partition("=")
        value = value.strip()
        if not eq or not name.isidentifier() or not value.isdigit() or len(value) > 9 \
                or int(value) <= 0:  # fmt: skip
            raise UsageError(
                f"--dim {item[:40]}: write NAME=N with N a whole number from 1 to 999,999,999",
                code="E501",
            )
        out[name] = int(value)
    return out


def read_file(path: str) -> tuple[str, str]:
    """(text, path) of a spec file, or a clear error."""
    try:
        return read_source(path), path
    except FileNotFoundError:
        raise RnncError(f"no such file: {path}", code="E500") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RnncError(f"cannot read {path}: {e}", code="E500") from None


def read_spec(path_or_text: str) -> tuple[str, str]:
    """(text, file name): a path to a .rnn file, or the spec's text itself."""
    if "\n" not in path_or_text and (path_or_text.endswith(".rnn") or os.path.exists(path_or_text)):
        return read_file(path_or_text)
    return path_or_text, "<spec>"


def front(text: str, file: str, dims: dict[str, int] | None = None, model: str | None = None):
    """Parse, elaborate, infer shapes, check: the program and its checked graph."""
    program = parse(text, file)
    g = check(infer_shapes(elaborate(program, model), dims))
    return program, g


def checked(g: Graph) -> Graph:
    """The IR's invariants, checked after each pass when RNNC_CHECKS=1 (the tests set it)."""
    if os.environ.get("RNNC_CHECKS") == "1":
        validate(g)
    return g


@dataclass
class Model:
    """A compiled model: the generated module's functions, and what made them."""

    program: Program
    graph: Graph
    grad_graph: Graph | None
    plans: dict[str, Plan]
    source: str
    module: ModuleType | None = field(repr=False)
    target: str = "numpy"

    @property
    def xp(self) -> ModuleType:
        """The array module of this model's arrays: numpy, or cupy for the cupy target."""
        import numpy

        return self.module.cp if self.target == "cupy" else numpy

    def init_params(self, seed: int = 0, dtype: Any = None) -> dict:
        import numpy as np

        return self.module.init_params(seed, dtype or np.float32)

    def forward(self, params, inputs, **kw):
        return self.module.forward(params, inputs, **kw)

    def loss(self, params, inputs, targets, **kw):
        return self.module.loss(params, inputs, targets, **kw)

    def vjp(self, params, inputs, **kw):
        """A generator (compile_spec(..., vjp=True)): yields the outputs, is sent the targets,
        returns (loss, grads with the inputs') — the forward pass runs once."""
        return self.module.vjp(params, inputs, **kw)

    def loss_and_grads(self, params, inputs, targets, remat: int | None = None, **kw):
        """(loss, grads); with_inputs=True adds the gradient for each real-valued input.
        remat=K checkpoints over time: windows of K steps, one window's activations held at a
        time (rnnc.remat; the same gradients, one more forward pass)."""
        if self.grad_graph is None:
            require_loss(self.graph)
        if remat is not None:
            from .remat import loss_and_grads

            return loss_and_grads(self, params, inputs, targets, remat, **kw)
        return self.module.loss_and_grads(params, inputs, targets, **kw)

    @property
    def params(self) -> dict:
        return self.module.PARAMS

    @property
    def inputs(self) -> dict:
        return self.module.INPUTS

    @property
    def targets(self) -> dict:
        return self.module.TARGETS

    @property
    def masks(self) -> dict:
        """Dropout and zoneout masks: name -> (shape, time domain or 'static', kind, p)."""
        return self.module.MASKS

    def draw_masks(self, inputs, rng) -> dict:
        """Training's masks for a batch of `inputs`; pass them in `inputs` to fix them."""
        return self.module.draw_masks(inputs, rng)


TARGETS = ("numpy", "native", "cupy")


def numba_imports() -> bool:
    try:
        import numba  # noqa: F401
    except Exception:  # ImportError, or numba refusing this NumPy: the NumPy target then
        return False
    return True


def default_target() -> str:
    """The CPU target a model gets when none is named: $RNNC_TARGET if set, else native (the
    time loops compiled) where numba imports, else numpy."""
    chosen = os.environ.get("RNNC_TARGET", "").strip()
    if chosen:
        if chosen not in TARGETS:
            raise UsageError(f"RNNC_TARGET={chosen[:40]!r} is not a target", Span(),
                             hint="targets: " + ", ".join(TARGETS) + "; or unset it", code="E502")  # fmt: skip
        return chosen
    return "native" if numba_imports() else "numpy"


def require_numba() -> None:
    """Raise a worded error unless numba imports (the native target's compiler)."""
    try:
        import numba  # noqa: F401
    except Exception as e:  # ImportError, or numba refusing this NumPy
        raise RnncError(f"the native target needs numba, which does not import ({e})", Span(),
                        hint="pip install numba, or use --target numpy", code="E503") from None


def require_gpu() -> None:
    """Raise a worded error unless CuPy is installed and sees a working GPU."""
    try:
        import cupy
    except ImportError:
        raise RnncError(
            "the cupy target needs CuPy, which is not installed",
            Span(),
            hint="pip install 'rnnc[cupy]' (CuPy for CUDA 12; for CUDA 13: pip install "
            "cupy-cuda13x), or use --target numpy; "
            "`rnnc compile --target cupy` writes the code without it",
            code="E503",
        ) from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDARuntimeError and friends: no driver, or a broken install
        raise RnncError(
            f"the cupy target found no usable CUDA driver ({type(e).__name__}: {e})",
            Span(),
            hint="install the NVIDIA driver, or use --target numpy",
            code="E503",
        ) from None
    if count == 0:
        raise RnncError("the cupy target found no GPU", Span(), hint="use --target numpy",
                        code="E503")  # fmt: skip
    # CuPy's pip wheels load these from a CUDA toolkit at first use: check now, not mid-run
    probes = {"cuBLAS": lambda: cupy.cuda.cublas, "NVRTC": lambda: cupy.cuda.nvrtc.getVersion()}
    for lib, probe in probes.items():
        try:
            probe()
        except Exception as e:  # ImportError, RuntimeError: a shared library not found
            raise RnncError(
                f"the cupy target needs CUDA's {lib} library, which CuPy could not load "
                f"({type(e).__name__}: {e})",
                Span(),
                hint="install the CUDA toolkit your CuPy wheel was built for (cupy-cuda12x: "
                "CUDA 12), or `pip install nvidia-cublas-cu12 nvidia-cuda-nvrtc-cu12` and add "
                "their lib folders to LD_LIBRARY_PATH",
                code="E503",
            ) from None


def plans_for(g: Graph, gg: Graph | None, vjp: bool = False) -> dict[str, Plan]:
    base = gg if gg is not None else g  # one graph, so one set of names for every function
    cond = components(base)
    plans = {"forward": schedule(base, forward_outputs(base), cond)}
    if base.graph.get("loss") is not None:
        plans["loss"] = schedule(base, dict(base.graph["outputs"]), cond)
    if gg is not None:
        inputs = set(gg.graph["inputs"])
        wanted = {"loss": gg.graph["loss"]}
        wanted.update({"d" + k: v for k, v in gg.graph["grads"].items() if k not in inputs})
        plans["loss_and_grads"] = schedule(gg, wanted, cond)
        wanted.update({"d" + k: v for k, v in gg.graph["grads"].items()})
        plans["loss_and_all_grads"] = schedule(gg, wanted, cond)
        if vjp:  # the same, with the forward outputs; lowering pauses it for the targets
            plans["vjp"] = schedule(gg, {**wanted, **forward_outputs(gg)}, cond)
    return plans


def forward_model(program: Program, g: Graph, wanted: dict[str, int], target: str, suffix: str) -> Model:
    """A loaded model of one function, `forward`, computing `wanted` from g (a part of a
    compiled model: decoding's encoder, or its decoder alone)."""
    plans = {"forward": schedule(g, wanted)}
    source = lower(g, plans, g.graph["file"], target)
    return Model(program, g, None, plans, source, load_source(source, f"rnnc_{g.graph['model']}_{suffix}"), target)


def compile_spec(
    path_or_text: str,
    target: str | None = None,
    dims: dict[str, int] | None = None,
    model: str | None = None,
    optimize: bool = True,
    load: bool = True,
    vjp: bool = False,
) -> Model:
    """Compile a spec (a path or its text) into a loaded model. target: "numpy" (the readable
    reference), "native" (the time loops compiled by numba), "cupy" (needs CuPy and a GPU to
    load), or None: default_target(). load=False only generates the code (any machine).
    vjp=True adds `vjp`: loss_and_grads as a generator that pauses after the forward pass for
    the targets."""
    target = default_target() if target is None else target
    if target not in TARGETS:
        raise RnncError(f"unknown target '{target}'", Span(), hint="targets: " + ", ".join(TARGETS),
                        code="E502")  # fmt: skip
    if target == "cupy" and load:
        require_gpu()
    if target == "native" and load:
        require_numba()
    from .optimize import optimize as opt

    text, file = read_spec(path_or_text)
    program, g = front(text, file, dims, model)
    checked(g)
    if optimize:
        g = checked(opt(g))
    gg = checked(grad(g)) if g.graph.get("loss") is not None else None
    if gg is not None:
        require_loss(g)
        if optimize:
            gg = checked(opt(gg))
    plans = plans_for(g, gg, vjp)
    source = lower(gg if gg is not None else g, plans, file, target)
    module = load_source(source, "rnnc_" + g.graph["model"]) if load else None
    return Model(program, g, gg, plans, source, module, target)
