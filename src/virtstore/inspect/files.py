"""Reading files of a guest filesystem in userspace, with well-kept readers: The Sleuth
Kit (pytsk3) for ext2/3/4, FAT, NTFS, exFAT, ISO 9660, HFS+; libfsxfs (pyfsxfs) for XFS,
which The Sleuth Kit's build lacks; dissect.btrfs for btrfs (subvolumes, zlib/lzo/zstd
compression), an optional extra because of its AGPL licence. Each reader is wrapped in
the same small interface (``kind``, ``readlink``, ``size``, ``read_file``, ``listdir``)
with the same caps, and whatever a reader raises on a malformed filesystem becomes a
GuestDataError for that filesystem.

``GuestTree`` joins a root filesystem and the ones fstab mounts below it, and resolves
paths as the guest would, symlinks included, without ever leaving the guest: an
absolute link target starts again at the guest's root, ``..`` stops at it.
"""

from __future__ import annotations

import io
import posixpath
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from virtstore.inspect.source import GuestDataError, Source

MAX_LINKS = 40  # as the kernel's ELOOP limit
MAX_DIR_ENTRIES = 10000
MAX_SUBVOLUMES = 256
READ_CHUNK = 4 << 20
# What The Sleuth Kit looks for in a filesystem of each type it reads. Its detection of
# any type tries YAFFS2's too, which reads a page in every 132 KiB of the filesystem (19
# MiB of a 32 MiB NTFS); the superblock has told us the type already.
TSK_DETECT = {"ext2": "EXT_DETECT", "ext3": "EXT_DETECT", "ext4": "EXT_DETECT",
              "vfat": "FAT_DETECT", "ntfs": "NTFS_DETECT", "exfat": "FAT_DETECT",
              "iso9660": "ISO9660_DETECT", "hfsplus": "HFS_DETECT"}
TSK_TYPES = tuple(TSK_DETECT)
FILE_TYPES = (*TSK_TYPES, "xfs", "btrfs")


class FsReader(Protocol):
    """One guest filesystem's files, read in userspace."""

    def kind(self, path: str) -> str: ...

    def readlink(self, path: str) -> str: ...

    def size(self, path: str) -> int: ...

    def read_file(self, path: str, *, limit: int) -> bytes: ...

    def listdir(self, path: str) -> list[str]: ...


class Unreadable(GuestDataError):
    """This filesystem's files cannot be read by us (type not supported)."""


def _tsk() -> Any:
    import pytsk3  # type: ignore[import-not-found]

    return pytsk3


class TskFs:
    """One filesystem opened by The Sleuth Kit over a Source."""

    def __init__(self, src: Source, kind: str) -> None:
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
            self.fs = tsk.FS_Info(self.img, offset=0,
                                  type=getattr(tsk, "TSK_FS_TYPE_" + TSK_DETECT[kind]))
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
        return _read_all(int(f.info.meta.size), limit, path, f.read_random)

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


class SourceFile(io.RawIOBase):
    """A Source as the seekable binary file the readers expect."""

    def __init__(self, src: Source) -> None:
        super().__init__()
        self.src = src
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.src.size}[whence]
        if base + offset < 0:
            raise GuestDataError(f"seek to {base + offset}")
        self.pos = base + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def get_size(self) -> int:
        return self.src.size

    def read(self, size: int | None = -1) -> bytes:
        end = self.src.size if size is None or size < 0 else min(self.pos + size,
                                                                 self.src.size)
        if end <= self.pos:
            return b""
        data = self.src.pread(self.pos, end - self.pos)
        self.pos += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


def _read_all(size: int, limit: int, path: str, read: Callable[[int, int], bytes]) -> bytes:
    """``size`` bytes by ``read(offset, length)`` in pieces, refusing more than ``limit``
    and a reader that returns nothing before the end."""
    if size > limit:
        raise GuestDataError(f"{path} is {size} bytes, more than the {limit} allowed")
    out = []
    pos = 0
    while pos < size:
        data = read(pos, min(READ_CHUNK, size - pos))
        if not data:
            raise GuestDataError(f"{path}: cannot read past byte {pos} of {size}")
        out.append(bytes(data))
        pos += len(data)
    return b"".join(out)[:size]


@contextmanager
def _hostile(what: str) -> Iterator[None]:
    """A reader's own exceptions on a malformed filesystem (struct errors, KeyError,
    NotImplementedError, EOFError...) as GuestDataError; FileNotFoundError passes."""
    try:
        yield
    except (FileNotFoundError, GuestDataError, MemoryError):
        raise
    except Exception as exc:  # the reader parses hostile bytes: any failure is the data's
        raise GuestDataError(f"{what}: {type(exc).__name__}: {exc}") from None


