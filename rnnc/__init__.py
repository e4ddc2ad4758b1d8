"""rnnc: a compiler for recurrent neural networks. Public API: compile, parse, RnncError."""

from .compiler import Model
from .compiler import compile_spec as compile
from .errors import RnncError
from .parse import parse

__all__ = ["Model", "RnncError", "compile", "parse"]
__version__ = "0.1.0"
