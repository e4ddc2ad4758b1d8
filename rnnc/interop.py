"""PyTorch weights in and out: torch.nn.RNN / LSTM / GRU (any num_layers, bidirectional,
proj_size, bias=False) <-> rnnc params of the library cells (rnnc/cells.rnn), which hold
PyTorch's parameter layout one to one. Every conversion runs both on a random batch in
float64 and refuses a result whose outputs differ by more than 1e-12 (relative).

    model, params, report = rnnc.interop.from_torch(nn.LSTM(8, 16, num_layers=2))
    state_dict = rnnc.interop.to_torch(model, params)     # torch tensors, for load_state_dict

A spec of your own works too, if its cell instance (default `h`) has the library cell's
params: `from_torch(module, model=compile("mine.rnn"))`. torch is imported only here."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from .compiler import Model, compile_spec
from .errors import RnncError, optional

TOLERANCE = 1e-12
CELL = {"RNN_TANH": "RNN", "RNN_RELU": "RNNReLU", "LSTM": "LSTM", "GRU": "GRU"}
KEY = re.compile(r"^(weight_ih|weight_hh|bias_ih|bias_hh|weight_hr)_l(\d+)(_reverse)?$")


@dataclass(frozen=True)
class Config:
    """What a torch.nn recurrent module is, read off its state_dict."""

    kind: str  # RNN_TANH | RNN_RELU | LSTM | GRU
    layers: int
    bidirectional: bool
    input_size: int
    hidden: int
    proj: int  # 0: none
    bias: bool

    @property
    def cell(self) -> str:
        return "LSTMP" if self.proj else CELL[self.kind]

    @property
    def width(self) -> int:
        return (self.proj or self.hidden) * (2 if self.bidirectional else 1)


def require_torch():
    return optional("torch", "converting PyTorch weights needs torch", "torch", "E570")


def as_numpy(sd: dict) -> dict[str, np.ndarray]:
    """A state_dict of torch tensors (or arrays) as float64 NumPy arrays, names checked."""
    out = {}
    for k, v in sd.items():
        if not KEY.match(str(k)):
            raise RnncError(f"'{k}' is not a parameter of torch.nn.RNN, LSTM or GRU",
                            hint="keys look like weight_ih_l0, bias_hh_l1_reverse, weight_hr_l0", code="E571")  # fmt: skip
        a = v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
        if a.dtype.kind != "f":
            raise RnncError(f"'{k}' holds {a.dtype}, not floating-point weights", code="E571")
        out[str(k)] = a.astype(np.float64)
    return out


def layer_kind(w_ih: np.ndarray, w_hh: np.ndarray, w_hr: np.ndarray | None, relu: bool) -> tuple[str, int, int]:
    """(kind, hidden size, proj size) of a first layer's weights: the kind from its gate rows."""
    proj = 0 if w_hr is None else w_hr.shape[0]
    hidden = w_hh.shape[1] if w_hr is None else w_hr.shape[1]
    gates = w_ih.shape[0] // hidden
    kind = {1: "RNN_RELU" if relu else "RNN_TANH", 3: "GRU", 4: "LSTM"}.get(gates)
    if kind is None or gates * hidden != w_ih.shape[0] or (proj and kind != "LSTM"):
        raise RnncError(f"weights {list(w_ih.shape)} and {list(w_hh.shape)} (input and recurrent, first "
                        "layer) fit no RNN, LSTM or GRU", code="E571")  # fmt: skip
    return kind, hidden, proj


def config_of(sd: dict[str, np.ndarray], nonlinearity: str = "tanh") -> Config:
    """The module a state_dict belongs to: kind from the gate rows, sizes from the shapes."""
    if "weight_ih_l0" not in sd or "weight_hh_l0" not in sd:
        raise RnncError("the state_dict has no weight_ih_l0 and weight_hh_l0",
                        hint="save torch.nn.RNN/LSTM/GRU's state_dict()", code="E571")  # fmt: skip
    layers = 1 + max(int(KEY.match(k).group(2)) for k in sd)  # type: ignore[union-attr]
    bidir = any(k.endswith("_reverse") for k in sd)
    kind, hidden, proj = layer_kind(sd["weight_ih_l0"], sd["weight_hh_l0"], sd.get("weight_hr_l0"),
                                    nonlinearity == "relu")  # fmt: skip
    cfg = Config(kind, layers, bidir, sd["weight_ih_l0"].shape[1], hidden, proj, "bias_ih_l0" in sd)
    missing = sorted(set(torch_names(cfg)) - set(sd))
    if missing:
        raise RnncError(f"the state_dict lacks '{missing[0]}' (a {cfg.kind} of {layers} layers"
                        f"{', bidirectional' if bidir else ''})", code="E571")  # fmt: skip
    return cfg


