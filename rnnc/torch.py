"""A .rnn model as a torch.nn.Module: its parameters are torch tensors, its forward and
backward passes rnnc's compiled code, joined by a torch.autograd.Function. On the CPU the
arrays rnnc reads are NumPy views of the tensors (no copies).

    cell = rnnc.torch.Module("mycell.rnn", output="h", dims={"H": 64})
    opt = torch.optim.Adam(cell.parameters())
    y = cell(x)                       # x: [T, B, I]; y: [T, B, ...] (zero past each length)
    loss = y.pow(2).mean(); loss.backward(); opt.step()

The backward pass is the spec's own BPTT: rnnc compiles the model a second time with the
loss `dot(output, d_output)` — a linear loss whose gradient is exactly the vector-Jacobian
product torch asks for (times the batch size, which rnnc's losses average over). When a
gradient will be wanted, the forward pass runs as that model's `vjp` generator, which keeps
its tape and, sent torch's gradient, runs only the backward pass; without one (no_grad,
nothing requiring a gradient) the plain forward pass runs, keeping nothing. With
recompute=True the module keeps nothing between the passes either, and the backward pass runs
the forward pass again (activation checkpointing: less memory, more time); remat=K does it
in windows of K steps, so the backward pass too holds O(T/K + K) steps (rnnc.remat). Initial
states may be passed (and get gradients); `lengths` stop each sequence early. In train()
mode dropout and zoneout masks are drawn from the module's generator (seeded by `seed`); in
eval() mode dropout is off and zoneout at its expectation."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import syntax as S
from .compiler import Model, compile_spec, default_target, read_spec
from .errors import RnncError
from .format import format_program
from .parse import parse
from .remat import require_windowable

try:
    import torch
except ImportError as e:  # pragma: no cover - the message names the extra
    raise ImportError("rnnc.torch needs PyTorch: pip install 'rnnc[torch]'") from e


def vjp_spec(text: str, file: str, output: str, shape: tuple[int, ...], model: str | None) -> str:
    """The spec's model with its loss and targets replaced by `loss = dot(output, d_output)`."""
    program = parse(text, file)
    models = [i for i in program.items if isinstance(i, S.Model)]
    target = next((m for m in models if m.name == model), models[-1] if models else None)
    if target is None:
        raise RnncError(f"{file} defines no model", code="E216")
    body = [s for s in target.body
            if not isinstance(s, S.TargetDecl) and not (isinstance(s, S.Equation) and s.name == "loss")]  # fmt: skip
    seed = f"d_{output}"
    body.append(S.TargetDecl(seed, tuple(S.DNum(n) for n in shape), "sequence"))
    body.append(S.Equation("loss", S.Call("dot", (S.Name(output), S.Name(seed)))))
    items = tuple(S.Model(i.name, tuple(body), i.span) if i is target else i for i in program.items)
    return format_program(S.Program(items, file))


class Module(torch.nn.Module):
    """A compiled .rnn model as a torch.nn.Module returning one named output sequence."""

    def __init__(self, spec: str, output: str = "h", dims: dict[str, int] | None = None,
                 model: str | None = None, seed: int = 0, dtype: Any = torch.float32,
                 recompute: bool = False, target: str | None = None, remat: int | None = None):  # fmt: skip
        super().__init__()
        if target not in (None, "numpy", "native", "cupy"):
            raise RnncError(f"unknown target '{target}' (numpy, native, cupy, or None: by the device)",
                            code="E574")  # fmt: skip
        # remat=K: recompute in the backward pass in windows of K steps (rnnc.remat)
        self.recompute, self.target, self.remat = recompute or bool(remat), target, remat
        self.text, self.file = read_spec(spec)
        self.dims, self.model = dims, model
        fwd = compile_spec(self.text, target="numpy", dims=dims, model=model)
        g = fwd.graph
        if output not in g.graph["outputs"]:
            raise RnncError(f"the model has no output '{output}' (its outputs: "
                            f"{', '.join(g.graph['outputs'])})", code="E574")  # fmt: skip
        seq = [k for k, (_, dom, _) in fwd.inputs.items() if dom != "static"]
        if len(seq) != 1 or len(fwd.inputs) != 1:
            raise RnncError("rnnc.torch.Module takes models with one input sequence; this one has "
                            f"{', '.join(fwd.inputs) or 'none'}", code="E574")  # fmt: skip
        self.input, self.output = seq[0], output
        self.compiled: dict[str, tuple[Model, Model]] = {"numpy": (fwd, self.vjp_model(fwd, "numpy"))}
        self.fwd, self.bwd = self.compiled["numpy"]
        if remat:
            require_windowable(self.bwd)
        self.names = list(fwd.params)
        self.rng = np.random.default_rng(seed)
        self.params_ = torch.nn.ParameterList(
            torch.nn.Parameter(torch.from_numpy(v).to(dtype)) for v in fwd.init_params(seed, np.float64).values()
        )  # fmt: skip

    def models(self, target: str) -> tuple[Model, Model]:
        """The model of the forward pass and the one whose gradient is the VJP, for `target`
        (compiled on first use: the CuPy target needs CuPy and a GPU)."""
        if target not in self.compiled:
            fwd = compile_spec(self.text, target=target, dims=self.dims, model=self.model)
            self.compiled[target] = (fwd, self.vjp_model(fwd, target))
        return self.compiled[target]

    def vjp_model(self, fwd: Model, target: str) -> Model:
        """The model with the loss dot(output, d_output), its vjp generator compiled too."""
        node = fwd.graph.graph["outputs"][self.output]
        shape = tuple(fwd.graph.nodes[node]["shape"])
        text = vjp_spec(self.text, self.file, self.output, shape, self.model)
        return compile_spec(text, target=target, dims=self.dims, model=self.model, vjp=True)

    def named_rnnc_parameters(self) -> dict[str, torch.nn.Parameter]:
        """rnnc's parameter names (h.weight_ih, ...) -> the tensors."""
        return dict(zip(self.names, self.params_, strict=True))

    def target_for(self, x) -> str:
        """The target given, or the one for the tensors' device: CuPy for a CUDA tensor."""
        want = self.target or ("cupy" if x.device.type == "cuda" else default_target())
        if want != "cupy" and x.device.type != "cpu":
            raise RnncError(f"the {want} target runs on the CPU; these tensors are on {x.device} "
                            "(target='cupy' runs on CUDA devices)", code="E574")  # fmt: skip
        return want

    def forward(self, x, lengths=None, init: dict | None = None):
        """x: [T, B, features]; lengths: [B] ints or None; init: {"<state>.init": [B, ...]}."""
        init = dict(init or {})
        target = self.target_for(x)
        x = x.to(self.params_[0].dtype) if len(self.params_) else x
        # train(): dropout and zoneout masks drawn from the module's generator (on the host,
        # the same for either target), the same ones for the backward pass; eval(): none
        shape_only = {self.input: np.broadcast_to(np.zeros((), np.float64), tuple(x.shape))}
        masks = self.fwd.draw_masks(shape_only, self.rng) if self.training and self.fwd.masks else {}
        tensors = (x, *init.values(), *self.params_)
        if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
            with torch.no_grad():  # no gradient will be asked for: no tape
                fwd = self.models(target)[0]
                out = fwd.forward(arrays(self.names, self.params_, target), inputs(self, x, list(init),
                                  list(init.values()), masks, target), lengths=steps(self, lengths))[self.output]  # fmt: skip
                return tensor(out, target, copy=True)
        return Function.apply(self, x, (lengths, masks, target), list(init), *init.values(), *self.params_)


