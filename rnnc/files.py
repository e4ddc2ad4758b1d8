"""Files users trust us with: atomic writes, safe .npz and .safetensors loading."""

from __future__ import annotations

import contextlib
import glob
import io
import json
import math
import os
import stat
import tempfile
import zipfile
import zlib

import numpy as np

from .errors import RnncError, optional


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


def save_arrays(path: str, arrays: dict) -> None:
    """Named arrays to `path`, atomically: .safetensors by its extension, else .npz."""
    if is_safetensors(path):
        st = require_safetensors(path)
        data = {k: np.ascontiguousarray(on_host(v)) for k, v in arrays.items()}
        atomic_write(path, st.save(data))
    else:
        save_npz(path, arrays)


def load_arrays(path: str, what: str = "file") -> dict[str, np.ndarray]:
    """Named arrays from an .npz or (by its extension) a .safetensors file, checked before
    anything large is read; never unpickling."""
    return load_safetensors(path, what) if is_safetensors(path) else load_npz(path, what)


def is_safetensors(path: str) -> bool:
    return str(path).lower().endswith(".safetensors")


def require_safetensors(path: str):
    return optional("safetensors.numpy", f"'{path}' is a .safetensors file, and the safetensors package is "
                    "not installed", "safetensors", "E507", hint=", or use .npz")  # fmt: skip


# safetensors dtypes NumPy holds exactly (BF16 and the F8 kinds it does not)
SAFETENSORS_DTYPES = {"BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16,
                      "U32": np.uint32, "I32": np.int32, "U64": np.uint64, "I64": np.int64,
                      "F16": np.float16, "F32": np.float32, "F64": np.float64}  # fmt: skip
MAX_HEADER = 100 * 2**20  # the format's own limit on the JSON header


def safetensors_sizes(path: str, what: str = "file") -> dict[str, int]:
    """Each entry's byte count, from a header checked against the file: plain tensors of a
    dtype NumPy holds, shapes that match their byte ranges, ranges inside the file."""
    bad = lambda why, hint=None: RnncError(f"{what} '{path}' {why}", hint=hint, code="E505")  # noqa: E731
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or n > min(MAX_HEADER, size - 8):
                raise bad(f"is not a readable .safetensors file (its header claims {n:,d} bytes of "
                          f"a {size:,d}-byte file)", hint="it may be truncated or not a safetensors file")  # fmt: skip
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise RnncError(f"{what} '{path}' does not exist", code="E505") from None
    except OSError as e:
        raise bad(f"cannot be read: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise bad(f"is not a readable .safetensors file (its header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise bad("is not a readable .safetensors file (its header is not a table of tensors)")
    body, sizes = size - 8 - n, {}
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise bad("has a __metadata__ entry that is not a table of strings")
            continue
        label = f"entry '{str(name)[:60]}'"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"has an {label} that is not a plain tensor (dtype, shape, data_offsets)")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in SAFETENSORS_DTYPES:
            raise bad(f"has an {label} of dtype {str(dtype)[:20]}, which NumPy cannot hold exactly",
                      hint="save it as F32 or F64")  # fmt: skip
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise bad(f"has an {label} whose shape is not a list of sizes")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= body):  # fmt: skip
            raise bad(f"has an {label} whose data lies outside the file (truncated or forged?)")
        nbytes = math.prod(shape) * np.dtype(SAFETENSORS_DTYPES[dtype]).itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise bad(f"has an {label} of shape {shape} ({nbytes:,d} bytes) stored in "
                      f"{offsets[1] - offsets[0]:,d} bytes")  # fmt: skip
        sizes[str(name)] = nbytes
    return sizes


def load_safetensors(path: str, what: str = "file") -> dict[str, np.ndarray]:
    from .memory import require_memory

    sizes = safetensors_sizes(path, what)
    require_memory(sum(sizes.values()), f"{what} '{path}' ({len(sizes)} arrays)",
                   hint="the file holds more than fits in memory")  # fmt: skip
    st = require_safetensors(path)
    try:
        return dict(st.load_file(path))
    except Exception as e:  # SafetensorError (overlapping ranges, ...): the library's own checks
        raise RnncError(f"{what} '{path}' is not a readable .safetensors file ({type(e).__name__}: {e})",
                        code="E505") from None  # fmt: skip


def save_npz(path: str, arrays: dict) -> None:
    """Arrays (NumPy or CuPy) to an .npz, atomically."""
    buf = io.BytesIO()  # np.savez on a path would append .npz; a file object keeps the name
    np.savez(buf, **{k: on_host(v) for k, v in arrays.items()})
    atomic_write(path, buf.getvalue())