def torch_names(cfg: Config) -> list[str]:
    names = []
    for k in range(cfg.layers):
        for d in range(2 if cfg.bidirectional else 1):
            suffix = f"_l{k}" + ("_reverse" if d else "")
            names += [f"weight_ih{suffix}", f"weight_hh{suffix}"]
            names += [f"bias_ih{suffix}", f"bias_hh{suffix}"] if cfg.bias else []
            names += [f"weight_hr{suffix}"] if cfg.proj else []
    return names


def library_spec(cfg: Config, instance: str = "h") -> str:
    """A spec holding the module's weights: the library cell, stacked and bidirectional."""
    mods = (f"stack({cfg.layers}) " if cfg.layers > 1 else "") + ("bidirectional " if cfg.bidirectional else "")
    dims = f"dim I = {cfg.input_size}, H = {cfg.hidden}" + (f", P = {cfg.proj}" if cfg.proj else "")
    size = "H=H, P=P" if cfg.proj else "H=H"
    return (f"# torch.nn.{cfg.kind.split('_')[0]}: {cfg.layers} layer(s), "
            f"{'bidirectional' if cfg.bidirectional else 'one direction'}"
            f"{', proj_size ' + str(cfg.proj) if cfg.proj else ''}{'' if cfg.bias else ', bias=False'}\n"
            f"use {cfg.cell}\n\nmodel torch_{cfg.kind.lower()} {{\n  {dims}\n  input x[I] : sequence\n"
            f"  {instance} = {mods}{cfg.cell}(x, {size})\n}}\n")  # fmt: skip


def prefixes(model: Model, instance: str, cfg: Config) -> list[list[str]]:
    """rnnc's param prefix for each torch layer and direction, from the instance's rows."""
    rows = model.graph.graph["instances"].get(instance)
    if rows is None:
        names = ", ".join(model.graph.graph["instances"]) or "none"
        raise RnncError(f"the spec has no cell instance '{instance}' (its instances: {names})", code="E572")
    D = 2 if cfg.bidirectional else 1
    if len(rows) != cfg.layers or any(len(r) != D for r in rows):
        raise RnncError(f"'{instance}' has {len(rows)} layer(s) of {len(rows[0])} direction(s); the "
                        f"module has {cfg.layers} of {D}", code="E572")  # fmt: skip
    return rows


def mapping(model: Model, instance: str, cfg: Config) -> dict[str, str]:
    """torch name -> rnnc param name."""
    rows = prefixes(model, instance, cfg)
    out = {}
    for name in torch_names(dataclasses.replace(cfg, bias=True)):  # biases mapped even when absent
        m = KEY.match(name)
        assert m
        out[name] = f"{rows[int(m.group(2))][1 if m.group(3) else 0]}.{m.group(1)}"
    return out


def from_torch(module_or_state_dict: Any, model: Model | None = None, instance: str = "h",
               nonlinearity: str | None = None) -> tuple[Model, dict[str, np.ndarray], str]:  # fmt: skip
    """(model, params, report): rnnc params for a torch.nn.RNN/LSTM/GRU or its state_dict,
    checked by running both. Without `model`, the library spec that matches the module."""
    sd = module_or_state_dict
    if hasattr(sd, "state_dict"):
        nonlinearity = nonlinearity or getattr(sd, "nonlinearity", "tanh")
        sd = sd.state_dict()
    weights = as_numpy(sd)
    cfg = config_of(weights, nonlinearity or "tanh")
    model = model or compile_spec(library_spec(cfg, instance), target="numpy")  # one checked batch
    params = {k: np.asarray(v, np.float64) for k, v in model.init_params(0, np.float64).items()}
    for tname, rname in mapping(model, instance, cfg).items():
        if rname not in params:
            raise RnncError(f"the spec has no param '{rname}' to hold torch's '{tname}'", code="E572")
        w = weights.get(tname, np.zeros_like(params[rname]))  # bias=False: zero biases
        if w.shape != params[rname].shape:
            raise RnncError(f"param '{rname}' is {list(params[rname].shape)}; torch's '{tname}' is "
                            f"{list(w.shape)}", code="E572")  # fmt: skip
        params[rname] = w.copy()
    err = check(model, params, cfg, weights, instance)
    return model, params, f"{cfg.kind} ({len(weights)} tensors) -> {model.graph.graph['model']}: outputs agree to {err:.1e} (float64, limit {TOLERANCE:g})"


