"""rnnc: a compiler for recurrent neural networks. Public API: compile, parse, RnncError;
training: rnnc.train (Trainer, Adam, SGD, Task, Arrays, Batches); decoding: rnnc.decode (greedy,
sampling, beam search); PyTorch: rnnc.interop (weights in and out) and rnnc.torch (a spec as a
torch.nn.Module)."""

from .compiler import Model
from .compiler import compile_spec as compile
from .errors import RnncError
from .parse import parse

__all__ = ["Model", "RnncError", "compile", "decode", "interop", "parse", "torch", "train"]


def __getattr__(name: str):
    if name in ("train", "interop", "torch", "decode"):  # imported on first use: compiling needs none of them
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(name)
__version__ = "0.1.0"
