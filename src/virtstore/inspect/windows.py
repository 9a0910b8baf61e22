"""What a Windows guest's registry says about it: product name, version, build, edition
and hostname, read from the SOFTWARE and SYSTEM hives with hivex (Debian's
python3-hivex, libguestfs's own registry reader). hivex opens a file, so each hive is
copied (capped) into a private temporary file first; it runs in the worker like every
other reader of guest data."""

from __future__ import annotations

import struct
import tempfile
from typing import Any

from virtstore.inspect.files import FsReader
from virtstore.inspect.source import GuestDataError

CONFIG = "/Windows/System32/config"
HIVES = ("SOFTWARE", "SYSTEM", "SAM", "SECURITY", "DEFAULT")
HIVE_LIMIT = 512 << 20  # the largest SOFTWARE hives are a few hundred MiB
REG_SZ, REG_EXPAND_SZ, REG_DWORD = 1, 2, 4


class Hive:
    def __init__(self, fs: FsReader, name: str) -> None:
        try:
            import hivex  # type: ignore[import-untyped, import-not-found, unused-ignore]
        except ImportError:
            raise GuestDataError("reading the Windows registry needs hivex (Debian's "
                                 "python3-hivex)") from None
        data = fs.read_file(f"{CONFIG}/{name}", limit=HIVE_LIMIT)
        with tempfile.NamedTemporaryFile(prefix="hive-") as tmp:
            tmp.write(data)
            tmp.flush()
            try:
                self.h = hivex.Hivex(tmp.name)
            except Exception as exc:  # hivex's own error for a malformed hive
                raise GuestDataError(f"the {name} hive is unreadable: {exc}") from None

    def values(self, *path: str) -> dict[str, Any]:
        """The values of the key at ``path`` (names compared case-insensitively, as
        Windows does), decoded: strings and DWORDs; {} when the key is absent."""
        try:
            node = self.h.root()
            for name in path:
                node = self.h.node_get_child(node, name)
                if node is None:
                    return {}
            out: dict[str, Any] = {}
            for v in self.h.node_values(node):
                kind, raw = self.h.value_value(v)
                if kind in (REG_SZ, REG_EXPAND_SZ):
                    out[self.h.value_key(v)] = raw.decode("utf-16-le", "replace") \
                        .split("\0", 1)[0]
                elif kind == REG_DWORD and len(raw) == 4:
                    out[self.h.value_key(v)] = struct.unpack("<I", raw)[0]
            return out
        except Exception as exc:  # hivex's own error for a malformed hive
            raise GuestDataError(f"registry key {'/'.join(path)}: {exc}") from None


def windows_info(fs: FsReader) -> dict[str, Any]:
    """virt-inspector's Windows fields that the registry gives."""
    info: dict[str, Any] = {"type": "windows", "distro": "windows",
                            "systemroot": "/Windows"}
    try:
        present = {n.upper() for n in fs.listdir(CONFIG)}
    except (FileNotFoundError, GuestDataError):
        present = set()
    info["hives"] = [h for h in HIVES if h in present]
    notes = []
    try:
        cur = Hive(fs, "SOFTWARE").values("Microsoft", "Windows NT", "CurrentVersion")
        info["name"] = cur.get("ProductName")
        major, minor = cur.get("CurrentMajorVersionNumber"), \
            cur.get("CurrentMinorVersionNumber")
        info["version"] = f"{major}.{minor}" if isinstance(major, int) and \
            isinstance(minor, int) else cur.get("CurrentVersion")
        info["build"] = cur.get("CurrentBuildNumber")
        info["edition"] = cur.get("EditionID")
        info["variant"] = cur.get("InstallationType")
    except (FileNotFoundError, GuestDataError) as exc:
        notes.append(f"SOFTWARE: {exc}")
    try:
        system = Hive(fs, "SYSTEM")
        current = system.values("Select").get("Current", 1)
        control = f"ControlSet{current:03d}" if isinstance(current, int) else "ControlSet001"
        name = system.values(control, "Services", "Tcpip", "Parameters").get("Hostname") or \
            system.values(control, "Control", "ComputerName", "ComputerName").get(
                "ComputerName")
        if name:
            info["hostname"] = name
    except (FileNotFoundError, GuestDataError) as exc:
        notes.append(f"SYSTEM: {exc}")
    if notes:
        info["notes"] = notes
    return info


