"""Reading files of a guest filesystem in userspace, through The Sleuth Kit (pytsk3):
ext2/3/4, FAT, NTFS, exFAT, ISO 9660, HFS+. Others (xfs, btrfs here: pytsk3's build of
The Sleuth Kit has no reader for them) are reported as unsupported for file reading.

``GuestTree`` joins a root filesystem and the ones fstab mounts below it, and resolves
paths as the guest would, symlinks included, without ever leaving the guest: an
absolute link target starts again at the guest's root, ``..`` stops at it.
"""

from __future__ import annotations

import posixpath
from typing import Any

from virtstore.inspect.source import GuestDataError, Source

MAX_LINKS = 40  # as the kernel's ELOOP limit
MAX_DIR_ENTRIES = 10000
FILE_TYPES = ("ext2", "ext3", "ext4", "vfat", "ntfs", "exfat", "iso9660", "hfsplus")


class Unreadable(GuestDataError):
    """This filesystem's files cannot be read by us (type not supported)."""


def _tsk() -> Any:
    import pytsk3  # type: ignore[import-not-found]

    return pytsk3


class TskFs:
    """One filesystem opened by The Sleuth Kit over a Source."""

    def __init__(self, src: Source) -> None:
        tsk = _tsk()
        outer = src

        class _Img(tsk.Img_Info):  # type: ignore[misc,name-defined]
            def __init__(self) -> None:
                super().__init__(url="", type=tsk.TSK_IMG_TYPE_EXTERNAL)

            def read(self, offset: int, length: int) -> bytes:
                end = min(offset + length, outer.size)
                return outer.pread(offset, end - offset) if end > offset else b""

            def get_size(self) -> int:
                return outer.size

            def close(self) -> None:
                pass

        try:
            self.img = _Img()
            self.fs = tsk.FS_Info(self.img, offset=0)
        except OSError as exc:
            raise GuestDataError(f"The Sleuth Kit cannot open the filesystem: {exc}") from None
        self.tsk = tsk

    def _open(self, path: str) -> Any:
        try:
            return self.fs.open(path)
        except OSError:
            raise FileNotFoundError(path) from None

    def kind(self, path: str) -> str:
        """``file``, ``dir``, ``link`` or ``other``; FileNotFoundError if absent."""
        meta = self._open(path).info.meta
        if meta is None:
            raise FileNotFoundError(path)
        t = self.tsk
        return {t.TSK_FS_META_TYPE_REG: "file", t.TSK_FS_META_TYPE_DIR: "dir",
                t.TSK_FS_META_TYPE_LNK: "link"}.get(meta.type, "other")

    def readlink(self, path: str) -> str:
        f = self._open(path)
        link = getattr(f.info.meta, "link", None)
        if link:
            return bytes(link).decode("utf-8", "surrogateescape")
        size = int(f.info.meta.size)
        if size > 4096:
            raise GuestDataError(f"symlink {path} is {size} bytes long")
        return bytes(f.read_random(0, size)).decode("utf-8", "surrogateescape")

    def size(self, path: str) -> int:
        return int(self._open(path).info.meta.size)

    def read_file(self, path: str, *, limit: int) -> bytes:
        f = self._open(path)
        size = int(f.info.meta.size)
        if size > limit:
            raise GuestDataError(f"{path} is {size} bytes, more than the {limit} allowed")
        out = []
        pos = 0
        while pos < size:
            n = min(4 << 20, size - pos)
            data = f.read_random(pos, n)
            if not data:
                raise GuestDataError(f"{path}: cannot read past byte {pos} of {size}")
            out.append(bytes(data))
            pos += len(data)
        return b"".join(out)

    def read_attribute(self, path: str, attr_type: int, *, limit: int) -> bytes:
        try:
            f = self._open(path)
        except FileNotFoundError:
            raise GuestDataError(f"{path} is missing") from None
        for attr in f:
            if int(attr.info.type) == attr_type:
                size = min(int(attr.info.size), limit)
                return bytes(f.read_random(0, size, attr.info.type, attr.info.id))
        raise GuestDataError(f"{path} has no attribute 0x{attr_type:x}")

    def listdir(self, path: str) -> list[str]:
        try:
            d = self.fs.open_dir(path)
        except OSError:
            raise FileNotFoundError(path) from None
        names = []
        for i, entry in enumerate(d):
            if i > MAX_DIR_ENTRIES:
                raise GuestDataError(f"{path} has more than {MAX_DIR_ENTRIES} entries")
            name = bytes(entry.info.name.name).decode("utf-8", "surrogateescape")
            if name not in (".", "..") and entry.info.meta is not None:
                names.append(name)
        return names


class GuestTree:
    """The guest's directory tree over its filesystems: ``mounts`` maps a mount point
    (``/``, ``/boot``, ``/boot/efi``) to an open filesystem."""

    def __init__(self, mounts: dict[str, TskFs]) -> None:
        if "/" not in mounts:
            raise GuestDataError("no root filesystem")
        self.mounts = dict(mounts)

    def _locate(self, path: str) -> tuple[TskFs, str]:
        best = max((m for m in self.mounts
                    if path == m or path.startswith(m.rstrip("/") + "/")), key=len)
        rest = path[len(best):] if best != "/" else path
        return self.mounts[best], "/" + rest.lstrip("/")

    def resolve(self, path: str) -> str:
        """``path`` with every symlink followed, inside the guest; FileNotFoundError
        when a component is missing."""
        todo = [c for c in path.split("/") if c]
        done: list[str] = []
        hops = 0
        while todo:
            comp = todo.pop(0)
            if comp == ".":
                continue
            if comp == "..":
                if done:
                    done.pop()
                continue
            here = "/" + "/".join([*done, comp])
            fs, inner = self._locate(here)
            if here in self.mounts:
                done.append(comp)
                continue
            kind = fs.kind(inner)
            if kind == "link":
                hops += 1
                if hops > MAX_LINKS:
                    raise GuestDataError(f"too many levels of symbolic links in {path}")
                target = fs.readlink(inner)
                if target.startswith("/"):
                    done = []
                todo = [c for c in target.split("/") if c] + todo
                continue
            if todo and kind != "dir":
                raise FileNotFoundError(here)
            done.append(comp)
        return "/" + "/".join(done)

    def kind(self, path: str) -> str:
        real = self.resolve(path)
        if real in self.mounts:
            return "dir"
        fs, inner = self._locate(real)
        return fs.kind(inner)

    def exists(self, path: str) -> bool:
        try:
            self.resolve(path)
        except (FileNotFoundError, GuestDataError):
            return False
        return True

    def read(self, path: str, *, limit: int) -> bytes:
        real = self.resolve(path)
        fs, inner = self._locate(real)
        if fs.kind(inner) != "file":
            raise GuestDataError(f"{path} is not a regular file")
        return fs.read_file(inner, limit=limit)

    def size(self, path: str) -> int:
        fs, inner = self._locate(self.resolve(path))
        return fs.size(inner)

    def listdir(self, path: str) -> list[str]:
        real = self.resolve(path)
        fs, inner = self._locate(real)
        names = set(fs.listdir(inner))
        for m in self.mounts:
            if m != "/" and posixpath.dirname(m) == real:
                names.add(posixpath.basename(m))
        return sorted(names)
