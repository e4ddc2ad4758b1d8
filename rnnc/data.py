"""User data checked against a compiled model: names, shapes, dtypes, finiteness, labels, and
the sizes that must agree (T per time domain, B across every array). Every refusal names the
file and the tensor."""

from __future__ import annotations

import numpy as np

from .errors import RnncError
from .kernels import check_data as check_sizes

LENGTHS_SUFFIX = ".lengths"


def check_data(arrays: dict[str, np.ndarray], m, source: str, dtype=np.float32,
               targets: bool = True) -> tuple[dict, dict | None, dict | None]:  # fmt: skip
    """(inputs, targets, lengths) for a compiled model `m` from the arrays of a file or a task.

    Targets are checked when `targets` is True (None when the model has none, or when
    `targets` is "if present" and the file lacks one). Values must be finite in `dtype`."""
    inputs = check_values(arrays, m.inputs, "input", source, dtype)
    want = targets is True or (targets == "if present" and all(k in arrays for k in m.targets))
    tgs = check_values(arrays, m.targets, "target", source, dtype) if want and m.targets else None
    try:
        check_sizes(inputs, m.inputs, tgs, m.targets if tgs is not None else None)
    except (ValueError, KeyError) as e:
        raise RnncError(f"{source}: {e.args[0]}", code="E516") from None
    return inputs, tgs, check_lengths(arrays, inputs, m.inputs, source)


def check_values(arrays: dict, table: dict, kind: str, source: str, dtype=np.float32) -> dict:
    """The arrays named in `table` (a compiled module's INPUTS or TARGETS: name -> (feature
    shape, time domain or 'static', holds class labels)), each checked on its own."""
    out = {}
    for name, (shape, level, labels) in table.items():
        if name not in arrays:
            have = ", ".join(sorted(arrays)) or "none"
            raise RnncError(
                f"{source}: no array named '{name}' (the {kind} '{name}')",
                hint=f"arrays in the file: {have}",
                code="E510",
            )
        a = np.asarray(arrays[name])
        lead = 2 if level != "static" else 1
        want = ("T", "B") if lead == 2 else ("B",)
        expect = want if labels else want + tuple(shape)
        if a.ndim != len(expect) or (not labels and tuple(a.shape[lead:]) != tuple(shape)):
            raise RnncError(
                f"{source}: '{name}' has shape {list(a.shape)}; expected [{', '.join(map(str, expect))}]",
                hint="sequences are laid out [time, batch, features]; per-sequence values [batch, features]",
                code="E511",
            )
        if a.size == 0:
            raise RnncError(f"{source}: '{name}' is empty (shape {list(a.shape)})", code="E512")
        out[name] = check_labels(a, shape[0], name, source) if labels else \
            real_values(a, name, source, dtype)  # fmt: skip
    return out


def check_labels(a: np.ndarray, k: int, name: str, source: str) -> np.ndarray:
    if a.dtype.kind not in "iu":
        raise RnncError(
            f"{source}: '{name}' holds class labels and must be integers, got {a.dtype}",
            code="E513",
        )
    if a.min() < 0 or a.max() >= k:
        bad = a[(a < 0) | (a >= k)].flat[0]
        raise RnncError(f"{source}: '{name}' has label {bad}, outside 0..{k - 1}", code="E514")
    return a


def real_values(a: np.ndarray, name: str, source: str, dtype=np.float32) -> np.ndarray:
    """`a` if it holds real numbers, finite and within `dtype`'s range (1e300 is finite in
    float64 and infinity in float32); a worded refusal otherwise."""
    if a.dtype.kind not in "biuf":  # complex, strings, structured records, dates
        what = "complex numbers" if a.dtype.kind == "c" else f"{a.dtype} values"
        raise RnncError(f"{source}: '{name}' holds {what}, not real numbers", code="E513")
    if a.dtype.kind == "f":
        bad = ~np.isfinite(a)
        if bad.any():
            where = [int(i) for i in np.argwhere(bad)[0]]
            raise RnncError(
                f"{source}: '{name}' holds NaN or infinity, first at index {where}", code="E515"
            )
    limit = np.finfo(dtype).max
    if a.dtype.kind == "f" and a.dtype.itemsize > np.dtype(dtype).itemsize:
        big = np.abs(a) > limit
        if big.any():
            where = [int(i) for i in np.argwhere(big)[0]]
            raise RnncError(
                f"{source}: '{name}' holds {a[tuple(where)]:.3g} at index {where}, beyond "
                f"{np.dtype(dtype).name}'s largest number ({limit:.3g})",
                hint="rescale the data, or compute in float64 (--float64)",
                code="E515",
            )
    return a


def check_params(arrays: dict, m, source: str, dtype, prefixes=("param/", "")) -> dict[str, np.ndarray]:
    """The model's parameters from a file's arrays (each named `prefix + name` for the first
    prefix found): all present, of the spec's shapes, real, finite in `dtype`."""
    out = {}
    for name, (shape, _, _) in m.params.items():
        key = next((p + name for p in prefixes if p + name in arrays), None)
        if key is None:
            raise RnncError(f"{source}: no parameter '{prefixes[0] + name}'",
                            hint="was it saved for another spec?", code="E520")  # fmt: skip
        v = np.asarray(arrays[key])
        if tuple(v.shape) != tuple(shape):
            raise RnncError(
                f"{source}: parameter '{key}' is {list(v.shape)}, the spec says {list(shape)}",
                hint="the spec or its --dim values changed since the file was saved",
                code="E520",
            )
        out[name] = real_values(v, key, source, dtype).astype(dtype)
    return out


def load_params(path: str, m, dtype) -> dict[str, np.ndarray]:
    """A params file (`-o` of a training run, or a checkpoint) checked against the spec."""
    from .files import load_arrays

    return check_params(load_arrays(path, "params file"), m, path, dtype)


def check_lengths(arrays: dict[str, np.ndarray], inputs: dict[str, np.ndarray], table: dict,
                  source: str) -> dict[str, np.ndarray] | None:  # fmt: skip
    """`<domain>.lengths` arrays: one length per sequence, 1..T."""
    out = {}
    for key, a in arrays.items():
        if not key.endswith(LENGTHS_SUFFIX):
            continue
        dom = key[: -len(LENGTHS_SUFFIX)]
        owner = next((n for n, (_, lv, _) in table.items() if lv == dom and n in inputs), None)
        if owner is None:
            domains = sorted({lv for _, lv, _ in table.values() if lv != "static"})
            raise RnncError(f"{source}: '{key}' names no sequence domain of the model",
                            hint=f"its domains: {', '.join(domains) or 'none'}", code="E517")  # fmt: skip
        T, B = inputs[owner].shape[:2]
        a = np.asarray(a)
        if a.shape != (B,) or a.dtype.kind not in "iu" or a.min() < 1 or a.max() > T:
            raise RnncError(f"{source}: '{key}' must hold {B} whole numbers in 1..{T}"
                            f" (it holds {a.dtype} of shape {list(a.shape)})", code="E517")  # fmt: skip
        out[dom] = a
    return out or None
