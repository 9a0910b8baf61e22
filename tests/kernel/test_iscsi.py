"""iscsi pools through the kernel initiator (open-iscsi's iscsid and iscsi_tcp) against
tgtd on 127.0.0.1 inside the VM: start logs in and the LUNs become the pool's block
device volumes, CHAP from a secret, stop logs out; with udevd running, as on a host,
the volumes are the LUNs' links in the pool's target directory (/dev/disk/by-path)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import running_udevd
from net_fixtures import ISCSI_CHAP, ISCSI_SECURE, ISCSI_STORAGE, Server, iscsi_fixture  # noqa: F401
from virtstore.api.embedded import EmbeddedConnection
from virtstore.cli.main import main
from virtstore.errors import AuthFailed

MiB = 1 << 20


@pytest.fixture(scope="module")
def iscsid() -> Iterator[None]:
    """The initiator daemon iscsiadm talks to (no init system runs in the VM)."""
    if not os.path.exists("/sbin/iscsid"):
        pytest.skip("iscsid is not installed (Debian open-iscsi)")
    subprocess.run(["modprobe", "iscsi_tcp"], check=True)
    # A session of its own: iscsid's shutdown signals its whole process group, which
    # would otherwise be pytest's and the VM's init script's.
    proc = subprocess.Popen(["/sbin/iscsid", "-f"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    time.sleep(1)
    yield
    proc.terminate()
    proc.wait(30)


@pytest.fixture
def udevd() -> Iterator[None]:
    """udevd for one test: no /dev/disk/by-* links exist without it."""
    with running_udevd():
        yield


def iscsi_xml(name: str, srv: Server, target: str, auth: str = "",
              path: str = "/dev/disk/by-path") -> str:
    return (f"<pool type='iscsi'><name>{name}</name><source>"
            f"<host name='127.0.0.1' port='{srv.info['port']}'/>"
            f"<device path='{target}'/>{auth}</source>"
            f"<target><path>{path}</path></target></pool>")


def sessions() -> str:
    return subprocess.run(["iscsiadm", "-m", "session"], capture_output=True,
                          text=True).stdout


def test_login_luns_as_volumes_logout(iscsid: None, iscsi_fixture: Server,  # noqa: F811
                                      conn: EmbeddedConnection) -> None:
    srv = iscsi_fixture
    conn.pool_define_xml(iscsi_xml("k", srv, ISCSI_STORAGE))
    conn.pool_start("k")
    try:
        assert ISCSI_STORAGE in sessions()
        vols = {v.name: v for v in conn.list_volumes("k")}
        assert sorted(vols) == ["unit:0:0:1", "unit:0:0:2"]
        assert (vols["unit:0:0:1"].capacity, vols["unit:0:0:2"].capacity) == (64 * MiB,
                                                                              128 * MiB)
        # The volume's path is the LUN's disk: bytes written there reach the target.
        payload = os.urandom(MiB)
        fd = os.open(vols["unit:0:0:1"].path, os.O_WRONLY | os.O_DIRECT | os.O_SYNC)
        try:
            buf = memoryview(bytearray(MiB))  # O_DIRECT wants an aligned buffer
            buf[:] = payload
            os.pwrite(fd, buf, 2 * MiB)
        finally:
            os.close(fd)
        with open(srv.info["luns"][0], "rb") as fh:
            fh.seek(2 * MiB)
            assert fh.read(MiB) == payload
    finally:
        conn.pool_stop("k")
    assert ISCSI_STORAGE not in sessions()
    assert not os.path.exists(vols["unit:0:0:1"].path)


def test_chap_login(iscsid: None, iscsi_fixture: Server,  # noqa: F811
                    conn: EmbeddedConnection) -> None:
    srv = iscsi_fixture
    auth = (f"<auth type='chap' username='{ISCSI_CHAP[0]}'><secret usage='{{}}'/>"
            "</auth>")
    for usage, value in (("good", ISCSI_CHAP[1]), ("bad", "not-the-secret")):
        uuid = conn.secret_define_xml(f"<secret ephemeral='no' private='yes'><usage "
                                      f"type='iscsi'><target>{usage}</target></usage>"
                                      "</secret>")
        conn.secret_set_value(uuid, value.encode())
    conn.pool_define_xml(iscsi_xml("wrong", srv, ISCSI_SECURE, auth.format("bad")))
    with pytest.raises(AuthFailed, match="authentication failure"):
        conn.pool_start("wrong")
    assert conn.pool_info("wrong").state == "inactive"
    assert ISCSI_SECURE not in sessions()
    conn.pool_define_xml(iscsi_xml("right", srv, ISCSI_SECURE, auth.format("good")))
    conn.pool_start("right")
    try:
        assert [(v.name, v.capacity) for v in conn.list_volumes("right")] == \
            [("unit:0:0:1", 32 * MiB)]
    finally:
        conn.pool_stop("right")
    assert ISCSI_SECURE not in sessions()


def test_luns_by_path_with_udev(udevd: None, iscsid: None, iscsi_fixture: Server,  # noqa: F811
                                tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    srv = iscsi_fixture
    root = str(tmp_path / "state")

    def cli(*args: str) -> str:
        # In process: a command's start-up costs seconds under the VM's emulated CPU.
        code = main(["--root", root, *args])
        out = capsys.readouterr()
        assert code == 0, out.err
        return out.out

    (tmp_path / "bp.xml").write_text(iscsi_xml("bp", srv, ISCSI_STORAGE))
    (tmp_path / "dev.xml").write_text(iscsi_xml("dev", srv, ISCSI_STORAGE, path="/dev"))
    cli("pool-define", str(tmp_path / "bp.xml"))
    cli("pool-define", str(tmp_path / "dev.xml"))
    # libvirt's path of a LUN: the udev link in the pool's target directory.
    by_path = {n: f"/dev/disk/by-path/ip-127.0.0.1:{srv.info['port']}-iscsi-"
                  f"{ISCSI_STORAGE}-lun-{n}" for n in (1, 2)}
    cli("pool-start", "bp")
    try:
        listed = cli("vol-list", "bp").split("\n")[2:]
        assert [line.split() for line in listed if line.strip()] == [
            ["unit:0:0:1", by_path[1]], ["unit:0:0:2", by_path[2]]]
        assert cli("vol-path", "--pool", "bp", "unit:0:0:2").strip() == by_path[2]
        disk = os.path.realpath(by_path[2])
        assert disk.startswith("/dev/sd")
        # Bytes uploaded through the volume reach the target's LUN and read back.
        payload = os.urandom(MiB) + bytes(MiB) + os.urandom(4096)
        (tmp_path / "up.bin").write_bytes(payload)
        cli("vol-upload", "--pool", "bp", "unit:0:0:2", str(tmp_path / "up.bin"),
            "--offset", str(4 * MiB))
        with open(srv.info["luns"][1], "rb") as fh:
            fh.seek(4 * MiB)
            assert fh.read(len(payload)) == payload
        cli("vol-download", "--pool", "bp", "unit:0:0:2", str(tmp_path / "down.bin"),
            "--offset", str(4 * MiB), "--length", str(len(payload)))
        assert (tmp_path / "down.bin").read_bytes() == payload
        # A pool whose target is /dev names the disks themselves, as libvirt does.
        cli("pool-start", "dev")
        assert cli("vol-path", "--pool", "dev", "unit:0:0:2").strip() == disk
    finally:
        # Both pools use one session: the first stop logs out, the second finds none.
        for name in ("dev", "bp"):
            main(["--root", root, "pool-destroy", name])
    assert ISCSI_STORAGE not in sessions()
    subprocess.run(["udevadm", "settle", "--timeout=30"], check=True)
    assert not os.path.lexists(by_path[1]) and not os.path.lexists(by_path[2])
