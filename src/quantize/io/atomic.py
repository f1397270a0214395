"""Writing files so that a failure or an interruption never leaves half of one behind.

Work happens under a temporary name beside the output; any exception, KeyboardInterrupt
included (and SIGTERM, which the CLI turns into `Terminated`), deletes it. The final renames
run with SIGINT and SIGTERM blocked, so a signal arriving in between cannot leave the old output
moved away and the new one not yet in place: it is acted on just after.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path


class Terminated(BaseException):
    """SIGTERM, raised as an exception (by the CLI's handler) so that cleanup code runs.

    A BaseException, like KeyboardInterrupt: `except Exception` blocks do not swallow it.
    """


_COMMIT_SIGNALS = {signal.SIGINT, getattr(signal, "SIGTERM", signal.SIGINT)}


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait (the OS keeps them pending) until the block ends."""
    mask = getattr(signal, "pthread_sigmask", None)
    if mask is None or threading.current_thread() is not threading.main_thread():
        yield  # Windows has no signal masks; other threads never run Python signal handlers
        return
    old = mask(signal.SIG_BLOCK, _COMMIT_SIGNALS)
    try:
        yield
    finally:
        mask(signal.SIG_SETMASK, old)


class OutputError(ValueError):
    """The output path cannot be used (it is the input, or its folder does not exist)."""


def check_output(
    output: str | os.PathLike, *inputs: str | os.PathLike, overwrite: bool = True
) -> Path:
    """`output` as a Path, refusing one that would overwrite an input or has no folder, and an
    existing one unless `overwrite`."""
    out = Path(output)
    for inp in inputs:
        p = Path(inp)
        if out.resolve() == p.resolve() or (out.exists() and p.exists() and out.samefile(p)):
            raise OutputError(f"{out}: the output would overwrite the input")
    if not overwrite and out.exists() and (out.is_file() or any(out.iterdir())):
        raise OutputError(f"{out}: already exists (--force, or overwrite=True, replaces it)")
    if not out.parent.is_dir():
        raise OutputError(f"{out}: the folder {out.parent} does not exist")
    return out


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def _public_mode(path: Path, final: Path, is_dir: bool) -> None:
    """Give a temp file/folder the mode a plain open()/mkdir() would have had (mkstemp and
    mkdtemp make them owner-only), or the mode of the file it replaces."""
    if final.exists():
        mode = final.stat().st_mode & 0o7777
    else:
        mode = (0o777 if is_dir else 0o666) & ~_umask()
    os.chmod(path, mode)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success rename it onto `final`, else delete it.

    The temporary file lives in the same folder, so the rename is atomic on POSIX and Windows:
    readers see the old file or the complete new one, never a part.
    """
    final = Path(final)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        _public_mode(tmp_path, final, is_dir=False)
        with signals_held():
            os.replace(tmp_path, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside `final`, renamed onto it when the block succeeds.

    An existing `final` folder is replaced only after the new one is complete.
    """
    import shutil

    final = Path(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        _public_mode(tmp, final, is_dir=True)
        with signals_held():  # never the old folder moved away and the new one not in place
            if final.exists():
                old = final.with_name(f".{final.name}.old-{os.getpid()}")
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
