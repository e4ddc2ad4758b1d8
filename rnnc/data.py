"""User data checked against a compiled model: names, shapes, dtypes, finiteness, labels."""

from __future__ import annotations

import numpy as np

from .errors import RnncError

LENGTHS_SUFFIX = ".lengths"


def check_arrays(arrays: dict[str, np.ndarray], table: dict, kind: str, source: str) -> dict:
    """The arrays named in `table` (a compiled module's INPUTS or TARGETS), validated.

    Each entry: name -> (feature shape, time domain or 'static', holds class labels)."""
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
        if labels:
            expect = want
            ok = a.ndim == lead
        else:
            expect = want + tuple(shape)
            ok = a.ndim == lead + len(shape) and tuple(a.shape[lead:]) == tuple(shape)
        if not ok:
            raise RnncError(
                f"{source}: '{name}' has shape {list(a.shape)}; expected [{', '.join(map(str, expect))}]",
                hint="sequences are laid out [time, batch, features]; per-sequence values [batch, features]",
                code="E511",
            )
        if a.size == 0:
            raise RnncError(f"{source}: '{name}' is empty", code="E512")
        if labels:
            if not np.issubdtype(a.dtype, np.integer):
                raise RnncError(
                    f"{source}: '{name}' holds class labels and must be integers, got {a.dtype}",
                    code="E513",
                )
            k = shape[0]
            if a.min() < 0 or a.max() >= k:
                bad = a[(a < 0) | (a >= k)].flat[0]
                raise RnncError(
                    f"{source}: '{name}' has label {bad}, outside 0..{k - 1}", code="E514"
                )
        else:
            if not np.issubdtype(a.dtype, np.number) or np.iscomplexobj(a):
                raise RnncError(f"{source}: '{name}' is not real numbers ({a.dtype})", code="E513")
            bad = ~np.isfinite(a)
            if bad.any():
                where = tuple(int(i) for i in np.argwhere(bad)[0])
                raise RnncError(
                    f"{source}: '{name}' holds NaN or infinity, first at index {list(where)}",
                    code="E515",
                )
        out[name] = a
    steps: dict[str, dict[str, int]] = {}
    for k, v in out.items():
        if table_level(table, k) != "static":
            steps.setdefault(table_level(table, k), {})[k] = v.shape[0]
    for _dom, lengths in steps.items():
        if len(set(lengths.values())) > 1:
            raise RnncError(
                f"{source}: {', '.join(f'{k} has {n} steps' for k, n in lengths.items())}; "
                "they run over the same steps and must have the same length",
                code="E516",
            )
    batch = {
        v.shape[1] if table_level(table, k) != "static" else v.shape[0] for k, v in out.items()
    }
    if len(batch) > 1:
        raise RnncError(
            f"{source}: the arrays disagree on the batch size: {sorted(batch)}", code="E516"
        )
    return out


def table_level(table: dict, name: str) -> str:
    return table[name][1]


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
            raise RnncError(f"{source}: '{key}' names no sequence domain of the model", code="E517")
        T, B = inputs[owner].shape[:2]
        a = np.asarray(a)
        if a.shape != (B,) or not np.issubdtype(a.dtype, np.integer) or a.min() < 1 or a.max() > T:
            raise RnncError(f"{source}: '{key}' must hold {B} whole numbers in 1..{T}", code="E517")
        out[dom] = a
    return out or None