# what zipfile and zlib raise for a damaged archive (RuntimeError: "encrypted"; NotImplementedError:
# an unknown compression method or flag)
ZIP_TROUBLE = (zipfile.LargeZipFile, RuntimeError, NotImplementedError, OSError, EOFError,
               zlib.error, ValueError, KeyError, TypeError)  # fmt: skip
BOMB_RATIO = 200  # a deflated array this many times smaller than its size is refused ...
BOMB_SIZE = 256 * 2**20  # ... once it unpacks to more than this (a zip bomb)


def load_npz(path: str, what: str = "file") -> dict[str, np.ndarray]:
    """Arrays from an .npz, never unpickling; a worded error for a missing, broken, forged or
    oversized file, given before anything large is read (see `npz_sizes`)."""
    from .memory import require_memory

    sizes = npz_sizes(path, what)
    require_memory(sum(sizes.values()), f"{what} '{path}' ({len(sizes)} arrays)",
                   hint="the file holds more than fits in memory")  # fmt: skip
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, *ZIP_TROUBLE) as e:
        raise RnncError(
            f"{what} '{path}' is not a readable .npz file ({type(e).__name__}: {e})",
            hint="it may be truncated or not written by numpy.savez",
            code="E505",
        ) from None


def npz_sizes(path: str, what: str = "file") -> dict[str, int]:
    """Each array's bytes, read from the zip directory and the .npy headers alone; refuses a
    .npy passed as .npz, a member that is no array, a header whose shape needs more bytes than
    the member holds (or fewer), Python objects, and deflated members that unpack to more
    than BOMB_RATIO times their size (a zip bomb)."""
    bad = lambda why, hint=None: RnncError(f"{what} '{path}' {why}", hint=hint, code="E505")  # noqa: E731
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
        on_disk = os.path.getsize(path)
    except FileNotFoundError:
        raise RnncError(f"{what} '{path}' does not exist", code="E505") from None
    except OSError as e:
        raise bad(f"cannot be read: {e.strerror or e}") from None
    if magic == b"\x93NUMPY":
        raise bad("is a single .npy array, not an .npz archive of named arrays",
                  hint="save with np.savez(path, name=array, ...)")  # fmt: skip
    if magic[:4] not in (b"PK\x03\x04", b"PK\x05\x06"):
        raise bad("is not a readable .npz file (no zip header)", hint="write it with numpy.savez")
    out = {}
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                name = info.filename[:-4] if info.filename.endswith(".npy") else None
                if name is None:
                    raise bad(f"holds '{info.filename[:60]}', which is not an array (.npy)")
                if (info.compress_type == zipfile.ZIP_STORED and info.file_size > on_disk) or \
                        info.compress_size > on_disk:  # fmt: skip
                    raise bad(f"is truncated or forged: '{name}' claims {info.file_size:,d} bytes "
                              f"of a {on_disk:,d}-byte file")  # fmt: skip
                if info.compress_type != zipfile.ZIP_STORED and info.file_size > BOMB_SIZE and \
                        info.file_size > BOMB_RATIO * max(info.compress_size, 1):  # fmt: skip
                    raise bad(f"unpacks '{name}' from {info.compress_size:,d} to "
                              f"{info.file_size:,d} bytes, more than {BOMB_RATIO}x: a zip bomb?",
                              hint="if you trust it, save it uncompressed (np.savez)")  # fmt: skip
                out[name] = array_bytes(z, info, name, bad)
    except zipfile.BadZipFile as e:
        raise bad(f"is not a readable .npz file ({e})",
                  hint="it may be truncated or not written by numpy.savez") from None  # fmt: skip
    except ZIP_TROUBLE as e:  # a flipped bit: an unknown method, "encrypted", a bad length
        raise bad(f"is not a readable .npz file ({type(e).__name__}: {e})",
                  hint="it may be damaged or not written by numpy.savez") from None  # fmt: skip
    return out


def array_bytes(z: zipfile.ZipFile, info: zipfile.ZipInfo, name: str, bad) -> int:
    """The data bytes an .npy member's header promises, checked against the member's size."""
    fmt = np.lib.format
    with z.open(info) as f:
        try:
            version = fmt.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = fmt.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = fmt.read_array_header_2_0(f)
            else:
                raise ValueError(f"format version {version}")
        except (ValueError, SyntaxError, TypeError) as e:
            raise bad(f"has a damaged header for '{name}' ({e})") from None
        header = f.tell()
    if dtype.hasobject:
        raise bad(f"holds Python objects in '{name}', which rnnc never unpickles",
                  hint="save numbers, not object arrays")  # fmt: skip
    nbytes = math.prod(shape) * dtype.itemsize
    if header + nbytes != info.file_size:
        raise bad(f"is truncated or forged: '{name}' is {list(shape)} {dtype} ({nbytes:,d} bytes) "
                  f"by its header, and the file holds {info.file_size - header:,d}")  # fmt: skip
    return nbytes
