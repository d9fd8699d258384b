"""Atomic file output: write to a temporary file beside the target, then rename.

Temporary names start with a dot and carry the writer's process id and host:
``.{target name}.{pid}@{host}.{random}.tmp``. A writer killed mid-write leaves such an entry
behind; it never looks like an output, and the next write to the same target removes the
entries of writers on this host that are no longer running (entries of other hosts, e.g. on
a network file system, are left alone).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:64]


@contextlib.contextmanager
def atomic_path(target: str | Path, *, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path in ``target``'s folder; on success rename it onto ``target``.

    On any failure the temporary file is removed and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(target), suffix=suffix or ".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _fsync(tmp_path)
        _chmod_like_open(tmp_path, target)
        os.replace(tmp_path, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


def _chmod_like_open(tmp: Path, target: Path) -> None:
    """Give ``tmp`` (created 0600) the mode ``open(target, "w")`` would: the existing target's, else
    0666 less the umask."""
    try:
        mode = stat.S_IMODE(target.stat().st_mode)
    except OSError:
        mode = 0o666 & ~current_umask()
    with contextlib.suppress(OSError):
        os.chmod(tmp, mode)


def current_umask() -> int:
    """The process's umask (from /proc where it shows it, so that it is never changed, even briefly)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text(target: str | Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def temp_prefix(target: Path) -> str:
    """Prefix of this process's temporary entries for ``target``."""
    return f".{target.name}.{os.getpid()}@{_HOST}."


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Remove temporary entries for ``target`` left by writers that died; return what was removed.

    An entry is stale when it names this host and a process id that is not running (a live
    writer's entry, or one whose id was reused, is never touched).
    """
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(\d+)@([A-Za-z0-9-]*)\.")
    removed = []
    with contextlib.suppress(OSError):
        for entry in target.parent.iterdir():
            match = pattern.match(entry.name)
            if match and match.group(2) == _HOST and not _running(int(match.group(1))):
                _remove(entry)
                removed.append(entry)
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid() or os.name != "posix":  # on Windows os.kill(pid, 0) would signal the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # someone else's process, or cannot tell: keep the entry
    return True


def _remove(entry: Path) -> None:
    with contextlib.suppress(OSError):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


@contextlib.contextmanager
def locked_directory(directory: Path) -> Iterator[None]:
    """Hold an advisory lock on ``directory`` (POSIX ``flock``) so writers of its files take turns.

    Where locking is unavailable (Windows, some network file systems) it does nothing.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError), open(path, "rb") as handle:
        os.fsync(handle.fileno())
