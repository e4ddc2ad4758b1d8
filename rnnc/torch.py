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
the forward pass again (activation checkpointing: less memory, more time). Initial
states may be passed (and get gradients); `lengths` stop each sequence early. In train()
mode dropout and zoneout masks are drawn from the module's generator (seeded by `seed`); in
eval() mode dropout is off and zoneout at its expectation."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import syntax as S
from .compiler import Model, compile_spec, read_spec
from .errors import RnncError
from .format import format_program
from .parse import parse

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
                 recompute: bool = False):  # fmt: skip
        super().__init__()
        self.recompute = recompute
        text, file = read_spec(spec)
        self.fwd: Model = compile_spec(text, dims=dims, model=model)
        g = self.fwd.graph
        if output not in g.graph["outputs"]:
            raise RnncError(f"the model has no output '{output}' (its outputs: "
                            f"{', '.join(g.graph['outputs'])})", code="E574")  # fmt: skip
        seq = [k for k, (_, dom, _) in self.fwd.inputs.items() if dom != "static"]
        if len(seq) != 1 or len(self.fwd.inputs) != 1:
            raise RnncError("rnnc.torch.Module takes models with one input sequence; this one has "
                            f"{', '.join(self.fwd.inputs) or 'none'}", code="E574")  # fmt: skip
        self.input, self.output = seq[0], output
        node = g.graph["outputs"][output]
        shape = tuple(g.nodes[node]["shape"])
        self.bwd: Model = compile_spec(vjp_spec(text, file, output, shape, model), dims=dims,
                                       model=model, vjp=True)  # fmt: skip
        self.names = list(self.fwd.params)
        self.rng = np.random.default_rng(seed)
        self.params_ = torch.nn.ParameterList(
            torch.nn.Parameter(torch.from_numpy(v).to(dtype)) for v in self.fwd.init_params(seed, np.float64).values()
        )  # fmt: skip

    def named_rnnc_parameters(self) -> dict[str, torch.nn.Parameter]:
        """rnnc's parameter names (h.weight_ih, ...) -> the tensors."""
        return dict(zip(self.names, self.params_, strict=True))

    def arrays(self, params) -> dict[str, np.ndarray]:
        """NumPy views of the parameter tensors (CPU; no copies)."""
        return {n: p.detach().numpy() for n, p in zip(self.names, params, strict=True)}

    def inputs(self, x, init_names: list, inits, masks: dict) -> dict[str, np.ndarray]:
        """rnnc's inputs: the sequence, the initial states, the masks (NumPy views)."""
        return {self.input: x.detach().numpy(), **masks,
                **{k: v.detach().numpy() for k, v in zip(init_names, inits, strict=True)}}  # fmt: skip

    def forward(self, x, lengths=None, init: dict | None = None):
        """x: [T, B, features]; lengths: [B] ints or None; init: {"<state>.init": [B, ...]}."""
        init = dict(init or {})
        if x.device.type != "cpu":
            raise RnncError("rnnc.torch.Module runs on the CPU (the CuPy target is not wired to torch)",
                            code="E574")  # fmt: skip
        x = x.to(self.params_[0].dtype) if len(self.params_) else x
        # train(): dropout and zoneout masks drawn from the module's generator, the same ones
        # for the backward pass; eval(): none (dropout off, zoneout at its expectation)
        masks = self.fwd.draw_masks({self.input: x.detach().numpy()}, self.rng) \
            if self.training and self.fwd.masks else {}  # fmt: skip
        tensors = (x, *init.values(), *self.params_)
        if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
            with torch.no_grad():  # no gradient will be asked for: no tape
                L = None if lengths is None else {self.input: np.asarray(lengths)}
                inputs = self.inputs(x, list(init), list(init.values()), masks)
                out = self.fwd.forward(self.arrays(self.params_), inputs, lengths=L)[self.output]
                return torch.from_numpy(np.array(out))
        return Function.apply(self, x, (lengths, masks), list(init), *init.values(), *self.params_)


class Function(torch.autograd.Function):
    """forward: rnnc's forward pass; backward: rnnc's BPTT seeded with torch's gradient. The
    initial states come as tensor arguments, so that they get gradients too."""

    @staticmethod
    def forward(ctx, owner: Module, x, lengths_masks, init_names: list, *tensors):  # type: ignore[override]
        lengths, masks = lengths_masks
        inits, params = tensors[: len(init_names)], tensors[len(init_names) :]
        arrays = owner.arrays(params)
        inputs = owner.inputs(x, init_names, inits, masks)
        L = None if lengths is None else {owner.input: np.asarray(lengths)}
        if owner.recompute:
            ctx.tape = None
            out = owner.fwd.forward(arrays, inputs, lengths=L)[owner.output]
        else:  # the forward pass, its tape kept in the paused generator for the backward pass
            ctx.tape = owner.bwd.vjp(arrays, inputs, lengths=L)
            out = next(ctx.tape)[owner.output]
        ctx.owner, ctx.L, ctx.init_names, ctx.masks = owner, L, init_names, masks
        ctx.save_for_backward(x, *tensors)  # torch checks that none changed in place
        return torch.from_numpy(np.array(out))  # a copy: the tape keeps its own

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        owner = ctx.owner
        x, *tensors = ctx.saved_tensors
        n = len(ctx.init_names)
        inits, params = tensors[:n], tensors[n:]
        seed = {f"d_{owner.output}": np.ascontiguousarray(g.detach().numpy(), dtype=x.detach().numpy().dtype)}
        if ctx.tape is not None:
            try:
                ctx.tape.send(seed)
            except StopIteration as done:
                _, grads = done.value
            ctx.tape = None
        else:  # recompute, or a second backward pass (retain_graph=True): forward once more
            inputs = owner.inputs(x, ctx.init_names, inits, ctx.masks)
            _, grads = owner.bwd.loss_and_grads(owner.arrays(params), inputs, seed, lengths=ctx.L,
                                                with_inputs=True)  # fmt: skip
        B = x.shape[1]  # rnnc's losses are means over the batch
        grad = lambda a: torch.from_numpy(np.ascontiguousarray(a) * B)  # noqa: E731
        dx = grad(grads[owner.input]) if ctx.needs_input_grad[1] else None
        return (None, dx, None, None, *(grad(grads[k]) for k in ctx.init_names),
                *(grad(grads[name]) for name in owner.names))
