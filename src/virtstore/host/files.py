"""Small filesystem helpers the engine needs: atomic writes, opening volume files,
process identity."""

from __future__ import annotations

import contextlib
import errno
import os
import stat

from virtstore.errors import OperationInvalid

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import BinaryIO


def atomic_write(path: str, data: bytes | str | memoryview, mode: int = 0o600, *,
                 sync_dir: bool = True) -> None:
    """Write ``path`` so readers see the old or the new content, never a torn file.

    Temp file in the same directory, fsync, rename, fsync of the directory (unless
    ``sync_dir`` is false: a caller writing many files syncs their directories once).
    """
    raw = data.encode() if isinstance(data, str) else data
    directory = os.path.dirname(path) or "."
    import tempfile  # only writers need it

    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        os.rename(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise
    if sync_dir:
        fsync_dir(directory)


def fsync_path(path: str) -> None:
    """Make a file's or a device's written data durable."""
    fd = open_volume(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: str) -> None:
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def ensure_dir(path: str, mode: int = 0o755, *, exact: bool = False) -> None:
    """Make ``path`` and its parents; ``exact``: set its mode even if it existed."""
    os.makedirs(path, mode=mode, exist_ok=True)
    if exact:
        os.chmod(path, mode)


def wait_for_path(path: str, timeout: float = 10.0) -> bool:
    """Wait until ``path`` exists (a device node udev makes an instant after the command
    that made its device returned); whether it does."""
    import time

    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def read_bytes(path: str) -> bytes | None:
    """A whole small file (a definition, a record); None where there is none."""
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        return None


def link_to(target: str, link: str) -> None:
    """Make the symlink ``link`` to ``target`` unless something is there already."""
    if not os.path.lexists(link):
        os.symlink(target, link)


def open_lock_file(path: str) -> int:
    """A descriptor of the lock file ``path`` (made if absent), or -1 where it cannot be
    opened (a read-only state root)."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return -1


def close_fd(fd: int) -> None:
    os.close(fd)


def remove_quietly(path: str) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat from its third field (the state) on."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode(errors="replace")
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    return stat[stat.rfind(")") + 2:].split()


def process_start_time(pid: int) -> str | None:
    """The start time of ``pid`` (clock ticks since boot), to tell a live PID from a reused one."""
    fields = _stat_fields(pid)
    return fields[19] if fields is not None and len(fields) > 19 else None


_own_start: tuple[int, str | None] = (-1, None)


def own_start_time() -> str | None:
    """This process's start time, read once per process (a forked child reads its own):
    the journal and the locks record it on every write, and /proc/PID/stat of a busy
    process with threads is no cheap read."""
    global _own_start
    pid = os.getpid()
    if _own_start[0] != pid:
        _own_start = (pid, process_start_time(pid))
    return _own_start[1]


def process_alive(pid: int, start: str) -> bool:
    fields = _stat_fields(pid)
    if fields is None or len(fields) <= 19 or fields[19] != start:
        return False
    # A zombie has ended; its parent (say a daemon killed with its workers, under an
    # init that does not reap) may never collect it.
    return fields[0] not in ("Z", "X")


def boot_id() -> str:
    """Changes at each host boot; an override lets tests simulate a restart."""
    forced = os.environ.get("VIRTSTORE_BOOT_ID")
    if forced:
        return forced
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return "unknown"


def open_volume(path: str, flags: int, mode: int = 0o600) -> int:
    """Open the volume file ``path`` for its data; the one way volume files are opened.

    The last component is opened relative to an fd of its directory with O_NOFOLLOW, so
    a symbolic link put in a pool (or swapped in for a volume after it was checked)
    is refused rather than followed out of the pool. Only regular files and block
    devices are opened: O_NONBLOCK keeps a fifo from hanging the open, and is cleared
    again afterwards. ``flags`` are os.open's (O_CREAT and O_EXCL included).
    """
    directory, name = os.path.split(path)
    dfd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK,
                     mode, dir_fd=dfd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _symlink_refused(path) from None
        raise
    finally:
        os.close(dfd)
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise OperationInvalid(f"cannot open volume '{path}': not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def refuse_symlink(path: str) -> None:
    """For tools that open a volume by its path themselves (qemu-img, qemu-nbd, scrub):
    refuse one that is a symbolic link now. A link swapped in after this look and
    before the tool opens the path is not caught: only our own opens are race-free."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return  # the tool reports a missing file itself
    if stat.S_ISLNK(st.st_mode):
        raise _symlink_refused(path)


def _symlink_refused(path: str) -> OperationInvalid:
    return OperationInvalid(f"cannot open volume '{path}': it is a symbolic link, which "
                            "volumes may not be")


def read_attr(path: str, errors: str = "replace") -> str | None:
    """A small text file's content (a sysfs attribute), stripped; None if unreadable."""
    try:
        with open(path, encoding="utf-8", errors=errors) as fh:
            return fh.read().strip()
    except OSError:
        return None


def entries(path: str) -> list[str]:
    """A directory's names; none where it cannot be read (absent from this kernel)."""
    try:
        return os.listdir(path)
    except OSError:
        return []


def block_devno(path: str) -> str | None:
    """``MAJOR:MINOR`` of the block device at ``path``; None for anything else."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISBLK(st.st_mode):
        return None
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


@contextlib.contextmanager
def secret_file(value: bytes) -> Iterator[str]:
    """A temporary file only its owner can read, holding a secret for a program (on its
    command line, every user would see it); removed afterwards."""
    import tempfile

    fd, path = tempfile.mkstemp(prefix="virtstore-secret-")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(value)
        yield path
    finally:
        remove_quietly(path)


class Bounded:
    """At most ``limit`` bytes of a stream: a Content-Length body, or what fits on a
    device that cannot grow."""

    def __init__(self, src: BinaryIO, limit: int) -> None:
        self.src = src
        self.left = limit

    def read(self, n: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        data = self.src.read(self.left if n is None or n < 0 else min(n, self.left)) or b""
        self.left -= len(data)
        return data


def live_stat(path: str) -> os.stat_result | None:
    """A volume's inode as it is now (owner, mode, times), None where it is not a local
    file or device path."""
    if not path.startswith("/"):
        return None
    try:
        return os.stat(path)
    except OSError:
        return None


def existing_path(path: str) -> str | None:
    """``path`` normalized, if it is absolute and something is there; else None."""
    if os.path.isabs(path) and os.path.exists(path):
        return os.path.normpath(path)
    return None


def regular_size(f: BinaryIO) -> int | None:
    """The size of a regular file behind ``f``; None for a pipe, a socket or a stream."""
    try:
        st = os.fstat(f.fileno())
    except (OSError, ValueError, AttributeError):
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None