class XfsFs:
    """An XFS filesystem read by libfsxfs (pyfsxfs)."""

    def __init__(self, src: Source) -> None:
        import pyfsxfs  # type: ignore[import-not-found]

        self.file = SourceFile(src)
        with _hostile("libfsxfs cannot open the filesystem"):
            self.volume = pyfsxfs.volume()
            self.volume.open_file_object(self.file)

    def _entry(self, path: str) -> Any:
        with _hostile(f"xfs: {path}"):
            entry = self.volume.get_file_entry_by_path(path)
        if entry is None:
            raise FileNotFoundError(path)
        return entry

    def kind(self, path: str) -> str:
        mode = self._entry(path).file_mode or 0
        return {stat.S_IFREG: "file", stat.S_IFDIR: "dir",
                stat.S_IFLNK: "link"}.get(stat.S_IFMT(mode), "other")

    def readlink(self, path: str) -> str:
        with _hostile(f"xfs: {path}"):
            target = self._entry(path).symbolic_link_target
        if not target:
            raise GuestDataError(f"symlink {path} has no target")
        return str(target)

    def size(self, path: str) -> int:
        return int(self._entry(path).size)

    def read_file(self, path: str, *, limit: int) -> bytes:
        entry = self._entry(path)
        with _hostile(f"xfs: {path}"):
            return _read_all(int(entry.size), limit, path,
                             lambda pos, n: entry.read_buffer_at_offset(n, pos))

    def listdir(self, path: str) -> list[str]:
        entry = self._entry(path)
        with _hostile(f"xfs: {path}"):
            count = int(entry.number_of_sub_file_entries or 0)
            if count > MAX_DIR_ENTRIES:
                raise GuestDataError(f"{path} has more than {MAX_DIR_ENTRIES} entries")
            return [str(entry.get_sub_file_entry(i).name) for i in range(count)]


class BtrfsFs:
    """One subvolume of a btrfs filesystem, read by dissect.btrfs. ``subvolume`` is a
    path from the top level (``root``, ``@/.snapshots/1/snapshot``) or an id; None is
    the filesystem's default subvolume, as a mount without ``subvol=`` sees."""

    def __init__(self, src: Source, subvolume: str | int | None = None,
                 *, fs: Any = None) -> None:
        if fs is None:
            try:
                from dissect.btrfs import Btrfs  # type: ignore[import-untyped]
            except ImportError:
                raise GuestDataError("reading files on btrfs needs the optional "
                                     "dissect.btrfs package (pip install "
                                     "'virtstore[btrfs]')") from None
            with _hostile("dissect.btrfs cannot open the filesystem"):
                fs = Btrfs(SourceFile(src))
        self.src = src
        self.fs = fs
        with _hostile(f"btrfs subvolume {subvolume}"):
            if subvolume is None:
                self.sv = fs.default_subvolume
            elif isinstance(subvolume, int):
                self.sv = fs.open_subvolume(subvolume)
                self.sv.tree  # noqa: B018 (an unknown id fails here, not later)
            else:
                self.sv = next((s for s in self.subvolumes_raw()
                                if s.path == subvolume.strip("/")), None)
                if self.sv is None:
                    raise GuestDataError(f"btrfs has no subvolume {subvolume}")

    def subvolumes_raw(self) -> list[Any]:
        out = []
        with _hostile("btrfs subvolumes"):
            for sv in self.fs.subvolumes():
                out.append(sv)
                if len(out) > MAX_SUBVOLUMES:
                    raise GuestDataError(f"more than {MAX_SUBVOLUMES} btrfs subvolumes")
        return out

    def subvolumes(self) -> list[BtrfsFs]:
        """Views of every subvolume (the top level first)."""
        return [BtrfsFs(self.src, sv.objectid, fs=self.fs) for sv in self.subvolumes_raw()]

    def subvolume(self, spec: str | int | None) -> BtrfsFs:
        return BtrfsFs(self.src, spec, fs=self.fs)

    def _node(self, path: str) -> Any:
        with _hostile(f"btrfs: {path}"):
            try:
                return self.sv.get(path)
            except FileNotFoundError:
                raise FileNotFoundError(path) from None

    def kind(self, path: str) -> str:
        node = self._node(path)
        with _hostile(f"btrfs: {path}"):
            if node.is_symlink():
                return "link"
            return "dir" if node.is_dir() else "file" if node.is_file() else "other"

    def readlink(self, path: str) -> str:
        node = self._node(path)
        with _hostile(f"btrfs: {path}"):
            return _read_all(int(node.size), 4096, path, _stream(node)).decode(
                "utf-8", "surrogateescape")

    def size(self, path: str) -> int:
        node = self._node(path)
        with _hostile(f"btrfs: {path}"):
            return int(node.size)

    def read_file(self, path: str, *, limit: int) -> bytes:
        node = self._node(path)
        with _hostile(f"btrfs: {path}"):
            return _read_all(int(node.size), limit, path, _stream(node))

    def listdir(self, path: str) -> list[str]:
        node = self._node(path)
        names = []
        with _hostile(f"btrfs: {path}"):
            for name, _child in node.iterdir():
                if name in (".", ".."):
                    continue
                names.append(str(name))
                if len(names) > MAX_DIR_ENTRIES:
                    raise GuestDataError(f"{path} has more than {MAX_DIR_ENTRIES} entries")
        return names


def _stream(node: Any) -> Callable[[int, int], bytes]:
    fh = node.open()

    def read(pos: int, n: int) -> bytes:
        fh.seek(pos)
        return bytes(fh.read(n))

    return read


def open_reader(kind: str, src: Source) -> FsReader:
    """The file reader for a filesystem of type ``kind``."""
    if kind == "xfs":
        return XfsFs(src)
    if kind == "btrfs":
        return BtrfsFs(src)
    if kind in TSK_TYPES:
        return TskFs(src, kind)
    raise Unreadable(f"files on {kind} are not read")


class GuestTree:
    """The guest's directory tree over its filesystems: ``mounts`` maps a mount point
    (``/``, ``/boot``, ``/boot/efi``) to an open filesystem."""

    def __init__(self, mounts: dict[str, FsReader]) -> None:
        if "/" not in mounts:
            raise GuestDataError("no root filesystem")
        self.mounts = dict(mounts)

    def _locate(self, path: str) -> tuple[FsReader, str]:
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
