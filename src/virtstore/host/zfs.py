"""ZFS through zpool and zfs: pools, datasets, zvols, snapshots and clones.

Works with OpenZFS (kernel module, /dev/zfs) and with zfs-fuse (a user-space daemon
that has no zvols). Values are read with ``zfs get -H -p`` (exact bytes), which both
have; zpool's sizes come from the pool's root dataset for the same reason.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from virtstore.errors import CommandFailed
from virtstore.host.runner import Result, run, stream, which

ZFS_FUSE_SOCKET = "/var/run/zfs/zfs_socket"


def flavour() -> str | None:
    """"kernel" (OpenZFS), "fuse" (zfs-fuse) or None when neither is usable."""
    if os.path.exists("/dev/zfs"):
        return "kernel"
    if which("zfs-fuse") is not None:
        return "fuse"
    return None


def has_zvols() -> bool:
    """zvols need the kernel module; zfs-fuse cannot make block devices."""
    return os.path.exists("/dev/zfs")


def tool_problem() -> str | None:
    if which("zpool") is None or which("zfs") is None:
        return "the ZFS tools are not installed (zpool, zfs: Debian zfsutils-linux or zfs-fuse)"
    kind = flavour()
    if kind is None:
        return "ZFS is not available: no zfs kernel module (/dev/zfs) and no zfs-fuse"
    if kind == "fuse" and not daemon_running():
        return "the zfs-fuse daemon is not running (start it with 'zfs-fuse')"
    return None


def daemon_running() -> bool:
    """Whether zfs-fuse answers on its socket."""
    import socket

    if not os.path.exists(ZFS_FUSE_SOCKET):
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(2)
        s.connect(ZFS_FUSE_SOCKET)
        return True
    except OSError:
        return False
    finally:
        s.close()


def zpool(args: Sequence[str], *, check: bool = True, timeout: float = 120.0) -> Result:
    return run(["zpool", *args], check=check, timeout=timeout)


def zfs(args: Sequence[str], *, check: bool = True, timeout: float = 120.0) -> Result:
    return run(["zfs", *args], check=check, timeout=timeout)


@dataclass(frozen=True)
class Dataset:
    name: str
    type: str  # filesystem, volume, snapshot
    used: int
    available: int
    referenced: int
    volsize: int
    origin: str


def _num(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return 0


def parse_get(text: str) -> dict[str, dict[str, str]]:
    """``zfs get -H -p -o name,property,value`` -> {name: {property: value}}."""
    out: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) >= 3:
            out.setdefault(parts[0], {})[parts[1]] = parts[2]
    return out


_PROPS = "type,used,available,referenced,volsize,origin"


def datasets(root: str, *, types: str = "filesystem,volume", depth: int | None = None
             ) -> list[Dataset]:
    """``root`` and the datasets under it, in zfs's order."""
    args = ["list", "-H", "-r", "-t", types, "-o", "name"]
    if depth is not None:
        args += ["-d", str(depth)]
    names = zfs([*args, root]).stdout.split("\n")
    wanted = [n for n in names if n]
    if not wanted:
        return []
    props = parse_get(zfs(["get", "-H", "-p", "-o", "name,property,value", _PROPS, *wanted]
                          ).stdout)
    out = []
    for name in wanted:
        p = props.get(name, {})
        out.append(Dataset(name=name, type=p.get("type", ""), used=_num(p.get("used", "0")),
                           available=_num(p.get("available", "0")),
                           referenced=_num(p.get("referenced", "0")),
                           volsize=_num(p.get("volsize", "0")),
                           origin="" if p.get("origin", "-") == "-" else p.get("origin", "")))
    return out


def dataset(name: str) -> Dataset | None:
    try:
        found = datasets(name, types="filesystem,volume,snapshot", depth=0)
    except CommandFailed as exc:
        if "does not exist" in str(exc):
            return None
        raise
    return found[0] if found else None


def dependent_clones(name: str) -> list[str]:
    """The clones made from snapshots of dataset ``name``."""
    out = zfs(["get", "-H", "-r", "-d", "1", "-t", "snapshot", "-o", "value", "clones",
               name]).stdout
    return [c for line in out.splitlines() for c in line.split(",")
            if c and c != "-"]


def pool_names() -> list[str]:
    return [n for n in zpool(["list", "-H", "-o", "name"]).stdout.split("\n") if n]


def pool_imported(name: str) -> bool:
    return name in pool_names()


def health(name: str) -> str:
    return zpool(["list", "-H", "-o", "health", name]).stdout.strip()


@dataclass(frozen=True)
class ImportablePool:
    name: str
    id: str
    state: str
    devices: list[str]


