"""The iscsi pool: a target logged in with the kernel initiator (open-iscsi's iscsiadm);
volumes are the block devices of its LUNs.

As libvirt's: start discovers the portal (sendtargets), sets CHAP on the node record
when the pool has ``<auth type='chap'>``, logs in (and, with an initiator IQN, uses an
iface of that name); refresh rescans the session, waits for udev to settle, and lists
its disks as volumes ``unit:0:0:N``, each at its link in the pool's target directory
as libvirt finds it (``/dev/disk/by-path/ip-HOST:PORT-iscsi-IQN-lun-N`` for the usual
``/dev/disk/by-path``), or at ``/dev/sdX`` for a target of ``/dev`` or when no udevd
made the link; stop logs out. A LUN's bytes are uploaded, downloaded and wiped in place on its
disk, as libvirt's iscsi backend does. A kernel without the iSCSI TCP transport makes
start fail with an error naming it; ``iscsi-direct`` pools need no kernel support.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

from virtstore.backends import _iscsi_utils as iu
from virtstore.backends._block_data import BlockDataOps
from virtstore.backends.base import BackendCaps, PoolSizes, ScanResult, Stamp, VolumeRecord
from virtstore.errors import AuthFailed, CommandFailed, OperationInvalid, Unsupported
from virtstore.host import devices, iscsi
from virtstore.host.runner import run, which
from virtstore.xml import PoolDef


def _iscsiadm(args: list[str], *, check: bool = True, secret: str | None = None) -> str:
    try:
        return run(["iscsiadm", *args], timeout=120, check=check).stdout
    except CommandFailed as exc:
        text = str(exc)
        if secret:
            text = text.replace(secret, "***")
        # 24 is iscsiadm's ISCSI_ERR_LOGIN_AUTH_FAILED.
        if "authorization failure" in text.lower() or exc.returncode == 24:
            raise AuthFailed(f"iSCSI login failed: authentication failure ({text})") from exc
        raise CommandFailed(text) from exc


def _size(dev: str) -> int:
    try:
        with open(f"/sys/class/block/{dev}/size", encoding="ascii") as fh:
            return int(fh.read().strip()) * 512
    except (OSError, ValueError):
        return 0


class IscsiBackend(BlockDataOps):
    caps = BackendCaps(pool_type="iscsi", vol_formats=("raw",), default_vol_format="raw",
                       shared=True, file_based=False, volume_type="block")

    def host_problem(self) -> str | None:
        if which("iscsiadm") is None:
            return "iscsi pools need 'iscsiadm' (Debian open-iscsi), which is not installed"
        return iscsi.kernel_transport_problem()

    def _node(self, pool: PoolDef) -> list[str]:
        return ["-m", "node", "-T", iu.target(pool), "-p", str(iu.portal(pool))]

    def start(self, pool: PoolDef) -> None:
        problem = iscsi.kernel_transport_problem()
        if problem:
            raise Unsupported(problem)
        portal = str(iu.portal(pool))
        found = iscsi.parse_sendtargets(_iscsiadm(["-m", "discovery", "-t", "sendtargets",
                                                   "-p", portal]))
        if not any(t.iqn == iu.target(pool) for t in found):
            raise OperationInvalid(f"target '{iu.target(pool)}' was not found on portal "
                                   f"{portal}")
        creds = iu.credentials(pool, self.secrets())
        secret = None
        if creds is not None:
            secret = creds.password.decode("utf-8", "surrogateescape")
            for name, value in (("node.session.auth.authmethod", "CHAP"),
                                ("node.session.auth.username", creds.username),
                                ("node.session.auth.password", secret)):
                _iscsiadm([*self._node(pool), "-o", "update", "-n", name, "-v", value],
                          secret=secret)
        if self._session(pool) is None:
            _iscsiadm([*self._node(pool), "--login"], secret=secret)

    def _session(self, pool: PoolDef) -> iscsi.Session | None:
        out = _iscsiadm(["-m", "session"], check=False)
        for s in iscsi.parse_sessions(out):
            if s.iqn == iu.target(pool):
                return s
        return None

    def stop(self, pool: PoolDef) -> None:
        if iscsi.kernel_transport_problem() is None and self._session(pool) is not None:
            _iscsiadm([*self._node(pool), "--logout"])

    def _disks(self, pool: PoolDef) -> dict[int, str]:
        s = self._session(pool)
        if s is None:
            return {}
        _iscsiadm(["-m", "session", "-r", str(s.id), "--rescan"], check=False)
        iscsi.wait_for_disks(s.id)
        devices.udev_settle()
        detail = iscsi.parse_session_disks(_iscsiadm(["-m", "session", "-r", str(s.id), "-P",
                                                      "3"]))
        found = detail.get(iu.target(pool))
        return dict(found.disks) if found is not None else {}

    def _record(self, pool: PoolDef, lun: int, dev: str) -> VolumeRecord:
        target = pool.target.path
        path = None
        if target and target.rstrip("/") != "/dev":
            path = devices.stable_link(target, dev)
        path = path or f"/dev/{dev}"
        size = _size(dev)
        # The path is part of the stamp: a link udev makes later is taken up by refresh.
        return VolumeRecord(name=f"{iu.VOL_NAME_PREFIX}{lun}", path=path,
                            key=iu.volume_path(pool, lun), type="block", format="raw",
                            capacity=size, allocation=size, physical=size,
                            ino=zlib.crc32(f"{dev} {path}".encode()), size=size)

    def sizes(self, pool: PoolDef) -> PoolSizes:
        total = sum(_size(dev) for dev in self._disks(pool).values())
        return PoolSizes(capacity=total, allocation=total, available=0)

    def scan(self, pool: PoolDef, known: Mapping[str, Stamp]) -> ScanResult:
        res = ScanResult()
        for lun, dev in sorted(self._disks(pool).items()):
            rec = self._record(pool, lun, dev)
            res.add(rec, known)
        return res

    def read_volume(self, pool: PoolDef, name: str) -> VolumeRecord | None:
        lun = iu.lun_of(name)
        dev = self._disks(pool).get(lun)
        return None if dev is None else self._record(pool, lun, dev)

    def volume_path(self, pool: PoolDef, name: str) -> str:
        return f"/dev/disk/by-path/{iu.volume_path(pool, iu.lun_of(name))}"
