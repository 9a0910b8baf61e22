"""iSCSI from userspace (libiscsi) and from the kernel initiator (iscsiadm).

Userspace: the LUNs of one target, with their capacity and serial number, come from one
libiscsi session through ctypes (the ``iscsi-ls`` tool only discovers every target of a
portal and stops at the first one it cannot log in to, and the other tools log in once
per command); a LUN's whole inquiry data, when asked for, comes from the libiscsi
tools (``iscsi-inq``, ``iscsi-readcapacity16``, Debian libiscsi-bin) through the runner.
A CHAP password never appears on a command line: libiscsi reads it from
``LIBISCSI_CHAP_PASSWORD``.

Kernel: parsers of ``iscsiadm`` output (discovery, sessions, the disks of a session)
and the check for the kernel's iSCSI TCP transport.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from virtstore.errors import AuthFailed, CommandFailed, OperationInvalid
from virtstore.host.clib import CLibrary, ci, cp, vp
from virtstore.host.runner import run

ISCSI_SESSION_NORMAL = 2
DIRECT_ACCESS = 0  # SCSI peripheral device type of a disk
UNIT_ATTENTION_TRIES = 4


@dataclass(frozen=True)
class Portal:
    host: str
    port: int = 3260

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class Credentials:
    username: str
    password: bytes


@dataclass
class Lun:
    lun: int
    capacity: int = 0
    block_size: int = 512
    device_type: str = ""
    vendor: str = ""
    product: str = ""
    revision: str = ""
    serial: str = ""


def lun_url(portal: Portal, target: str, lun: int, creds: Credentials | None = None) -> str:
    user = f"{creds.username}@" if creds else ""
    return f"iscsi://{user}{portal}/{target}/{lun}"


def _env(creds: Credentials | None) -> dict[str, str]:
    if creds is None:
        return {}
    return {"LIBISCSI_CHAP_PASSWORD": creds.password.decode("utf-8", "surrogateescape")}


def _failure(exc: CommandFailed, what: str) -> Exception:
    text = f"{exc} {getattr(exc, 'stderr', '')}"
    if "Authentication failure" in text:
        return AuthFailed(f"iSCSI login failed for {what}: authentication failure "
                          "(wrong CHAP user or secret?)")
    return OperationInvalid(f"iSCSI {what}: {exc}")


# -- REPORT LUNS through libiscsi -------------------------------------------------------------
_library = CLibrary("iscsi", "libiscsi.so.7", (
    "iscsi-direct pools need libiscsi (Debian libiscsi7), which is not installed"), {
    "iscsi_create_context": (vp, [cp]),
    "iscsi_destroy_context": (None, [vp]),
    "iscsi_set_targetname": (None, [vp, cp]),
    "iscsi_set_session_type": (None, [vp, ci]),
    "iscsi_set_initiator_username_pwd": (None, [vp, cp, cp]),
    "iscsi_full_connect_sync": (None, [vp, cp, ci]),
    "iscsi_get_error": (cp, [vp]),
    "iscsi_reportluns_sync": (vp, [vp, ci, ci]),
    "scsi_datain_unmarshall": (vp, [vp]),
    "scsi_free_scsi_task": (None, [vp]),
    "scsi_task_get_status": (ci, [vp, vp]),
    "iscsi_inquiry_sync": (vp, [vp, ci, ci, ci, ci]),
    "iscsi_readcapacity16_sync": (vp, [vp, ci]),
    "iscsi_logout_sync": (None, [vp]),
}, use_errno=False)


@contextlib.contextmanager
def _session(portal: Portal, target: str, initiator: str,
             creds: Credentials | None) -> Iterator[tuple[ctypes.CDLL, int]]:
    """A logged-in libiscsi context on ``target``, logged out and freed after."""
    lib = _library()
    ctx = lib.iscsi_create_context(initiator.encode())
    if not ctx:
        raise CommandFailed("libiscsi: cannot create a context")
    try:
        lib.iscsi_set_targetname(ctx, target.encode())
        lib.iscsi_set_session_type(ctx, ISCSI_SESSION_NORMAL)
        if creds is not None:
            lib.iscsi_set_initiator_username_pwd(ctx, creds.username.encode(), creds.password)
        if lib.iscsi_full_connect_sync(ctx, str(portal).encode(), 0) != 0:
            why = (lib.iscsi_get_error(ctx) or b"").decode("utf-8", "replace")
            where = f"target '{target}' on {portal}"
            if "Authentication failure" in why:
                raise AuthFailed(f"iSCSI login failed for {where}: authentication failure "
                                 "(wrong CHAP user or secret?)")
            raise OperationInvalid(f"cannot log in to iSCSI {where}: {why}")
        try:
            yield lib, ctx
        finally:
            lib.iscsi_logout_sync(ctx)
    finally:
        lib.iscsi_destroy_context(ctx)


@contextlib.contextmanager
def _command(lib: ctypes.CDLL, ctx: int, task: int | None,
             what: str) -> Iterator[int | None]:
    """The unmarshalled data-in of a finished SCSI task (None if the command failed
    with a SCSI status); the task is freed after."""
    if not task:
        why = (lib.iscsi_get_error(ctx) or b"").decode("utf-8", "replace")
        raise OperationInvalid(f"{what} failed: {why}")
    try:
        if lib.scsi_task_get_status(task, None) != 0:
            yield None
        else:
            yield lib.scsi_datain_unmarshall(task) or None
    finally:
        lib.scsi_free_scsi_task(task)


def _report_luns(lib: ctypes.CDLL, ctx: int, target: str) -> list[int]:
    with _command(lib, ctx, lib.iscsi_reportluns_sync(ctx, 0, 16384),
                  f"REPORT LUNS on '{target}'") as data:
        if data is None:
            raise OperationInvalid(f"REPORT LUNS of '{target}' returned no list")
        # struct scsi_reportluns_list { uint32_t num; uint16_t luns[]; }
        num = ctypes.c_uint32.from_address(data).value
        return sorted(int(x) for x in (ctypes.c_uint16 * num).from_address(data + 4))


def report_luns(portal: Portal, target: str, initiator: str,
                creds: Credentials | None = None) -> list[int]:
    """The LUN numbers target ``target`` reports, sorted."""
    with _session(portal, target, initiator, creds) as (lib, ctx):
        return _report_luns(lib, ctx, target)


def scan_luns(portal: Portal, target: str, initiator: str,
              creds: Credentials | None = None, *, only: int | None = None) -> list[Lun]:
    """Every disk LUN of ``target`` (or LUN ``only``, if the target reports it) with its
    capacity, block size and serial number, in one session (the tools below log in once
    per command). Only the leading members of libiscsi's unmarshalled structs are read,
    whose layout is fixed by the SCSI fields they carry: the peripheral device type
    (the second enum of both inquiry structs), the unit serial number (a char* after
    three enums), and the last LBA and block length (uint64, uint32) of READ CAPACITY
    (16)."""
    out: list[Lun] = []
    with _session(portal, target, initiator, creds) as (lib, ctx):
        for n in _report_luns(lib, ctx, target):
            if only is not None and n != only:
                continue
            what = f"LUN {n} of '{target}'"
            with _command(lib, ctx, lib.iscsi_inquiry_sync(ctx, n, 0, 0, 255),
                          f"INQUIRY of {what}") as inq:
                if inq is None or ctypes.c_int.from_address(inq + 4).value != DIRECT_ACCESS:
                    continue
            lun = Lun(lun=n, device_type="DIRECT_ACCESS")
            with _command(lib, ctx, lib.iscsi_inquiry_sync(ctx, n, 1, 0x80, 255),
                          f"INQUIRY (unit serial number) of {what}") as vpd:
                if vpd is not None:
                    usn = ctypes.c_char_p.from_address(vpd + 16).value
                    lun.serial = (usn or b"").decode("ascii", "replace").strip()
            # The first media command of a new session meets a unit attention (the
            # target's "reset" notice): asked again, it answers.
            for _ in range(UNIT_ATTENTION_TRIES):
                with _command(lib, ctx, lib.iscsi_readcapacity16_sync(ctx, n),
                              f"READ CAPACITY of {what}") as cap:
                    if cap is not None:
                        last = ctypes.c_uint64.from_address(cap).value
                        lun.block_size = ctypes.c_uint32.from_address(cap + 8).value
                        lun.capacity = (last + 1) * lun.block_size
                        break
            else:
                raise OperationInvalid(f"READ CAPACITY of {what} failed")
            out.append(lun)
    return out


# -- per-LUN details through the libiscsi tools ----------------------------------------------
_FIELD = re.compile(r"^([A-Za-z][A-Za-z _/-]*?):(.*)$")


def parse_inquiry(text: str) -> dict[str, str]:
    """``iscsi-inq`` standard inquiry output: ``Field:value`` lines (the first of each)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        m = _FIELD.match(line)
        if m and m.group(1) not in out:
            out[m.group(1)] = m.group(2).strip()
    return out


