""".npz files read without trusting them: no pickle, no allocation the data does not back.

`np.load` on an .npz allocates the whole array a member's header claims before reading a byte
of it, so a 300-byte file claiming a terabyte is a MemoryError (or a swap storm); it also
lets bit rot through as zipfile/zlib/EOF errors of many kinds. `load_npz` checks each header
against the member's size first, grows its buffer only as data actually arrives, and turns
every problem into one ValueError naming the file and the member.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

#: read members in pieces of this size, so memory follows the bytes that really decompress
_CHUNK = 1 << 20
#: what reading a damaged archive raises, besides ValueError
READ_ERRORS = (
    zipfile.BadZipFile,
    zlib.error,
    EOFError,
    OSError,
    RuntimeError,
    NotImplementedError,
    KeyError,
    OverflowError,
)


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of an .npz file (as `np.savez` writes), by name; ValueError if damaged.

    Object arrays (pickles) are refused, never loaded.
    """
    p = Path(path)
    try:
        with zipfile.ZipFile(p) as z:
            infos = z.infolist()
            names = [i.filename for i in infos]
            if len(set(names)) != len(names):
                raise ValueError("a member name appears twice")
            out: dict[str, np.ndarray] = {}
            for info in infos:
                if not info.filename.endswith(".npy"):
                    raise ValueError(f"member {info.filename!r} is not an .npy array")
                key = info.filename[: -len(".npy")]
                try:
                    out[key] = _read_member(z, info)
                except ValueError as exc:
                    raise ValueError(f"member {info.filename!r}: {exc}") from None
            return out
    except ValueError as exc:
        raise ValueError(f"{p}: not a readable .npz: {exc}") from None
    except FileNotFoundError:
        raise ValueError(f"{p}: no such file") from None
    except READ_ERRORS as exc:
        raise ValueError(f"{p}: not a readable .npz ({type(exc).__name__}: {exc})") from None


def load_npz_member(path: str | os.PathLike, key: str) -> np.ndarray:
    """One array of an .npz by name, checked as `load_npz` checks each; ValueError naming the
    key. Reads only that member, so a file of many large arrays never sits in memory whole."""
    try:
        with zipfile.ZipFile(path) as z:
            return _read_member(z, z.getinfo(key + ".npy"))
    except ValueError as exc:
        raise ValueError(f"{path}: key {key!r}: {exc}") from None
    except READ_ERRORS as exc:
        raise ValueError(f"{path}: key {key!r}: unreadable ({type(exc).__name__}: {exc})") from None


def _read_member(z: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    with z.open(info) as f:
        version = npy_format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = npy_format.read_array_header_1_0(f)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = npy_format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy version {version}")
        if dtype.hasobject:
            raise ValueError("holds Python objects (a pickle); refused")
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError(f"bad shape {shape}")
        count = 1
        for d in shape:
            count *= d
        nbytes = count * dtype.itemsize
        header_end = f.tell()
        if nbytes != info.file_size - header_end:
            raise ValueError(
                f"{dtype} {list(shape)} needs {nbytes} bytes, the member holds "
                f"{info.file_size - header_end}"
            )
        buf = bytearray()
        while len(buf) < nbytes:
            piece = f.read(min(_CHUNK, nbytes - len(buf)))
            if not piece:
                raise ValueError(f"truncated: {len(buf)} of {nbytes} bytes")
            buf += piece
        if f.read(1):
            raise ValueError("data after the array")
    arr = np.frombuffer(buf, dtype=dtype, count=count) if count else np.zeros(0, dtype)
    if fortran:
        return arr.reshape(shape[::-1]).transpose()
    return arr.reshape(shape)
