"""SCSI hosts, FC hosts, their LUNs, and multipath maps, read from sysfs.

Every function takes ``root`` (default ``/``), the directory sysfs is under, so the
parsers are tested on recorded trees. Names are libvirt's: adapters ``hostN``, LUN
volumes ``unit:BUS:TARGET:LUN``, multipath volumes ``dm-N``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from virtstore.host.files import entries
from virtstore.host.files import read_attr as _read


def _sys(root: str, *parts: str) -> str:
    return os.path.join(root, "sys", *parts)


def _wwn(value: str | None) -> str:
    v = (value or "").strip().lower()
    return v[2:] if v.startswith("0x") else v


_PCI = re.compile(r"^([0-9a-f]{4}):([0-9a-f]{2}):([0-9a-f]{2})\.([0-7])$")


@dataclass
class ScsiHost:
    name: str  # hostN
    number: int
    unique_id: int | None = None
    proc_name: str = ""
    pci_addr: tuple[int, int, int, int] | None = None  # the PCI device it hangs off
    # FC hosts only:
    fc: bool = False
    wwnn: str = ""
    wwpn: str = ""
    fabric_wwn: str = ""
    vport_capable: bool = False
    port_state: str = ""


def scsi_host_class_present(root: str = "/") -> bool:
    return os.path.isdir(_sys(root, "class", "scsi_host"))


def _pci_of(root: str, host: str) -> tuple[int, int, int, int] | None:
    link = _sys(root, "class", "scsi_host", host)
    try:
        target = os.path.realpath(link)
    except OSError:
        return None
    for part in reversed(target.split(os.sep)):
        m = _PCI.match(part)
        if m:
            return (int(m.group(1), 16), int(m.group(2), 16), int(m.group(3), 16),
                    int(m.group(4), 16))
    return None


def scsi_hosts(root: str = "/") -> list[ScsiHost]:
    base = _sys(root, "class", "scsi_host")
    out: list[ScsiHost] = []
    for name in entries(base):
        m = re.match(r"^host(\d+)$", name)
        if not m:
            continue
        uid = _read(os.path.join(base, name, "unique_id"))
        h = ScsiHost(name=name, number=int(m.group(1)),
                     unique_id=int(uid) if uid and uid.isdigit() else None,
                     proc_name=_read(os.path.join(base, name, "proc_name")) or "",
                     pci_addr=_pci_of(root, name))
        fc_dir = _sys(root, "class", "fc_host", name)
        if os.path.isdir(fc_dir):
            h.fc = True
            h.wwnn = _wwn(_read(os.path.join(fc_dir, "node_name")))
            h.wwpn = _wwn(_read(os.path.join(fc_dir, "port_name")))
            h.fabric_wwn = _wwn(_read(os.path.join(fc_dir, "fabric_name")))
            h.port_state = _read(os.path.join(fc_dir, "port_state")) or ""
            h.vport_capable = os.path.exists(os.path.join(fc_dir, "vport_create"))
        out.append(h)
    return sorted(out, key=lambda h: h.number)


@dataclass
class ScsiLun:
    host: int
    bus: int
    target: int
    lun: int
    type: int
    vendor: str = ""
    model: str = ""
    rev: str = ""
    block: str | None = None  # sdX
    size: int = 0
    wwid: str = ""
    state: str = ""

    @property
    def name(self) -> str:
        return f"unit:{self.bus}:{self.target}:{self.lun}"


def luns(host_number: int, root: str = "/") -> list[ScsiLun]:
    """The LUNs of SCSI host ``host_number`` (all device types)."""
    base = _sys(root, "bus", "scsi", "devices")
    out: list[ScsiLun] = []
    for name in entries(base):
        m = re.match(r"^(\d+):(\d+):(\d+):(\d+)$", name)
        if not m or int(m.group(1)) != host_number:
            continue
        d = os.path.join(base, name)
        t = _read(os.path.join(d, "type"))
        lun = ScsiLun(host=host_number, bus=int(m.group(2)), target=int(m.group(3)),
                      lun=int(m.group(4)), type=int(t) if t and t.isdigit() else -1,
                      vendor=_read(os.path.join(d, "vendor")) or "",
                      model=_read(os.path.join(d, "model")) or "",
                      rev=_read(os.path.join(d, "rev")) or "",
                      wwid=_read(os.path.join(d, "wwid")) or "",
                      state=_read(os.path.join(d, "state")) or "")
        try:
            blocks = os.listdir(os.path.join(d, "block"))
        except OSError:
            blocks = []
        if blocks:
            lun.block = sorted(blocks)[0]
            size = _read(os.path.join(d, "block", lun.block, "size"))
            lun.size = int(size) * 512 if size and size.isdigit() else 0
        out.append(lun)
    return sorted(out, key=lambda x: (x.bus, x.target, x.lun))


# -- multipath (device-mapper) ---------------------------------------------------------------
def device_mapper_present(root: str = "/") -> bool:
    return os.path.exists(_sys(root, "class", "misc", "device-mapper"))


@dataclass
class MultipathMap:
    dm: str  # dm-N
    name: str  # the map's name, /dev/mapper/NAME
    uuid: str
    size: int
    slaves: list[str] = field(default_factory=list)


def multipath_maps(root: str = "/") -> list[MultipathMap]:
    """Device-mapper devices whose DM UUID marks them as multipath maps (``mpath-``)."""
    base = _sys(root, "block")
    out: list[MultipathMap] = []
    for name in entries(base):
        if not name.startswith("dm-"):
            continue
        uuid = _read(os.path.join(base, name, "dm", "uuid")) or ""
        if not uuid.startswith("mpath-"):
            continue
        size = _read(os.path.join(base, name, "size"))
        slaves = sorted(entries(os.path.join(base, name, "slaves")))
        out.append(MultipathMap(dm=name, name=_read(os.path.join(base, name, "dm", "name"))
                                or name, uuid=uuid,
                                size=int(size) * 512 if size and size.isdigit() else 0,
                                slaves=slaves))
    return sorted(out, key=lambda m: int(m.dm[3:]) if m.dm[3:].isdigit() else 0)