def parse_serial(text: str) -> str:
    """``iscsi-inq -e 1 -c 0x80``: ``Unit Serial Number:[  beaf11]``."""
    m = re.search(r"Unit Serial Number:\[([^\]]*)\]", text)
    return m.group(1).strip() if m else ""


def parse_readcapacity16(text: str) -> tuple[int, int]:
    """(capacity in bytes, logical block size) from ``iscsi-readcapacity16`` output."""
    lba = re.search(r"RETURNED LOGICAL BLOCK ADDRESS:(\d+)", text)
    size = re.search(r"LOGICAL BLOCK LENGTH IN BYTES:(\d+)", text)
    if not lba or not size:
        raise CommandFailed(f"cannot parse iscsi-readcapacity16 output: {text[:200]!r}")
    return (int(lba.group(1)) + 1) * int(size.group(1)), int(size.group(1))


def lun_details(portal: Portal, target: str, lun: int, initiator: str,
                creds: Credentials | None = None) -> Lun:
    url = lun_url(portal, target, lun, creds)
    env = _env(creds)
    what = f"LUN {lun} of '{target}'"
    try:
        inq = parse_inquiry(run(["iscsi-inq", "-i", initiator, url], env=env,
                                timeout=60).stdout)
        out = Lun(lun=lun, device_type=inq.get("Peripheral Device Type", ""),
                  vendor=inq.get("Vendor", ""), product=inq.get("Product", ""),
                  revision=inq.get("Revision", ""))
        if out.device_type != "DIRECT_ACCESS":
            return out
        out.serial = parse_serial(run(["iscsi-inq", "-i", initiator, "-e", "1", "-c", "128",
                                       url], env=env, timeout=60, check=False).stdout)
        out.capacity, out.block_size = parse_readcapacity16(
            run(["iscsi-readcapacity16", "-i", initiator, url], env=env, timeout=60).stdout)
    except CommandFailed as exc:
        raise _failure(exc, what) from exc
    return out


