"""Files users trust us with: atomic writes, safe .npz loading checked against the spec."""

from __future__ import annotations

import io
import os
import tempfile
import zipfile

import numpy as np

from .errors import RnncError


def atomic_write(path: str, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync, rename over it, fsync the directory:
    a reader sees the old file or the new one, never half of one."""
    folder = os.path.dirname(os.path.abspath(path)) or "."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".rnnc-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def on_host(v) -> np.ndarray:
    """A NumPy array for an array of either target: a CuPy array is copied back with .get()
    (NumPy refuses to convert one implicitly)."""
    return v.get() if hasattr(v, "get") and not isinstance(v, (np.ndarray, dict)) else np.asarray(v)


def save_npz(path: str, arrays: dict) -> None:
    """Arrays (NumPy or CuPy) to an .npz, atomically."""
    buf = io.BytesIO()  # np.savez on a path would append .npz; a file object keeps the name
    np.savez(buf, **{k: on_host(v) for k, v in arrays.items()})
    atomic_write(path, buf.getvalue())


def load_npz(path: str, what: str = "file") -> dict[str, np.ndarray]:
    """Arrays from an .npz, never unpickling; a clear error for a missing or broken file."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise RnncError(f"{what} '{path}' does not exist", code="E505") from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise RnncError(
            f"{what} '{path}' is not a readable .npz file ({type(e).__name__}: {e})",
            hint="it may be truncated or not written by numpy.savez",
            code="E505",
        ) from None
