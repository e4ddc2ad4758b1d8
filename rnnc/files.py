"""Files users trust us with: atomic writes, safe .npz loading checked against the spec."""

from __future__ import annotations

import contextlib
import glob
import io
import os
import stat
import tempfile
import zipfile

import numpy as np

from .errors import RnncError


def atomic_write(path: str, data: bytes) -> None:
    """Write `data` to `path` so that a reader sees the old file or the new one, never half.

    A regular file (or a new one): a temporary file beside it, fsync, rename over it, fsync
    the folder; it keeps the old file's mode (a new one gets the umask's). A symlink: its
    target is replaced, the link stays. A device, FIFO or /dev/stdout: written directly
    (renaming over /dev/null as root would turn it into a plain file for every program).
    Temporary files a killed run left for this path are removed. Any failure (no such folder,
    no permission, a full disk) is a worded error naming the user's path."""
    target = os.path.realpath(path)
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise write_error(path, e) from None
    if st is not None and not stat.S_ISREG(st.st_mode):
        if stat.S_ISDIR(st.st_mode):
            raise RnncError(f"cannot write '{path}': it is a folder", code="E506")
        try:  # a device, FIFO or terminal: no rename, no temporary file
            with open(target, "wb") as f:
                f.write(data)
                f.flush()
        except OSError as e:
            raise write_error(path, e) from None
        return
    folder = os.path.dirname(target) or "."
    if not os.path.isdir(folder):
        raise RnncError(f"cannot write '{path}': the folder '{os.path.dirname(path) or '.'}' "
                        "does not exist", hint="create it first (mkdir -p)", code="E506")  # fmt: skip
    remove_stale(folder, os.path.basename(target))
    mode = stat.S_IMODE(st.st_mode) if st is not None else 0o666 & ~current_umask()
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(target)}.rnnc-{os.getpid()}-",
                                   suffix=".tmp")  # fmt: skip
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        tmp = None
    except OSError as e:
        raise write_error(path, e) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    try:
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def write_error(path: str, e: OSError) -> RnncError:
    return RnncError(f"cannot write '{path}': {e.strerror or e}", code="E506")


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale(folder: str, name: str) -> None:
    """Temporary files for `name` whose writer process no longer runs (a killed run's)."""
    for f in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}.rnnc-*.tmp")):
        pid = os.path.basename(f)[len(name) + 7 :].split("-", 1)[0]
        if pid.isdigit() and not alive(int(pid)):
            with contextlib.suppress(OSError):
                os.unlink(f)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
