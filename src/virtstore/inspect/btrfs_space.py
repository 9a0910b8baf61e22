"""btrfs's df numbers as the kernel's statfs computes them (fs/btrfs/super.c,
btrfs_statfs), from the bytes: the chunk tree gives each block group's size and profile,
the extent tree (or block group tree) how much of it is used, the root tree the sizes
of the trees the global reserve is sized on.

Our own reading, because no library computes statfs (dissect.btrfs reads files, not
space accounting, and is an optional dependency): a B-tree walk limited to the keys it
needs, every node checked (its own address, its level one below its parent's, at most
MAX_NODES read), every address mapped through the chunks it found. Only single-device
filesystems are computed; anything else keeps the superblock's totals.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from virtstore.inspect.source import GuestDataError, Source

SUPER = 0x10000
HEADER = 0x65
MAX_LEVEL = 7
MAX_NODES = 20000
MAX_CHUNKS = 100000
STRIPE_LEN = 64 << 10
RANGE_RESERVED = 1 << 20

CHUNK_ITEM = 228
BLOCK_GROUP_ITEM = 192
ROOT_ITEM = 132
FIRST_CHUNK_TREE_OBJECTID = 256
EXTENT_TREE, CSUM_TREE, FREE_SPACE_TREE, BLOCK_GROUP_TREE = 2, 7, 10, 11
COMPAT_RO_FREE_SPACE_TREE = 1 << 0
COMPAT_RO_BLOCK_GROUP_TREE = 1 << 3

DATA, SYSTEM, METADATA = 1, 2, 4
DUP, RAID1, RAID10, RAID1C3, RAID1C4 = 32, 16, 64, 512, 1024
UNLINK_METADATA_UNITS = 6
MAX_BTREE_LEVEL = 8

Key = tuple[int, int, int]


@dataclass
class Chunk:
    logical: int
    length: int
    flags: int
    physical: int  # the first stripe's offset on this device


def factor(flags: int) -> int:
    """How many bytes of disk one byte of a block group costs (btrfs_bg_type_to_factor)."""
    if flags & (DUP | RAID1 | RAID10):
        return 2
    return 3 if flags & RAID1C3 else 4 if flags & RAID1C4 else 1


class Reader:
    def __init__(self, src: Source, sb: bytes) -> None:
        self.src = src
        self.nodesize = struct.unpack_from("<I", sb, 0x94)[0]
        self.fsid = sb[0x20:0x30]
        self.devid = struct.unpack_from("<Q", sb, 0xC9)[0]
        if not 4096 <= self.nodesize <= 65536 or self.nodesize & (self.nodesize - 1):
            raise GuestDataError(f"btrfs node size {self.nodesize} is invalid")
        self.chunks: list[Chunk] = []
        self.nodes_read = 0
        (array_size,) = struct.unpack_from("<I", sb, 0xA0)
        if array_size > 2048:
            raise GuestDataError("btrfs's system chunk array is too large")
        array = sb[0x32B:0x32B + array_size]
        pos = 0
        while pos + 17 + 48 <= len(array):
            objectid, kind, offset = struct.unpack_from("<QBQ", array, pos)
            if kind != CHUNK_ITEM:
                raise GuestDataError("btrfs's system chunk array holds something else")
            size = self.add_chunk(offset, array, pos + 17)
            pos += 17 + size
            del objectid

    def add_chunk(self, logical: int, data: bytes, pos: int) -> int:
        length, _owner, _stripe_len, flags = struct.unpack_from("<QQQQ", data, pos)
        (num_stripes,) = struct.unpack_from("<H", data, pos + 44)
        size = 48 + 32 * int(num_stripes)
        if num_stripes == 0 or pos + size > len(data) or length == 0:
            raise GuestDataError("a btrfs chunk item is malformed")
        stripes = [struct.unpack_from("<QQ", data, pos + 48 + 32 * i)
                   for i in range(num_stripes)]
        mine = [off for dev, off in stripes if dev == self.devid]
        if len(mine) != num_stripes and not flags & (DUP | RAID1 | RAID1C3 | RAID1C4):
            raise GuestDataError("the filesystem spans several devices")
        if not mine:
            raise GuestDataError("a btrfs chunk has no copy on this device")
        if not any(c.logical == logical for c in self.chunks):
            if len(self.chunks) >= MAX_CHUNKS:
                raise GuestDataError("btrfs has too many chunks")
            self.chunks.append(Chunk(logical, length, flags, mine[0]))
        return size

    def physical(self, logical: int) -> int:
        for c in self.chunks:
            if c.logical <= logical and logical + self.nodesize <= c.logical + c.length:
                return c.physical + logical - c.logical
        raise GuestDataError(f"btrfs address {logical} is in no chunk")

    def node(self, logical: int, level: int | None) -> tuple[int, list[tuple[Key, bytes]]]:
        """The node's level and its items: (key, item data) in a leaf, (key, child
        address as 8 bytes) in an internal node."""
        self.nodes_read += 1
        if self.nodes_read > MAX_NODES:
            raise GuestDataError(f"more than {MAX_NODES} btrfs tree nodes read")
        raw = self.src.pread(self.physical(logical), self.nodesize)
        bytenr = struct.unpack_from("<Q", raw, 0x30)[0]
        nritems, got_level = struct.unpack_from("<IB", raw, 0x60)
        if raw[0x20:0x30] != self.fsid or bytenr != logical or got_level > MAX_LEVEL or \
                (level is not None and got_level != level):
            raise GuestDataError(f"btrfs tree node at {logical} is not one")
        out: list[tuple[Key, bytes]] = []
        if got_level:
            if HEADER + nritems * 33 > self.nodesize:
                raise GuestDataError(f"btrfs node at {logical} has too many items")
            for i in range(nritems):
                p = HEADER + i * 33
                out.append((struct.unpack_from("<QBQ", raw, p), raw[p + 17:p + 25]))
            return got_level, out
        if HEADER + nritems * 25 > self.nodesize:
            raise GuestDataError(f"btrfs leaf at {logical} has too many items")
        for i in range(nritems):
            p = HEADER + i * 25
            key = struct.unpack_from("<QBQ", raw, p)
            off, size = struct.unpack_from("<II", raw, p + 17)
            if HEADER + off + size > self.nodesize:
                raise GuestDataError(f"btrfs leaf at {logical} has an item outside it")
            out.append((key, raw[HEADER + off:HEADER + off + size]))
        return 0, out

    def walk(self, root: int, lo: Key, hi: Key, level: int | None = None) -> list[
            tuple[Key, bytes]]:
        """The leaf items with lo <= key <= hi, in order."""
        got, items = self.node(root, level)
        if got == 0:
            return [(k, v) for k, v in items if lo <= k <= hi]
        out = []
        for i, (key, ptr) in enumerate(items):
            nxt = items[i + 1][0] if i + 1 < len(items) else None
            if key > hi or (nxt is not None and nxt <= lo):
                continue
            out += self.walk(struct.unpack("<Q", ptr)[0], lo, hi, got - 1)
        return out


def statfs(src: Source, sb: bytes) -> tuple[int, int, int]:
    """(size, used, available) in bytes, as ``df`` shows them for this filesystem."""
    r = Reader(src, sb)
    chunk_root, root_root = struct.unpack_from("<QQ", sb, 0x58)[0], \
        struct.unpack_from("<Q", sb, 0x50)[0]
    for key, data in r.walk(chunk_root, (FIRST_CHUNK_TREE_OBJECTID, CHUNK_ITEM, 0),
                            (FIRST_CHUNK_TREE_OBJECTID, CHUNK_ITEM, 2**64 - 1)):
        r.add_chunk(key[2], data, 0)
    roots: dict[int, tuple[int, int]] = {}  # objectid -> (bytenr, bytes_used)
    for key, data in r.walk(root_root, (EXTENT_TREE, ROOT_ITEM, 0),
                            (BLOCK_GROUP_TREE, ROOT_ITEM, 2**64 - 1)):
        if key[1] == ROOT_ITEM and len(data) >= 200:
            roots[key[0]] = struct.unpack_from("<QQ", data, 176)[0], \
                struct.unpack_from("<Q", data, 192)[0]
    (compat_ro,) = struct.unpack_from("<Q", sb, 0xB4)
    bg_tree = BLOCK_GROUP_TREE if compat_ro & COMPAT_RO_BLOCK_GROUP_TREE else EXTENT_TREE
    if bg_tree not in roots:
        raise GuestDataError("btrfs has no extent tree")
    spaces: dict[int, list[int]] = {}  # type -> [disk_total, disk_used]
    data_factor = 1
    for c in r.chunks:
        found = r.walk(roots[bg_tree][0], (c.logical, BLOCK_GROUP_ITEM, c.length),
                       (c.logical, BLOCK_GROUP_ITEM, c.length))
        if not found or len(found[0][1]) < 24:
            raise GuestDataError(f"btrfs chunk at {c.logical} has no block group")
        used, _chunk_objectid, flags = struct.unpack_from("<QQQ", found[0][1], 0)
        if used > c.length:
            raise GuestDataError(f"btrfs block group at {c.logical} is over-full")
        f = factor(flags)
        space = spaces.setdefault(flags & (DATA | SYSTEM | METADATA), [0, 0])
        space[0] += c.length * f
        space[1] += used * f
        if flags & DATA:
            data_factor = f
    free_data = sum(t - u for k, (t, u) in spaces.items() if k & DATA)
    total_used = sum(u for _t, u in spaces.values())
    total_bytes = struct.unpack_from("<Q", sb, 0x70)[0]
    bits_size = struct.unpack_from("<I", sb, 0x90)[0]
    blocks = total_bytes // data_factor // bits_size
    free = blocks - total_used // data_factor // bits_size
    rsv = global_reserve(r.nodesize, roots, compat_ro) // bits_size
    free = free - rsv if free >= rsv else 0
    dev_total, dev_used = struct.unpack_from("<QQ", sb, 0xC9 + 8)
    avail_dev = (dev_total - dev_used) // STRIPE_LEN * STRIPE_LEN
    unallocated = avail_dev - RANGE_RESERVED if avail_dev > RANGE_RESERVED + STRIPE_LEN \
        else 0
    avail = (free_data // data_factor + unallocated // data_factor) // bits_size
    return blocks * bits_size, (blocks - free) * bits_size, avail * bits_size


def global_reserve(nodesize: int, roots: dict[int, tuple[int, int]], compat_ro: int) -> int:
    """btrfs_update_global_block_rsv: the trees the reserve is sized on, and at least
    what an unlink and its delayed references need."""
    trees = [EXTENT_TREE, CSUM_TREE, FREE_SPACE_TREE]
    if compat_ro & COMPAT_RO_BLOCK_GROUP_TREE:
        trees.append(BLOCK_GROUP_TREE)
    present = [t for t in trees if t in roots]
    used = sum(roots[t][1] for t in present)
    items = 1 + len(present) + UNLINK_METADATA_UNITS  # the tree root, each global root
    per_item = nodesize * MAX_BTREE_LEVEL * 2
    delayed = per_item * UNLINK_METADATA_UNITS * (
        2 if compat_ro & COMPAT_RO_FREE_SPACE_TREE else 1)
    return min(max(used, per_item * items + delayed), 512 << 20)
