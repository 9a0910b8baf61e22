"""libgfapi through ctypes: a GlusterFS volume's files from userspace, as libvirt's gluster
backend reaches them (no FUSE, no mount).

Only calls with stable C types are used: paths, file descriptors, ``struct stat``,
``struct statvfs``, ``struct dirent`` (Linux x86-64 layouts), and the GFAPI_6.0 versions
of the read/write calls (with their extra, optional ``struct glfs_stat`` pointers).
"""

from __future__ import annotations

import ctypes
import os
import threading

from virtstore.errors import CommandFailed, OperationInvalid
from virtstore.host.clib import CLibrary, ci, cp, vp
from virtstore.host.nfs import NfsStat

cs, ol = ctypes.c_size_t, ctypes.c_int64
_library = CLibrary("gfapi", "libgfapi.so.0", (
    "gluster pools without FUSE need libgfapi (Debian libgfapi0), which is not installed"), {
    "glfs_new": (vp, [cp]),
    "glfs_set_volfile_server": (None, [vp, cp, cp, ci]),
    "glfs_set_logging": (None, [vp, cp, ci]),
    "glfs_init": (None, [vp]),
    "glfs_fini": (None, [vp]),
    "glfs_stat": (None, [vp, cp, vp]),
    "glfs_statvfs": (None, [vp, cp, vp]),
    "glfs_opendir": (vp, [vp, cp]),
    "glfs_readdir": (vp, [vp]),
    "glfs_closedir": (None, [vp]),
    "glfs_open": (vp, [vp, cp, ci]),
    "glfs_creat": (vp, [vp, cp, ci, ctypes.c_uint32]),
    "glfs_close": (None, [vp]),
    "glfs_pread": (ctypes.c_ssize_t, [vp, vp, cs, ol, ci, vp]),
    "glfs_pwrite": (ctypes.c_ssize_t, [vp, vp, cs, ol, ci, vp, vp]),
    "glfs_ftruncate": (None, [vp, ol, vp, vp]),
    "glfs_fsync": (None, [vp, vp, vp]),
    "glfs_unlink": (None, [vp, cp]),
    "glfs_link": (None, [vp, cp, cp]),
    "glfs_rename": (None, [vp, cp, cp]),
})
available = _library.available


class GfapiError(CommandFailed):
    def __init__(self, message: str, err: int) -> None:
        super().__init__(message)
        self.errno = err


def _stat_from(buf: ctypes.Array[ctypes.c_char]) -> NfsStat:
    raw = bytes(buf)

    def u64(off: int) -> int:
        return int.from_bytes(raw[off:off + 8], "little")

    def u32(off: int) -> int:
        return int.from_bytes(raw[off:off + 4], "little")

    # struct stat (x86-64): dev 0, ino 8, nlink 16, mode 24, uid 28, gid 32, rdev 40,
    # size 48, blksize 56, blocks 64, atim 72, mtim 88, ctim 104
    return NfsStat(ino=u64(8), mode=u32(24), size=u64(48), blocks=u64(64),
                   atime_ns=u64(72) * 1_000_000_000 + u64(80),
                   mtime_ns=u64(88) * 1_000_000_000 + u64(96),
                   ctime_ns=u64(104) * 1_000_000_000 + u64(112), uid=u32(28), gid=u32(32))


_clients: dict[tuple[str, str, int | None], GfapiClient] = {}
_clients_lock = threading.Lock()


def client(host: str, volume: str, port: int | None = None) -> GfapiClient:
    """The process's handle on a volume, opened once: glfs_fini takes seconds (it waits
    for the volume's graph to wind down), so handles live until ``forget``. A handle is
    safe to share between threads."""
    key = (host, volume, port)
    with _clients_lock:
        c = _clients.get(key)
        if c is None:
            c = GfapiClient(host, volume, port)
            c.shared = True
            _clients[key] = c
        return c


def forget(host: str, volume: str, port: int | None = None) -> None:
    """Close the shared handle of a volume (its pool stopped), in the background."""
    with _clients_lock:
        c = _clients.pop((host, volume, port), None)
    if c is not None:
        threading.Thread(target=c.fini, name="glfs_fini", daemon=True).start()