def to_array(t, target: str):
    """The array rnnc reads for a tensor, sharing its memory: a NumPy view on the CPU, a CuPy
    array through DLPack on the GPU."""
    t = t.detach()
    if target != "cupy":  # numpy, native: the CPU
        return t.numpy()
    import cupy

    return cupy.from_dlpack(t.contiguous())


def tensor(a, target: str, copy: bool = False):
    """A torch tensor of rnnc's array (copied first where the array is the tape's own)."""
    if target != "cupy":
        return torch.from_numpy(np.array(a) if copy else np.ascontiguousarray(a))
    import cupy

    return torch.from_dlpack(a.copy() if copy else cupy.ascontiguousarray(a))


def arrays(names: list[str], params, target: str) -> dict:
    return {n: to_array(p, target) for n, p in zip(names, params, strict=True)}


def inputs(owner: Module, x, init_names: list, inits, masks: dict, target: str) -> dict:
    """rnnc's inputs: the sequence, the initial states, the masks (views of the tensors)."""
    return {owner.input: to_array(x, target), **masks,
            **{k: to_array(v, target) for k, v in zip(init_names, inits, strict=True)}}  # fmt: skip


def steps(owner: Module, lengths) -> dict | None:
    return None if lengths is None else {owner.input: np.asarray(lengths)}


class Function(torch.autograd.Function):
    """forward: rnnc's forward pass; backward: rnnc's BPTT seeded with torch's gradient. The
    initial states come as tensor arguments, so that they get gradients too."""

    @staticmethod
    def forward(ctx, owner: Module, x, lengths_masks, init_names: list, *tensors):  # type: ignore[override]
        lengths, masks, target = lengths_masks
        fwd, bwd = owner.models(target)
        inits, params = tensors[: len(init_names)], tensors[len(init_names) :]
        given = arrays(owner.names, params, target)
        data = inputs(owner, x, init_names, inits, masks, target)
        L = steps(owner, lengths)
        if owner.recompute:
            ctx.tape = None
            out = fwd.forward(given, data, lengths=L)[owner.output]
        else:  # the forward pass, its tape kept in the paused generator for the backward pass
            ctx.tape = bwd.vjp(given, data, lengths=L)
            out = next(ctx.tape)[owner.output]
        ctx.owner, ctx.L, ctx.init_names, ctx.masks, ctx.target = owner, L, init_names, masks, target
        ctx.save_for_backward(x, *tensors)  # torch checks that none changed in place
        return tensor(out, target, copy=True)  # a copy: the tape keeps its own

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        owner, target = ctx.owner, ctx.target
        x, *tensors = ctx.saved_tensors
        n = len(ctx.init_names)
        inits, params = tensors[:n], tensors[n:]
        seed = {f"d_{owner.output}": to_array(g.to(x.dtype), target)}
        if ctx.tape is not None:
            try:
                ctx.tape.send(seed)
            except StopIteration as done:
                _, grads = done.value
            ctx.tape = None
        else:  # recompute, or a second backward pass (retain_graph=True): forward once more
            data = inputs(owner, x, ctx.init_names, inits, ctx.masks, target)
            _, grads = owner.models(target)[1].loss_and_grads(
                arrays(owner.names, params, target), data, seed, lengths=ctx.L, with_inputs=True,
                remat=owner.remat)  # fmt: skip
        B = x.shape[1]  # rnnc's losses are means over the batch
        grad = lambda a: tensor(a * B, target)  # noqa: E731
        dx = grad(grads[owner.input]) if ctx.needs_input_grad[1] else None
        return (None, dx, None, None, *(grad(grads[k]) for k in ctx.init_names),
                *(grad(grads[name]) for name in owner.names))
