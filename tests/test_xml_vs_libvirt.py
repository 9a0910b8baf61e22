"""pool-dumpxml and vol-dumpxml side by side with libvirt's, on the same storage.

Each comparison starts a libvirtd of its own (see Libvirt.run) and stops it again;
without libvirt, or without the storage backend a pool type needs, the test skips and
says what is missing. Each pool type is run by virtstore, then by libvirt, on the same
storage, with the same volumes; the documents must be the same except for what must
differ: the pool's UUID (each side makes its own) and the values of the timestamps
(reading a file moves its atime). Element order is not normalized. Where libvirt is
wrong, the test corrects libvirt's document and says why (iscsi-direct).
"""

from __future__ import annotations

import base64
import contextlib
import difflib
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from block_fixtures import BlockLab, lab_fixture, sh  # noqa: F401
from net_fixtures import (  # noqa: F401
    ISCSI_STORAGE,
    Server,
    ceph_cmd,
    ceph_fixture,
    gluster_fixture,
    iscsi_fixture,
)
from virtstore.api import VolumeCreateArgs
from virtstore.api.embedded import EmbeddedConnection
from virtstore.backends.fs import kernel_filesystems
from virtstore.backends.gluster import GlusterBackend
from virtstore.errors import NoSuchVolume


@dataclass
class Libvirt:
    """A libvirtd of this test's own: started when asked, on the storage as it is then."""
    tmp: Path
    lv: Any

    @contextlib.contextmanager
    def run(self) -> Iterator[Any]:
        """libvirtd in a mount namespace of its own, where its configuration, state and
        sockets are private directories: it defines nothing on the host, loads every
        storage backend installed now, and no libvirtd of another run is touched. The
        namespace is a copy of the mounts taken when it starts (they are private here),
        so it starts after the storage is mounted; what libvirt mounts stays inside."""
        home = Path(tempfile.mkdtemp(prefix="libvirtd-", dir=self.tmp))
        binds = {"run": "/run/libvirt", "etc": "/etc/libvirt", "lib": "/var/lib/libvirt",
                 "cache": "/var/cache/libvirt", "log": "/var/log/libvirt"}
        script = []
        for sub, where in binds.items():
            (home / sub).mkdir()
            script.append(f"mkdir -p {where} && mount --bind {home / sub} {where}")
        script.append(f"exec libvirtd -p {home / 'libvirtd.pid'}")
        with open(home / "libvirtd.log", "wb") as log:
            proc = subprocess.Popen(
                ["setpriv", "--pdeathsig", "KILL", "--", "unshare", "--mount",
                 "--propagation", "private", "sh", "-ec", " && ".join(script)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        conn = None
        try:
            uri = f"qemu:///system?socket={home / 'run' / 'libvirt-sock'}"
            deadline = time.monotonic() + 30
            while conn is None:
                try:
                    conn = self.lv.open(uri)
                except self.lv.libvirtError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("libvirtd did not start: "
                                           + (home / "libvirtd.log").read_text()) from None
                    time.sleep(0.2)
            yield conn
        finally:
            if conn is not None:
                conn.close()
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def libvirt(tmp_path: Path) -> Libvirt:
    """What starts libvirtd; skips with what is missing to run it."""
    lv = pytest.importorskip("libvirt", reason="python3-libvirt is not installed")
    lv.registerErrorHandler(lambda _ctx, _err: None, None)
    missing = [t for t in ("libvirtd", "unshare", "setpriv") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed")
    if os.geteuid() != 0:
        pytest.skip("libvirtd's storage driver needs root")
    return Libvirt(tmp_path, lv)


def require_backend(conn: Any, pool_type: str, package: str) -> None:
    caps = conn.getStoragePoolCapabilities(0)
    if f"<pool type='{pool_type}' supported='yes'>" not in caps:
        pytest.skip(f"libvirt has no {pool_type} storage backend ({package} is not "
                    "installed)")


@pytest.fixture
def ceph(ceph_fixture: Server) -> Server:  # noqa: F811
    return ceph_fixture


@pytest.fixture
def tgt(iscsi_fixture: Server) -> Server:  # noqa: F811
    return iscsi_fixture


@pytest.fixture
def gl(gluster_fixture: Server) -> Server:  # noqa: F811
    return gluster_fixture


def normalize(xml: str) -> str:
    """Only what must differ: the UUID, and the timestamps' values."""
    xml = re.sub(r"<uuid>[^<]*</uuid>", "<uuid/>", xml)
    xml = re.sub(r"<([amcb]time)>[^<]*</\1>", r"<\1/>", xml)
    return xml if xml.endswith("\n") else xml + "\n"


def _fill(ours: EmbeddedConnection, pool: str) -> list[str]:
    ours.volume_create(pool, VolumeCreateArgs("base.qcow2", 64 << 20, format="qcow2"))
    ours.volume_create(pool, VolumeCreateArgs("top.qcow2", 128 << 20, format="qcow2",
                                              backing_vol="base.qcow2",
                                              backing_vol_format="qcow2"))
    ours.volume_create(pool, VolumeCreateArgs("disk.raw", 8 << 20, format="raw"))
    return ["base.qcow2", "disk.raw", "top.qcow2"]


Fill = Callable[[EmbeddedConnection, str], list[str]]


def _side_by_side(ours: EmbeddedConnection, libvirt: Libvirt, pool_xml: str, name: str,
                  fill: Fill = _fill, *, backend: tuple[str, str] | None = None,
                  secrets: Sequence[tuple[str, bytes]] = (),
                  fix_theirs: Callable[[str, str], str] | None = None) -> None:
    """The pool run by virtstore (``fill`` makes its volumes and names those to compare),
    then by libvirt on the same storage: the running pool, its --inactive document, each
    volume, and the stopped pool. ``backend`` is (pool type, Debian package) when
    libvirt needs a driver that may be missing; ``secrets`` (XML, value) are defined on
    both sides before the pool. ``fix_theirs(key, xml)`` corrects where libvirt is wrong."""
    for xml, value in secrets:
        ours.secret_set_value(ours.secret_define_xml(xml), value)
    ours.pool_define_xml(pool_xml)
    ours.pool_start(name)
    vols = fill(ours, name)
    ours.pool_refresh(name)
    mine = {"pool": ours.pool_xml(name), "pool-inactive": ours.pool_xml(name, inactive=True)}
    for vol in vols:
        mine[vol] = ours.volume_xml(name, vol)
    ours.pool_stop(name)
    mine["stopped"] = ours.pool_xml(name, inactive=True)

    with libvirt.run() as conn:
        if backend is not None:
            require_backend(conn, *backend)
        for xml, value in secrets:
            conn.secretDefineXML(xml, 0).setValue(value, 0)
        lv = conn.storagePoolDefineXML(pool_xml, 0)
        try:
            lv.create(0)
            lv.refresh(0)
            theirs = {"pool": lv.XMLDesc(0), "pool-inactive": lv.XMLDesc(1)}
            for vol in vols:
                theirs[vol] = lv.storageVolLookupByName(vol).XMLDesc(0)
            lv.destroy()
            theirs["stopped"] = lv.XMLDesc(1)
            if fix_theirs is not None:
                theirs = {key: fix_theirs(key, xml) for key, xml in theirs.items()}
        finally:
            if lv.isActive():
                lv.destroy()
            lv.undefine()
    diffs = ["".join(difflib.unified_diff(normalize(theirs[key]).splitlines(True),
                                          normalize(mine[key]).splitlines(True),
                                          f"libvirt {key}", f"virtstore {key}"))
             for key in mine]
    assert not "".join(diffs), "".join(diffs)


def test_dir_pool_as_libvirt(libvirt: Libvirt, lab: BlockLab, root: Path) -> None:
    # On a filesystem of its own, so that its sizes hold still between the two runs.
    mnt = lab.tmp / "mnt"
    mnt.mkdir()
    dev = lab.loop(128 << 20)
    sh("mkfs.ext4", "-q", dev)
    sh("mount", dev, str(mnt))
    target = mnt / "images"
    target.mkdir(mode=0o750)
    xml = f"<pool type='dir'><name>vsdir</name><target><path>{target}</path></target></pool>"
    with EmbeddedConnection(str(root)) as ours:
        _side_by_side(ours, libvirt, xml, "vsdir")


def test_fs_pool_on_a_loop_device_as_libvirt(libvirt: Libvirt, lab: BlockLab,
                                            root: Path) -> None:
    dev = lab.loop(128 << 20)
    sh("mkfs.ext4", "-q", dev)
    target = lab.tmp / "fs"
    target.mkdir()
    xml = (f"<pool type='fs'><name>vsfs</name><source><device path='{dev}'/>"
           f"<format type='ext4'/></source><target><path>{target}</path></target></pool>")
    with EmbeddedConnection(str(root)) as ours:
        _side_by_side(ours, libvirt, xml, "vsfs")


def _ceph_usage(ceph: Server) -> tuple[int, int, int] | None:
    df = json.loads(ceph_cmd(ceph, "ceph", "df", "--format", "json").stdout)
    rbd = [p["stats"]["stored"] for p in df["pools"] if p["name"] == "rbd"]
    if not rbd or not df["stats"]["total_bytes"]:
        return None  # no statistics yet
    return df["stats"]["total_bytes"], df["stats"]["total_avail_bytes"], rbd[0]


def _settled(ceph: Server) -> None:
    """Until the manager's statistics show the cluster as it is: they trail writes by
    a few seconds, and both sides must read the same sizes."""
    last = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        now = _ceph_usage(ceph)
        if now is not None and now == last:
            return
        last = now
        time.sleep(6)
    raise AssertionError(f"the Ceph cluster's usage did not settle: {last}")


def _fill_rbd(ceph: Server) -> Fill:
    def fill(ours: EmbeddedConnection, pool: str) -> list[str]:
        ours.volume_create(pool, VolumeCreateArgs("base", 16 << 20))
        ours.volume_create(pool, VolumeCreateArgs("disk", 10 << 20))  # not whole objects
        job = ours.volume_clone(pool, "base", "linked", linked=True)
        assert ours.job_wait(job.id, 120).state == "done"
        _settled(ceph)
        return ["base", "disk", "linked"]
    return fill


def test_rbd_pool_as_libvirt(libvirt: Libvirt, ceph: Server, root: Path) -> None:
    usage = "client.admin xmlcmp"
    secret = (f"<secret ephemeral='no' private='yes'><uuid>{uuid.uuid4()}</uuid>"
              f"<usage type='ceph'><name>{usage}</name></usage></secret>")
    xml = (f"<pool type='rbd'><name>vsrbd</name><source><name>rbd</name>"
           f"<host name='127.0.0.1' port='{ceph.info['mon_port']}'/>"
           f"<auth username='admin' type='ceph'><secret usage='{usage}'/></auth>"
           "</source></pool>")
    with EmbeddedConnection(str(root)) as ours:
        try:
            _side_by_side(ours, libvirt, xml, "vsrbd", _fill_rbd(ceph),
                          backend=("rbd", "libvirt-daemon-driver-storage-rbd"),
                          secrets=[(secret, base64.b64decode(ceph.info["admin_key"]))])
        finally:
            # the Ceph pool is the session's: leave it as it was
            if ours.pool_info("vsrbd").state != "running":
                ours.pool_start("vsrbd")
            for vol in ("linked", "disk", "base"):
                with contextlib.suppress(NoSuchVolume):
                    ours.volume_delete("vsrbd", vol)


def test_iscsi_direct_pool_as_libvirt(libvirt: Libvirt, tgt: Server, root: Path) -> None:
    xml = (f"<pool type='iscsi-direct'><name>vsiscsi</name><source>"
           f"<host name='127.0.0.1' port='{tgt.info['port']}'/>"
           f"<device path='{ISCSI_STORAGE}'/>"
           "<initiator><iqn name='iqn.2024-01.test.local:xmlcmp'/></initiator>"
           "</source></pool>")

    def luns(ours: EmbeddedConnection, pool: str) -> list[str]:
        return sorted(v.name for v in ours.list_volumes(pool))

    def whole_luns(key: str, xml: str) -> str:
        # libvirt 9.0 takes READ CAPACITY(16)'s last LBA for the number of blocks, so
        # each LUN is one block (512 bytes here) short of its size, and the pool two.
        short = 512 if key.startswith("unit:") else 2 * 512
        return re.sub(r"(<(capacity|allocation) unit='bytes'>)(\d+)<",
                      lambda m: f"{m[1]}{int(m[3]) + short}<", xml)

    with EmbeddedConnection(str(root)) as ours:
        _side_by_side(ours, libvirt, xml, "vsiscsi", luns,
                      backend=("iscsi-direct", "libvirt-daemon-driver-storage-iscsi-direct"),
                      fix_theirs=whole_luns)


@pytest.mark.parametrize("mode", ["fuse", "gfapi"])
def test_gluster_pool_as_libvirt(libvirt: Libvirt, gl: Server, lab: BlockLab, root: Path,
                                 mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if mode == "fuse" and "fuse" not in kernel_filesystems():
        pytest.skip("this kernel has no FUSE: gluster volumes cannot be mounted")
    monkeypatch.setattr(GlusterBackend, "mode", mode)
    # A volume of its own, on a filesystem of its own, so that its sizes hold still
    # between the two runs (the session's volume shares the host's root filesystem).
    mnt = lab.tmp / "brickfs"
    mnt.mkdir()
    dev = lab.loop(128 << 20)
    sh("mkfs.ext4", "-q", dev)
    sh("mount", dev, str(mnt))
    vol = "vscmp" + uuid.uuid4().hex[:6]
    gluster = ("gluster", "--mode=script", "volume")
    sh(*gluster, "create", vol, f"{socket.gethostname()}:{mnt / 'brick'}", "force")
    try:
        sh(*gluster, "start", vol)
        xml = (f"<pool type='gluster'><name>vsgluster</name><source><name>{vol}</name>"
               f"<host name='{gl.info['host']}'/></source></pool>")
        with EmbeddedConnection(str(root)) as ours:
            _side_by_side(ours, libvirt, xml, "vsgluster",
                          backend=("gluster", "libvirt-daemon-driver-storage-gluster"))
    finally:
        sh(*gluster, "stop", vol, "force", check=False)
        sh(*gluster, "delete", vol, check=False)