def to_torch(model: Model, params: dict, instance: str = "h", kind: str | None = None,
             bias: bool = True) -> dict:  # fmt: skip
    """A torch state_dict (float64 tensors) for rnnc params of a library-cell instance,
    checked by running a torch module built from it against the model."""
    torch = require_torch()
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    cfg = config_from_model(model, p, instance, kind, bias)
    sd = {}
    for tname, rname in mapping(model, instance, cfg).items():
        if tname.startswith("bias") and not bias:
            if np.any(p[rname] != 0):
                raise RnncError(f"param '{rname}' is not zero, and a bias=False module has no '{tname}'",
                                code="E572")  # fmt: skip
            continue
        sd[tname] = torch.tensor(p[rname])
    check(model, p, cfg, {k: v.numpy() for k, v in sd.items()}, instance)
    return sd


def config_from_model(model: Model, p: dict, instance: str, kind: str | None, bias: bool) -> Config:
    """The torch module an instance of a library cell corresponds to."""
    rows = model.graph.graph["instances"].get(instance) or [[instance]]
    first = rows[0][0]
    if f"{first}.weight_ih" not in p or f"{first}.weight_hh" not in p:
        raise RnncError(f"'{instance}' holds no library cell (no param '{first}.weight_ih')",
                        hint="use RNN, RNNReLU, LSTM, LSTMP or GRU from the library", code="E572")  # fmt: skip
    relu = kind == "RNN_RELU" or model.graph.graph.get("cells", {}).get(instance) == "RNNReLU"
    w_ih = p[f"{first}.weight_ih"]
    found, hidden, proj = layer_kind(w_ih, p[f"{first}.weight_hh"], p.get(f"{first}.weight_hr"), relu)
    return Config(kind or found, len(rows), len(rows[0]) == 2, w_ih.shape[1], hidden, proj, bias)


def torch_module(cfg: Config):
    torch = require_torch()
    nn = torch.nn
    kw = dict(input_size=cfg.input_size, hidden_size=cfg.hidden, num_layers=cfg.layers,
              bias=cfg.bias, bidirectional=cfg.bidirectional, dtype=torch.float64)  # fmt: skip
    if cfg.kind.startswith("RNN"):
        return nn.RNN(nonlinearity="relu" if cfg.kind == "RNN_RELU" else "tanh", **kw)
    if cfg.kind == "LSTM":
        return nn.LSTM(proj_size=cfg.proj, **kw)
    return nn.GRU(**kw)


def check(model: Model, params: dict, cfg: Config, weights: dict, instance: str) -> float:
    """Run torch and rnnc on one random batch in float64; the relative error of the outputs."""
    torch = require_torch()
    mod = torch_module(cfg)
    mod.load_state_dict({k: torch.tensor(v) for k, v in weights.items()})
    seq = [k for k, (_, dom, _) in model.inputs.items() if dom != "static"]
    if len(seq) != 1 or len(model.inputs) != 1:
        raise RnncError("the numeric check runs the spec on one input sequence; this spec has "
                        f"{', '.join(model.inputs) or 'none'}", code="E572")  # fmt: skip
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 3, cfg.input_size))
    with torch.no_grad():
        want = mod(torch.tensor(x))[0].numpy()
    got = model.forward(params, {seq[0]: x})[instance]
    err = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-300))
    if not err <= TOLERANCE:
        raise RnncError(f"converted, the outputs differ by {err:.1e} (relative; the limit is {TOLERANCE:g})",
                        hint="the spec's cell does not compute what the torch module does", code="E573")  # fmt: skip
    return err
