"""The child process that reads a guest's disk: ``python -m virtstore.inspect.worker OP
SOURCE [DIR]``, or ``python -m virtstore.inspect.worker serve`` for df of disk after
disk. It prints one JSON document per line; the parent (``run``) gives it a time limit
per filesystem and starts it again after the filesystem it died on.

OP is ``inspect`` or ``boot``; SOURCE an NBD URL (or, for tests, a raw file); DIR where
``boot`` writes the kernel and initrd. ``serve`` reads one request a line on its
standard input, ``{"source": SOURCE, "start": N}`` (df from the disk's region N on),
and ends each answer with ``{"done": true}``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from virtstore.inspect.guest import BootEntry, Found, find_boot, inspect_guest
from virtstore.inspect.parts import Region, regions
from virtstore.inspect.source import Cached, FileSource, GuestDataError, NbdSource, Source
from virtstore.inspect.superblocks import FsInfo, identify, is_lvm_pv

MEMORY_LIMIT = 2 << 30
BOOT_FILE_LIMIT = 512 << 20  # a kernel or initrd larger than this is refused


def emit(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


def open_source(spec: str) -> FileSource | NbdSource:
    return NbdSource(spec) if spec.startswith("nbd") else FileSource(spec)


def region_doc(r: Region) -> dict[str, Any]:
    return {"device": r.device, "offset": r.offset, "partition_size": r.size,
            "partition": r.partition, "part_type": r.part_type, "part_uuid": r.part_uuid,
            "part_label": r.part_label}


def probe(r: Region) -> tuple[FsInfo, str | None]:
    """What the region holds; a malformed one is ``unknown`` with the reason."""
    try:
        return identify(r.source), None
    except (GuestDataError, ValueError, IndexError, OverflowError, MemoryError,
            RecursionError, OSError) as exc:
        return FsInfo("unknown"), f"{type(exc).__name__}: {exc}"


def expand(disk: Source) -> tuple[str | None, list[Region]]:
    table, regs = regions(disk)
    out: list[Region] = []
    for r in regs:
        out.append(r)
        # Only the label here: the filesystems are probed one by one after the parent
        # was told which one is next, so a reader dying on one costs that one alone.
        try:
            pv = is_lvm_pv(r.source)
        except (GuestDataError, OSError):
            pv = False
        if pv:
            from virtstore.inspect.lvm import logical_volumes

            try:
                out.extend(logical_volumes(r))
            except (GuestDataError, ValueError, IndexError) as exc:
                r.notes.append(f"LVM metadata unreadable: {exc}")
    return table, out


def op_df(disk: Source, start: int) -> None:
    table, regs = expand(disk)
    emit({"table": table, "count": len(regs)})
    for i, r in enumerate(regs):
        if i < start:
            continue
        emit({"begin": i, **region_doc(r)})
        info, err = probe(r)
        info.notes = r.notes + info.notes
        emit({"fs": {**region_doc(r), **info.to_dict(), "error": err}})


def found_list(disk: Source) -> tuple[str | None, list[Found]]:
    table, regs = expand(disk)
    found = []
    for r in regs:
        info, err = probe(r)
        found.append(Found(r, info, err))
    return table, found


def op_inspect(disk: Source) -> None:
    table, found = found_list(disk)
    guest = inspect_guest(found)
    fss = []
    for f in found:
        fss.append({**region_doc(f.region), "type": f.info.type, "label": f.info.label,
                    "uuid": f.info.uuid, "mountpoint": f.mountpoint, "error": f.error})
    emit({"result": {"table": table, "os": guest.os or {"type": "unknown"},
                     "fstab": guest.fstab, "filesystems": fss}})


def op_boot(disk: Source, dest: str | None) -> None:
    _table, found = found_list(disk)
    guest = inspect_guest(found)
    entry = find_boot(guest)
    doc: dict[str, Any] = {"config": entry.source, "title": entry.title,
                           "kernel": entry.kernel, "initrd": entry.initrd,
                           "cmdline": entry.cmdline}
    if dest is not None:
        doc["extracted"] = extract(guest, entry, dest)
    emit({"result": doc})


def extract(guest: Any, entry: BootEntry, dest: str) -> list[dict[str, Any]]:
    """Write the kernel and initrd into ``dest`` under their base names; nothing the
    guest names can make us write elsewhere (names are base names, files are opened
    relative to the directory without following links)."""
    from virtstore.inspect.guest import _boot_tree

    tree = _boot_tree(guest)
    dfd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    out = []
    try:
        for path in (entry.kernel, entry.initrd):
            if path is None:
                continue
            name = os.path.basename(path)
            if name in ("", ".", "..") or "\0" in name:
                raise GuestDataError(f"cannot name a file after {path!r}")
            data = tree.read(path, limit=BOOT_FILE_LIMIT)
            tmp = f".{name}.part"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o644, dir_fd=dfd)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            out.append({"guest_path": path, "file": os.path.join(dest, name),
                        "size": len(data)})
    finally:
        os.close(dfd)
    return out


def answer(op: str, spec: str, extra: list[str]) -> None:
    """Run one operation on the disk at ``spec``; what the guest's data makes fail is
    printed as an ``error`` document."""
    try:
        raw = open_source(spec)
        try:
            disk = Cached(raw)
            if op == "df":
                op_df(disk, int(extra[0]) if extra else 0)
            elif op == "inspect":
                op_inspect(disk)
            elif op == "boot":
                op_boot(disk, extra[0] if extra and extra[0] else None)
            else:
                emit({"error": f"unknown operation {op}"})
        finally:
            raw.close()
    except (GuestDataError, ValueError, IndexError, OverflowError, RecursionError,
            MemoryError, UnicodeError) as exc:
        emit({"error": str(exc) or type(exc).__name__})
    except OSError as exc:
        emit({"error": f"{exc.strerror or exc}"})


def serve() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        answer("df", str(request["source"]), [str(int(request["start"]))])
        emit({"done": True})


def main(argv: list[str]) -> int:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    if argv[0] == "serve":
        serve()
    else:
        answer(argv[0], argv[1], argv[2:])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