def parse_import_listing(text: str) -> list[ImportablePool]:
    """``zpool import`` (no name): the pools it could import, with their devices."""
    pools: list[ImportablePool] = []
    cur: dict[str, str] = {}
    devs: list[str] = []
    in_config = False

    def flush() -> None:
        if cur.get("pool"):
            pools.append(ImportablePool(name=cur["pool"], id=cur.get("id", ""),
                                        state=cur.get("state", ""), devices=list(devs)))

    for raw in text.splitlines():
        line = raw.strip()
        key, sep, value = line.partition(":")
        if sep and key in ("pool", "id", "state", "action", "status", "see", "config"):
            if key == "pool":
                flush()
                cur, devs, in_config = {}, [], False
            if key == "config":
                in_config = True
                continue
            cur[key] = value.strip()
            continue
        if in_config and line:
            word = line.split()[0]
            if word in (cur.get("pool"), "mirror", "raidz", "raidz1", "raidz2", "raidz3",
                        "logs", "cache", "spares") or word.startswith(("mirror-", "raidz")):
                continue
            devs.append(word if word.startswith("/") else "/dev/" + word)
    flush()
    return pools


def importable(search_dirs: Sequence[str] = ("/dev",)) -> list[ImportablePool]:
    args = ["import"]
    for d in search_dirs:
        args += ["-d", d]
    res = zpool(args, check=False)
    return parse_import_listing(res.stdout + "\n" + res.stderr)


def copy(snapshot: str, target: str, *,
         should_stop: Callable[[], bool] | None = None) -> None:
    """A new dataset ``target`` with the content of ``snapshot``, as blocks of its own
    (``zfs send | zfs receive``: holes stay holes, nothing is shared with the source).
    The snapshot ``zfs receive`` leaves on ``target`` is destroyed."""
    stream(["bash", "-c", 'set -o pipefail; zfs send "$1" | zfs receive "$2"', "zfs-copy",
            snapshot, target], lambda _line: None, should_stop=should_stop, timeout=None)
    zfs(["destroy", f"{target}@{snapshot.split('@', 1)[1]}"])


# A zvol's data is object 1 of its dataset (ZVOL_OBJ); object 2 holds its properties.
ZVOL_OBJECT = 1
_FIELD = re.compile(r"(\w+) = (-?\d+)")
TO_THE_END = 1 << 62  # a FREE record's length -1: from its offset to the end


def _merged(ranges: list[tuple[int, int]], off: int, length: int) -> None:
    if ranges and ranges[-1][0] + ranges[-1][1] == off:
        ranges[-1] = (ranges[-1][0], ranges[-1][1] + length)
    else:
        ranges.append((off, length))


def parse_stream_dump(lines: Sequence[str], *, obj: int = ZVOL_OBJECT
                      ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """``zstream dump -v`` output -> (written, freed): the (offset, length) ranges of
    object ``obj`` in its WRITE records (data the stream carries) and in its FREE
    records (ranges that are holes; length -1, to the end, comes back as TO_THE_END),
    adjacent ranges merged."""
    written: list[tuple[int, int]] = []
    freed: list[tuple[int, int]] = []
    for line in lines:
        kind = line.split(" ", 1)[0]
        if kind not in ("WRITE", "FREE"):
            continue
        f = dict(_FIELD.findall(line))
        if int(f.get("object", -1)) != obj:
            continue
        length = int(f["logical_size"] if kind == "WRITE" else f["length"])
        if length < 0:
            length = TO_THE_END
        if length:
            _merged(written if kind == "WRITE" else freed, int(f["offset"]), length)
    return written, freed


def send_ranges(snapshot: str, since: str | None = None, *,
                should_stop: Callable[[], bool] | None = None
                ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """What ``zfs send`` of zvol snapshot ``snapshot`` carries, as byte ranges of the
    volume (written, freed): every block that holds data and the holes (a full
    stream), or with ``since`` (an earlier snapshot of the same zvol) the blocks written
    after it and the ranges it reports as holes (``zfs send -i``). ZFS finds these from
    block birth times, without comparing data; the stream goes through ``zstream dump
    -v``, which prints its records. An incremental stream's FREE records also cover
    ranges that were holes already in ``since`` (ZFS knows a hole's age only roughly):
    freed means "a hole now", not "changed"."""
    lines: list[str] = []

    def keep(line: str) -> None:
        if line.startswith(("WRITE ", "FREE ")):
            lines.append(line)

    incr = ["-i", since] if since is not None else []
    stream(["bash", "-c", 'set -o pipefail; zfs send "$@" | zstream dump -v', "zfs-send",
            *incr, snapshot], keep, should_stop=should_stop, timeout=None)
    return parse_stream_dump(lines)
