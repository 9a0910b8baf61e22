"""The backup directory: content-addressed chunks and one JSON manifest per backup.

Layout (docs/backup.md)::

    DIR/repository.json          format, version, chunk size, the volume it holds
    DIR/chunks/ab/abcdef...      one chunk, named by the SHA-256 of its bytes
    DIR/manifests/ID.json        one backup: the whole volume at that point

A manifest lists every chunk that is not all zeros (index and hash), so any point of
the chain is restored from its own manifest; the chain (``parent``) says what each
incremental was computed against. Chunks and manifests are written under a temporary
name and renamed, so a backup that fails or is killed leaves at most unreferenced
chunks, never a manifest that names a missing or torn one.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from virtstore.errors import InvalidArgument, OperationInvalid
from virtstore.host.files import atomic_write, fsync_dir

FORMAT = "virtstore-backup"
VERSION = 1
CHUNK_SIZE = 4 << 20

# Change tracking methods, as manifests name them.
TRACK_BITMAP = "qcow2-bitmap"
TRACK_HASH = "block-hash"


@dataclass
class Manifest:
    id: str
    created: str
    kind: str  # full | incremental
    parent: str | None
    volume: dict[str, str]  # pool, name, key
    pool_type: str
    format: str
    capacity: int
    chunk_size: int
    tracking: str
    bitmap: str | None = None  # the qcow2 bitmap that records changes after this backup
    snapshot: str | None = None  # a storage snapshot read instead of the live volume
    warnings: list[str] = field(default_factory=list)
    job: str | None = None
    stats: dict[str, int] = field(default_factory=dict)
    chunks: dict[int, str] = field(default_factory=dict)  # index -> sha256, zero chunks absent

    def chunk_length(self, index: int) -> int:
        return min(self.chunk_size, self.capacity - index * self.chunk_size)

    def to_json(self) -> str:
        d = asdict(self)
        d["format_version"] = VERSION
        d["chunks"] = [[i, h] for i, h in sorted(self.chunks.items())]
        return json.dumps(d, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        d: dict[str, Any] = json.loads(text)
        d.pop("format_version", None)
        d["chunks"] = {int(i): str(h) for i, h in d.get("chunks", [])}
        return cls(**d)

    def summary(self) -> dict[str, Any]:
        """The manifest without its chunk list: what listings and the CLI show."""
        d = asdict(self)
        del d["chunks"]
        d["stored_chunks"] = len(self.chunks)
        return d


def new_backup_id() -> str:
    # Sortable by time, unique across processes.
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


def sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


class Repository:
    """One backup directory, holding the chain of one volume."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.meta: dict[str, Any] = {}
        self._unsynced: set[str] = set()
        meta = os.path.join(self.path, "repository.json")
        if os.path.exists(meta):
            with open(meta, encoding="utf-8") as fh:
                self.meta = json.load(fh)
            if self.meta.get("format") != FORMAT:
                raise InvalidArgument(f"'{self.path}' is not a virtstore backup directory")
            if int(self.meta.get("version", 0)) > VERSION:
                raise Unreadable(f"backup directory '{self.path}' has format version "
                                 f"{self.meta['version']}, newer than this virtstore reads")

    @property
    def exists(self) -> bool:
        return bool(self.meta)

    @property
    def chunk_size(self) -> int:
        return int(self.meta.get("chunk_size", CHUNK_SIZE))

    @classmethod
    def open_existing(cls, path: str) -> Repository:
        repo = cls(path)
        if not repo.exists:
            raise InvalidArgument(f"'{repo.path}' holds no virtstore backup")
        return repo

    def init(self, volume: dict[str, str], chunk_size: int = CHUNK_SIZE) -> None:
        """Make the directory for ``volume``, or check that it holds that volume's chain."""
        if self.exists:
            held = self.meta.get("volume", {})
            if (held.get("pool"), held.get("name")) != (volume["pool"], volume["name"]):
                raise InvalidArgument(
                    f"backup directory '{self.path}' holds the chain of volume "
                    f"'{held.get('name')}' of pool '{held.get('pool')}': use another "
                    "directory for each volume")
            return
        os.makedirs(os.path.join(self.path, "chunks"), exist_ok=True)
        os.makedirs(os.path.join(self.path, "manifests"), exist_ok=True)
        self.meta = {"format": FORMAT, "version": VERSION, "chunk_size": chunk_size,
                     "volume": volume}
        atomic_write(os.path.join(self.path, "repository.json"),
                     json.dumps(self.meta, indent=1, sort_keys=True) + "\n", 0o644)

    # -- chunks ----------------------------------------------------------------
    def chunk_path(self, digest: str) -> str:
        return os.path.join(self.path, "chunks", digest[:2], digest)

    def has_chunk(self, digest: str) -> bool:
        return os.path.exists(self.chunk_path(digest))

    def put_chunk(self, data: bytes | memoryview, digest: str | None = None) -> tuple[str, bool]:
        """Store ``data``; (its hash, whether it was written: a chunk already stored is
        not written again)."""
        digest = digest or sha256(data)
        path = self.chunk_path(digest)
        if os.path.exists(path):
            return digest, False
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        atomic_write(path, data, 0o644, sync_dir=False)
        self._unsynced.add(directory)
        return digest, True

    def read_chunk(self, digest: str, length: int) -> bytes:
        """A chunk's bytes, checked against its name and the length the manifest says."""
        try:
            with open(self.chunk_path(digest), "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            raise Unreadable(f"chunk {digest} is missing from '{self.path}'") from None
        if len(data) != length or sha256(data) != digest:
            raise Unreadable(f"chunk {digest} in '{self.path}' is damaged: its content does "
                             "not match its hash")
        return data

    def all_chunks(self) -> Iterator[str]:
        base = os.path.join(self.path, "chunks")
        for sub in sorted(os.listdir(base)) if os.path.isdir(base) else ():
            for name in sorted(os.listdir(os.path.join(base, sub))):
                if not name.startswith("."):
                    yield name

    # -- manifests -------------------------------------------------------------
    def _manifest_path(self, backup_id: str) -> str:
        if not backup_id or "/" in backup_id or backup_id.startswith("."):
            raise InvalidArgument(f"invalid backup id '{backup_id}'")
        return os.path.join(self.path, "manifests", backup_id + ".json")

    def write_manifest(self, m: Manifest) -> None:
        # The chunks' names are durable before a manifest names them.
        for directory in sorted(self._unsynced):
            fsync_dir(directory)
        self._unsynced.clear()
        atomic_write(self._manifest_path(m.id), m.to_json(), 0o644)
        fsync_dir(os.path.join(self.path, "manifests"))

    def manifest(self, backup_id: str) -> Manifest:
        try:
            with open(self._manifest_path(backup_id), encoding="utf-8") as fh:
                return Manifest.from_json(fh.read())
        except FileNotFoundError:
            raise InvalidArgument(f"no backup '{backup_id}' in '{self.path}'") from None
        except (ValueError, TypeError, KeyError) as exc:
            raise Unreadable(f"manifest of backup '{backup_id}' in '{self.path}' cannot be "
                             f"read: {exc}") from None

    def ids(self) -> list[str]:
        d = os.path.join(self.path, "manifests")
        names = os.listdir(d) if os.path.isdir(d) else []
        return sorted(n[:-5] for n in names if n.endswith(".json") and not n.startswith("."))

    def manifests(self) -> list[Manifest]:
        """All backups, oldest first."""
        return sorted((self.manifest(i) for i in self.ids()), key=lambda m: (m.created, m.id))

    def latest(self) -> Manifest | None:
        ms = self.manifests()
        return ms[-1] if ms else None


class Unreadable(OperationInvalid):
    """A backup directory whose content does not check out."""


def chunks_of(extents: Iterable[tuple[int, int]], chunk: int, capacity: int) -> set[int]:
    """Indexes of the chunks that the extents touch."""
    out: set[int] = set()
    last = (capacity - 1) // chunk if capacity else -1
    for off, length in extents:
        if length <= 0:
            continue
        out.update(range(off // chunk, min(last, (off + length - 1) // chunk) + 1))
    return out


def now() -> str:
    """A manifest's time: UTC, to the microsecond."""
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1e6) % 1000000:06d}Z"
