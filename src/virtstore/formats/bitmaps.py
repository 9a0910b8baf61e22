"""qcow2 persistent dirty bitmaps and block-status maps, through qemu-img.

A bitmap records which clusters were written since it was added; qemu keeps it in the
image, so changes made by any qemu program (a guest, qemu-img, qemu-io, qemu-nbd) are
tracked. ``qemu-img map`` over an NBD export that offers the bitmap as a meta context
(``x-dirty-bitmap``) reads the dirty extents: qemu reports them as ``"data": false``
(the dirty bit takes the place of the hole bit), the clean ones as ``"data": true``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from virtstore.host.nbd import NbdAddress
from virtstore.host.runner import run


@dataclass(frozen=True)
class Bitmap:
    name: str
    flags: tuple[str, ...]
    granularity: int

    @property
    def usable(self) -> bool:
        """Recording (``auto``) and consistent: ``in-use`` means a program had the image
        open with the bitmap and did not close it cleanly, so its content is unknown."""
        return "auto" in self.flags and "in-use" not in self.flags


def list_bitmaps(path: str) -> list[Bitmap]:
    out = run(["qemu-img", "info", "--output=json", "-f", "qcow2", path], timeout=120).stdout
    data: dict[str, Any] = json.loads(out)
    spec = (data.get("format-specific") or {}).get("data") or {}
    return [Bitmap(str(b["name"]), tuple(b.get("flags") or ()), int(b.get("granularity", 0)))
            for b in spec.get("bitmaps") or ()]


def add_bitmap(path: str, name: str) -> None:
    run(["qemu-img", "bitmap", "--add", "-f", "qcow2", path, name], timeout=300)


def remove_bitmap(path: str, name: str) -> None:
    run(["qemu-img", "bitmap", "--remove", "-f", "qcow2", path, name], timeout=300)


def _map(addr: NbdAddress, extra: str) -> list[dict[str, Any]]:
    if addr.socket:
        server = f"server.type=unix,server.path={addr.socket}"
    else:
        server = f"server.type=inet,server.host={addr.host},server.port={addr.port}"
    opts = f"driver=nbd,{server},export={addr.export}{extra}"
    out = run(["qemu-img", "map", "--output=json", "--image-opts", opts], timeout=3600).stdout
    result: list[dict[str, Any]] = json.loads(out)
    return result


def dirty_extents(addr: NbdAddress, bitmap: str) -> list[tuple[int, int]]:
    """(offset, length) of what was written since ``bitmap`` was added, read through an
    export that offers it (``qemu-nbd --bitmap``)."""
    rows = _map(addr, f",x-dirty-bitmap=qemu:dirty-bitmap:{bitmap}")
    return [(int(r["start"]), int(r["length"])) for r in rows if not r["data"]]


def data_extents(addr: NbdAddress) -> list[tuple[int, int]]:
    """(offset, length) of what may hold data (what is not known to read as zeros)."""
    rows = _map(addr, "")
    return [(int(r["start"]), int(r["length"])) for r in rows if not r.get("zero")]