class GfapiClient:
    """One GlusterFS volume, opened from this process."""

    shared = False  # a shared handle is not closed when a ``with`` block ends

    def __init__(self, host: str, volume: str, port: int | None = None) -> None:
        self.lib = _library()
        self.volume = volume
        self.where = f"gluster volume '{volume}' on {host}"
        self.fs = self.lib.glfs_new(volume.encode())
        if not self.fs:
            raise GfapiError(f"libgfapi: cannot create a handle for {self.where}", 12)
        self.lib.glfs_set_volfile_server(self.fs, b"tcp", host.encode(), port or 24007)
        self.lib.glfs_set_logging(self.fs, b"/dev/null", 0)
        if self.lib.glfs_init(self.fs) != 0:
            err = ctypes.get_errno()
            self.lib.glfs_fini(self.fs)
            self.fs = None
            raise OperationInvalid(f"cannot connect to {self.where} (libgfapi): "
                                   f"{os.strerror(err) if err else 'failed'}")

    def _fail(self, what: str) -> GfapiError:
        err = ctypes.get_errno()
        return GfapiError(f"gluster {what} on {self.where} failed: "
                          f"{os.strerror(err) if err else 'error'}", err)

    def fini(self) -> None:
        if self.fs:
            fs, self.fs = self.fs, None
            self.lib.glfs_fini(fs)

    def close(self) -> None:
        if not self.shared:
            self.fini()

    def __enter__(self) -> GfapiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stat(self, path: str) -> NfsStat | None:
        buf = ctypes.create_string_buffer(256)
        if self.lib.glfs_stat(self.fs, path.encode(), buf) != 0:
            if ctypes.get_errno() == 2:
                return None
            raise self._fail(f"stat of '{path}'")
        return _stat_from(buf)

    def statvfs(self, path: str = "/") -> tuple[int, int, int]:
        buf = (ctypes.c_uint64 * 16)()
        if self.lib.glfs_statvfs(self.fs, path.encode(), ctypes.byref(buf)) != 0:
            raise self._fail(f"statvfs of '{path}'")
        frsize = buf[1] or buf[0]
        return buf[2] * frsize, buf[3] * frsize, buf[4] * frsize

    def listdir(self, path: str) -> list[str]:
        d = self.lib.glfs_opendir(self.fs, path.encode())
        if not d:
            raise self._fail(f"opendir of '{path}'")
        names: list[str] = []
        try:
            while True:
                ent = self.lib.glfs_readdir(d)
                if not ent:
                    break
                # struct dirent: d_ino u64, d_off i64, d_reclen u16, d_type u8, d_name[256]
                name = ctypes.string_at(ent + 19)
                if name not in (b".", b".."):
                    names.append(os.fsdecode(name))
        finally:
            self.lib.glfs_closedir(d)
        return names

    def open(self, path: str, *, write: bool = False, create: bool = False,
             mode: int = 0o600) -> GfapiFile:
        if create:
            fd = self.lib.glfs_creat(self.fs, path.encode(), os.O_RDWR | os.O_CREAT | os.O_EXCL,
                                     mode)
        else:
            fd = self.lib.glfs_open(self.fs, path.encode(), os.O_RDWR if write else os.O_RDONLY)
        if not fd:
            raise self._fail(f"open of '{path}'")
        return GfapiFile(self, fd, path)

    def unlink(self, path: str) -> None:
        if self.lib.glfs_unlink(self.fs, path.encode()) != 0:
            raise self._fail(f"unlink of '{path}'")

    def link(self, old: str, new: str) -> None:
        if self.lib.glfs_link(self.fs, old.encode(), new.encode()) != 0:
            raise self._fail(f"link of '{old}' to '{new}'")

    def rename(self, old: str, new: str) -> None:
        if self.lib.glfs_rename(self.fs, old.encode(), new.encode()) != 0:
            raise self._fail(f"rename of '{old}' to '{new}'")


class GfapiFile:
    def __init__(self, client: GfapiClient, fd: int, path: str) -> None:
        self.c = client
        self.fd: int | None = fd
        self.path = path

    def pread(self, offset: int, count: int) -> bytes:
        buf = ctypes.create_string_buffer(count)
        got = 0
        while got < count:
            n = self.c.lib.glfs_pread(self.fd, ctypes.byref(buf, got), count - got,
                                      offset + got, 0, None)
            if n < 0:
                raise self.c._fail(f"read of '{self.path}'")
            if n == 0:
                break
            got += n
        return buf.raw[:got]

    def pwrite(self, data: bytes, offset: int) -> None:
        buf = ctypes.create_string_buffer(bytes(data), len(data))
        done = 0
        while done < len(data):
            n = self.c.lib.glfs_pwrite(self.fd, ctypes.byref(buf, done), len(data) - done,
                                       offset + done, 0, None, None)
            if n <= 0:
                raise self.c._fail(f"write of '{self.path}'")
            done += n

    def truncate(self, size: int) -> None:
        if self.c.lib.glfs_ftruncate(self.fd, size, None, None) != 0:
            raise self.c._fail(f"truncate of '{self.path}'")

    def fsync(self) -> None:
        if self.c.lib.glfs_fsync(self.fd, None, None) != 0:
            raise self.c._fail(f"fsync of '{self.path}'")

    def close(self) -> None:
        if self.fd:
            self.c.lib.glfs_close(self.fd)
            self.fd = None

    def __enter__(self) -> GfapiFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
