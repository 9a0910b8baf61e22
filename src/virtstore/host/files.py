"""Small filesystem helpers the engine needs: atomic writes, process identity."""

from __future__ import annotations

import os
import tempfile


def atomic_write(path: str, data: bytes | str, mode: int = 0o600) -> None:
    """Write ``path`` so readers see the old or the new content, never a torn file.

    Temp file in the same directory, fsync, rename, fsync of the directory.
    """
    raw = data.encode() if isinstance(data, str) else data
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(directory)


def fsync_dir(directory: str) -> None:
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def remove_quietly(path: str) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def process_start_time(pid: int) -> str | None:
    """The start time of ``pid`` (clock ticks since boot), to tell a live PID from a reused one."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode(errors="replace")
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None


def process_alive(pid: int, start: str) -> bool:
    return process_start_time(pid) == start


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
