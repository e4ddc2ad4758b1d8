"""rnnc: a compiler for recurrent neural networks. Public API: compile, parse, RnncError;
training: rnnc.train (Trainer, Adam, SGD, Task, Arrays, Batches)."""

from .compiler import Model
from .compiler import compile_spec as compile
from .errors import RnncError
from .parse import parse

__all__ = ["Model", "RnncError", "compile", "parse", "train"]


def __getattr__(name: str):
    if name == "train":  # imported on first use: compiling needs none of it
        import importlib

        return importlib.import_module(".train", __name__)
    raise AttributeError(name)
__version__ = "0.1.0"
