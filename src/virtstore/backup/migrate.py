"""Pre-migration checks: what a volume needs on the other host, and whether that host
can give it (docs/backup.md, "migrate-check").

The source engine describes each volume (``describe``): the storage it lives on as a
key two hosts compare (an RBD pool of one cluster, an NFS export, an iSCSI target),
its format, the bytes a copy needs (``qemu-img measure``) and the features it uses (a
backing chain, encryption). The target engine answers for one volume (``place``):
the same storage is visible there (nothing to copy), or which pool would take a copy,
or why none can.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from virtstore.backends.base import Backend, VolumeRecord, qemu_format
from virtstore.errors import VirtstoreError
from virtstore.xml import PoolDef

# Verdicts, per disk.
SHARED = "shared"  # the target sees the same storage: nothing to copy
COPY = "copy"  # a target pool can take a copy
NO = "no"  # nothing on the target can take it

_DEFAULT_PORTS = {"rbd": 6789, "iscsi": 3260, "iscsi-direct": 3260, "gluster": 24007}


def storage_key(pool: PoolDef) -> str:
    """What identifies the storage under a pool across hosts; "" for storage only this
    host reaches (a directory, a VG, a zpool). Hosts are compared as written: a pool
    that names a monitor '127.0.0.1' and one that names it 'localhost' differ."""
    src = pool.source
    hosts = ",".join(sorted(f"{h.name}:{h.port or _DEFAULT_PORTS.get(pool.type, 0)}"
                            for h in src.hosts))
    if pool.type == "rbd":
        return f"rbd://{hosts}/{src.name or 'rbd'}"
    if pool.type == "netfs" and src.dir:
        return f"{src.format or 'auto'}://{hosts}{posixpath.normpath(src.dir)}"
    if pool.type == "gluster" and src.name:
        return f"gluster://{hosts}/{src.name}{posixpath.normpath(src.dir or '/')}"
    if pool.type in ("iscsi", "iscsi-direct") and src.devices:
        return f"iscsi://{hosts}/{src.devices[0].path}"
    return ""


def describe(backend: Backend, pool: PoolDef, rec: VolumeRecord) -> dict[str, Any]:
    """What the target needs to know of a volume."""
    from virtstore.formats.qemuimg import measure

    fmt = qemu_format(rec.format or "raw")
    note = ""
    try:
        with backend.qemu_source(pool, rec) as src:
            # qemu-img measure counts a raw copy at its whole capacity, holes included;
            # a qcow2 copy's figure is the data (and a little metadata): what a sparse
            # raw copy takes too.
            required = measure("qcow2" if fmt == "raw" else fmt, image=src.image,
                               fmt=src.fmt, image_opts=src.image_opts,
                               objects=src.objects)["required"]
    except VirtstoreError as exc:
        # A volume qemu cannot open here (locked by a running guest, a device that
        # is not exported) still gets a verdict, on its whole capacity.
        required = rec.capacity
        note = f"not measured ({exc}): its whole capacity is counted"
    return {"storage": storage_key(pool), "pool_type": pool.type, "format": fmt,
            "capacity": rec.capacity, "required": required,
            "backing": bool(rec.backing_path), "encrypted": bool(rec.encryption),
            "note": note}


@dataclass(frozen=True)
class Candidate:
    pool: PoolDef
    backend: Backend
    available: int


def needed(c: Candidate, capacity: int, required: int) -> int:
    """The bytes a copy takes in pool ``c``: its data, or all of its capacity where new
    volumes are allocated whole (a thick LV)."""
    return required if c.backend.new_volumes_read_zeros else max(capacity, required)


def _refusal(c: Candidate, fmt: str, need: int, backing: bool,
             encrypted: bool) -> str | None:
    """Why pool ``c`` cannot take a copy, or None."""
    caps = c.backend.caps
    if not c.backend.supports("create_volume"):
        return "makes no volumes"
    formats = {qemu_format(f) for f in caps.vol_formats}
    if fmt not in formats:
        return f"holds no {fmt} volumes (only {', '.join(sorted(formats)) or 'none'})"
    # Backing chains and encrypted images are qcow2/luks files: only file pools make them.
    if backing and not caps.file_based:
        return "cannot hold a backing chain"
    if encrypted and not caps.file_based:
        return "cannot hold an encrypted volume"
    if c.available < need:
        return f"has {c.available} bytes free, {need} needed"
    return None


def place(candidates: Sequence[Candidate], *, storage: str, format: str, capacity: int,
          required: int, backing: bool = False, encrypted: bool = False,
          pool: str | None = None) -> dict[str, Any]:
    """The target's answer for one volume: the pool that sees the same storage, or the
    first (or the named) pool that can take a copy, or every pool's reason why not."""
    if storage:
        for c in candidates:
            if storage_key(c.pool) == storage:
                return {"verdict": SHARED, "pool": c.pool.name, "available": c.available,
                        "needed": 0,
                        "reason": f"pool '{c.pool.name}' uses the same storage ({storage})"}
    fmt = qemu_format(format)
    named = [c for c in candidates if c.pool.name == pool] if pool else list(candidates)
    if pool and not named:
        return {"verdict": NO, "pool": pool, "available": 0, "needed": required,
                "reason": f"no running pool '{pool}' on the target"}
    reasons = []
    for c in named:
        need = needed(c, capacity, required)
        why = _refusal(c, fmt, need, backing, encrypted)
        if why is None:
            return {"verdict": COPY, "pool": c.pool.name, "available": c.available,
                    "needed": need,
                    "reason": f"a copy fits in pool '{c.pool.name}' ({c.pool.type})"}
        reasons.append(f"pool '{c.pool.name}' {why}")
    return {"verdict": NO, "pool": pool, "available": 0, "needed": required,
            "reason": "; ".join(reasons) or "the target has no running pool"}
