"""A userspace NFS client (libnfs, through ctypes), for hosts without a kernel NFS client.

libnfs (Debian libnfs13) speaks NFSv3 itself over TCP: mount protocol, then file
operations by path. This module wraps the synchronous calls virtstore needs: list a
directory, stat, create, read, write, truncate, hard-link, unlink. One ``NfsClient`` is
one mounted export; it is not thread-safe, so callers open one per operation.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

from virtstore.errors import CommandFailed
from virtstore.host.clib import CLibrary, cp, vp

u64 = ctypes.c_uint64
_library = CLibrary("nfs", "libnfs.so.13", (
    "the userspace NFS client needs libnfs (Debian libnfs13), which is not installed"), {
    "nfs_init_context": (vp, None),
    "nfs_destroy_context": (None, [vp]),
    "nfs_get_error": (cp, [vp]),
    "nfs_mount": (None, [vp, cp, cp]),
    "nfs_stat64": (None, [vp, cp, vp]),
    "nfs_opendir": (None, [vp, cp, ctypes.POINTER(vp)]),
    "nfs_readdir": (vp, [vp, vp]),
    "nfs_closedir": (None, [vp, vp]),
    "nfs_open": (None, [vp, cp, ctypes.c_int, ctypes.POINTER(vp)]),
    "nfs_creat": (None, [vp, cp, ctypes.c_int, ctypes.POINTER(vp)]),
    "nfs_close": (None, [vp, vp]),
    "nfs_pread": (None, [vp, vp, u64, u64, vp]),
    "nfs_pwrite": (None, [vp, vp, u64, u64, vp]),
    "nfs_ftruncate": (None, [vp, vp, u64]),
    "nfs_fsync": (None, [vp, vp]),
    "nfs_unlink": (None, [vp, cp]),
    "nfs_link": (None, [vp, cp, cp]),
    "nfs_rename": (None, [vp, cp, cp]),
    "nfs_statvfs": (None, [vp, cp, vp]),
    "nfs_mkdir": (None, [vp, cp]),
    "nfs_rmdir": (None, [vp, cp]),
})


@dataclass(frozen=True)
class NfsStat:
    ino: int
    mode: int
    size: int
    blocks: int
    mtime_ns: int
    ctime_ns: int
    atime_ns: int
    uid: int
    gid: int


class NfsError(CommandFailed):
    """An NFS call failed; ``errno`` is the negative return of libnfs, made positive."""

    def __init__(self, message: str, err: int) -> None:
        super().__init__(message)
        self.errno = err


class NfsClient:
    """One export of one server, mounted in this process (no kernel involved)."""

    def __init__(self, server: str, export: str, *, timeout_ms: int = 30000) -> None:
        self.lib = _library()
        self.server = server
        self.export = export
        self.ctx = self.lib.nfs_init_context()
        if not self.ctx:
            raise CommandFailed("libnfs: cannot create an NFS context")
        if hasattr(self.lib, "nfs_set_timeout"):
            self.lib.nfs_set_timeout.argtypes = [ctypes.c_void_p, ctypes.c_int]
            self.lib.nfs_set_timeout(self.ctx, timeout_ms)
        rc = self.lib.nfs_mount(self.ctx, server.encode(), export.encode())
        if rc != 0:
            why = self._error()
            self.close()
            raise NfsError(f"cannot mount NFS export '{server}:{export}' (userspace client): "
                           f"{why}", -rc)

    def _error(self) -> str:
        msg = self.lib.nfs_get_error(self.ctx) if self.ctx else None
        return msg.decode("utf-8", "replace") if msg else "unknown error"

    def _check(self, rc: int, what: str) -> int:
        if rc < 0:
            raise NfsError(f"NFS {what} on '{self.server}:{self.export}' failed: "
                           f"{self._error()}", -rc)
        return rc

    def close(self) -> None:
        if self.ctx:
            self.lib.nfs_destroy_context(self.ctx)
            self.ctx = None

    def __enter__(self) -> NfsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- names -----------------------------------------------------------------
    @staticmethod
    def _p(path: str) -> bytes:
        return ("/" + path.lstrip("/")).encode()

    def stat(self, path: str) -> NfsStat | None:
        buf = (ctypes.c_uint64 * 32)()
        rc = self.lib.nfs_stat64(self.ctx, self._p(path), ctypes.byref(buf))
        if rc == -2:  # -ENOENT
            return None
        self._check(rc, f"stat of '{path}'")
        v = list(buf)
        # struct nfs_stat_64: dev ino mode nlink uid gid rdev size blksize blocks atime
        # mtime ctime atime_nsec mtime_nsec ctime_nsec used
        return NfsStat(ino=v[1], mode=v[2], size=v[7], blocks=v[9],
                       mtime_ns=v[11] * 1_000_000_000 + v[14],
                       ctime_ns=v[12] * 1_000_000_000 + v[15],
                       atime_ns=v[10] * 1_000_000_000 + v[13], uid=v[4], gid=v[5])

    def statvfs(self, path: str = "/") -> tuple[int, int, int]:
        """(capacity, free, available to us) of the export, in bytes."""
        buf = (ctypes.c_uint64 * 16)()
        self._check(self.lib.nfs_statvfs(self.ctx, self._p(path), ctypes.byref(buf)),
                    f"statvfs of '{path}'")
        # struct statvfs: bsize frsize blocks bfree bavail files ffree favail fsid flag ...
        frsize = buf[1] or buf[0]
        return buf[2] * frsize, buf[3] * frsize, buf[4] * frsize

    def listdir(self, path: str) -> list[str]:
        handle = ctypes.c_void_p()
        self._check(self.lib.nfs_opendir(self.ctx, self._p(path), ctypes.byref(handle)),
                    f"opendir of '{path}'")
        names: list[str] = []
        try:
            while True:
                ent = self.lib.nfs_readdir(self.ctx, handle)
                if not ent:
                    break
                # struct nfsdirent { struct nfsdirent *next; char *name; ... }
                name_ptr = ctypes.cast(ent + ctypes.sizeof(ctypes.c_void_p),
                                       ctypes.POINTER(ctypes.c_char_p)).contents.value
                if name_ptr and name_ptr not in (b".", b".."):
                    names.append(os.fsdecode(name_ptr))
        finally:
            self.lib.nfs_closedir(self.ctx, handle)
        return names

    def unlink(self, path: str) -> None:
        self._check(self.lib.nfs_unlink(self.ctx, self._p(path)), f"unlink of '{path}'")

    def link(self, old: str, new: str) -> None:
        self._check(self.lib.nfs_link(self.ctx, self._p(old), self._p(new)),
                    f"link of '{old}' to '{new}'")

    def rename(self, old: str, new: str) -> None:
        """Rename, replacing ``new`` if it exists (atomically, on the server)."""
        self._check(self.lib.nfs_rename(self.ctx, self._p(old), self._p(new)),
                    f"rename of '{old}' to '{new}'")

    def mkdir(self, path: str) -> None:
        self._check(self.lib.nfs_mkdir(self.ctx, self._p(path)), f"mkdir of '{path}'")

    # -- data ------------------------------------------------------------------
    def open(self, path: str, *, write: bool = False, create: bool = False,
             mode: int = 0o600) -> NfsFile:
        fh = ctypes.c_void_p()
        if create:
            # nfs_creat is O_CREAT|O_TRUNC|O_RDWR; the caller picked a fresh name.
            rc = self.lib.nfs_creat(self.ctx, self._p(path), mode, ctypes.byref(fh))
        else:
            rc = self.lib.nfs_open(self.ctx, self._p(path),
                                   os.O_RDWR if write else os.O_RDONLY, ctypes.byref(fh))
        self._check(rc, f"open of '{path}'")
        return NfsFile(self, fh, path)


class NfsFile:
    def __init__(self, client: NfsClient, fh: ctypes.c_void_p, path: str) -> None:
        self.c = client
        self.fh = fh
        self.path = path

    def pread(self, offset: int, count: int) -> bytes:
        buf = ctypes.create_string_buffer(count)
        got = 0
        while got < count:
            rc = self.c._check(self.c.lib.nfs_pread(self.c.ctx, self.fh, offset + got,
                                                    count - got,
                                                    ctypes.byref(buf, got)),
                               f"read of '{self.path}'")
            if rc == 0:
                break
            got += rc
        return buf.raw[:got]

    def pwrite(self, data: bytes, offset: int) -> None:
        done = 0
        buf = ctypes.create_string_buffer(bytes(data), len(data))
        while done < len(data):
            rc = self.c._check(self.c.lib.nfs_pwrite(self.c.ctx, self.fh, offset + done,
                                                     len(data) - done,
                                                     ctypes.byref(buf, done)),
                               f"write of '{self.path}'")
            if rc == 0:
                raise NfsError(f"NFS write of '{self.path}' made no progress", 5)
            done += rc

    def truncate(self, size: int) -> None:
        self.c._check(self.c.lib.nfs_ftruncate(self.c.ctx, self.fh, size),
                      f"truncate of '{self.path}'")

    def fsync(self) -> None:
        self.c._check(self.c.lib.nfs_fsync(self.c.ctx, self.fh), f"fsync of '{self.path}'")

    def close(self) -> None:
        if self.fh:
            self.c.lib.nfs_close(self.c.ctx, self.fh)
            self.fh = ctypes.c_void_p()

    def __enter__(self) -> NfsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