# -- the kernel initiator (iscsiadm) ---------------------------------------------------------
def kernel_transport_problem() -> str | None:
    """Why the kernel initiator cannot work here, or None."""
    if os.path.isdir("/sys/class/iscsi_transport/tcp") or os.path.isdir("/sys/module/iscsi_tcp"):
        return None
    if os.path.exists("/proc/modules") and run(["modprobe", "-n", "-q", "iscsi_tcp"],
                                               check=False).returncode == 0:
        return None
    return ("this kernel has no iSCSI initiator: the 'tcp' iSCSI transport (iscsi_tcp "
            "module, /sys/class/iscsi_transport/tcp) is missing; use an 'iscsi-direct' "
            "pool, which needs no kernel support")


@dataclass(frozen=True)
class DiscoveredTarget:
    portal: str
    tpgt: int
    iqn: str


def parse_sendtargets(text: str) -> list[DiscoveredTarget]:
    """``iscsiadm -m discovery -t sendtargets -p HOST``: ``ip:port,tpgt iqn`` lines."""
    out = []
    for line in text.splitlines():
        m = re.match(r"^\s*(\S+):(\d+),(-?\d+)\s+(\S+)\s*$", line)
        if m:
            out.append(DiscoveredTarget(portal=f"{m.group(1)}:{m.group(2)}",
                                        tpgt=int(m.group(3)), iqn=m.group(4)))
    return out


@dataclass
class Session:
    id: int
    portal: str
    tpgt: int
    iqn: str
    disks: dict[int, str] = field(default_factory=dict)  # LUN -> block device name


def wait_for_disks(session_id: int, timeout: float = 30.0) -> None:
    """Wait until every disk LUN (SCSI type 0) of a kernel session has its block device:
    the kernel attaches a LUN's disk asynchronously, seconds after the login or rescan
    that found it."""
    import glob
    import time

    base = f"/sys/class/iscsi_session/session{session_id}/device"
    deadline = time.monotonic() + timeout
    while True:
        pending = []
        for dev in glob.glob(f"{base}/target*/*:*:*:*"):
            try:
                with open(os.path.join(dev, "type"), encoding="ascii") as fh:
                    kind = fh.read().strip()
            except OSError:
                continue
            if kind == "0" and not os.path.isdir(os.path.join(dev, "block")):
                pending.append(dev)
        if not pending or time.monotonic() > deadline:
            return
        time.sleep(0.2)


def parse_sessions(text: str) -> list[Session]:
    """``iscsiadm -m session``: ``tcp: [1] 10.0.0.1:3260,1 iqn... (non-flash)``."""
    out = []
    for line in text.splitlines():
        m = re.match(r"^\s*\w+:\s+\[(\d+)\]\s+(\S+?),(-?\d+)\s+(\S+)", line)
        if m:
            out.append(Session(id=int(m.group(1)), portal=m.group(2), tpgt=int(m.group(3)),
                               iqn=m.group(4)))
    return out


def parse_session_disks(text: str) -> dict[str, Session]:
    """``iscsiadm -m session -P 3``: the attached disk of each LUN, per target IQN."""
    out: dict[str, Session] = {}
    cur: Session | None = None
    lun: int | None = None
    for line in text.splitlines():
        s = line.strip()
        m = re.match(r"^Target:\s+(\S+)", s)
        if m:
            cur = Session(id=0, portal="", tpgt=0, iqn=m.group(1))
            out[cur.iqn] = cur
            continue
        if cur is None:
            continue
        m = re.match(r"^Current Portal:\s+(\S+?),(-?\d+)", s)
        if m:
            cur.portal, cur.tpgt = m.group(1), int(m.group(2))
        m = re.match(r"^SID:\s+(\d+)", s)
        if m:
            cur.id = int(m.group(1))
        m = re.match(r"^scsi\d+ Channel \d+ Id \d+ Lun: (\d+)", s)
        if m:
            lun = int(m.group(1))
        m = re.match(r"^Attached scsi disk (\S+)", s)
        if m and lun is not None:
            cur.disks[lun] = m.group(1)
            lun = None
    return out
