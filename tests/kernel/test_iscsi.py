"""iscsi pools through the kernel initiator (open-iscsi's iscsid and iscsi_tcp) against
tgtd on 127.0.0.1 inside the VM: start logs in and the LUNs become the pool's block
device volumes, CHAP from a secret, stop logs out."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator

import pytest

from net_fixtures import ISCSI_CHAP, ISCSI_SECURE, ISCSI_STORAGE, Server, iscsi_fixture  # noqa: F401
from virtstore.api.embedded import EmbeddedConnection
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


def iscsi_xml(name: str, srv: Server, target: str, auth: str = "") -> str:
    return (f"<pool type='iscsi'><name>{name}</name><source>"
            f"<host name='127.0.0.1' port='{srv.info['port']}'/>"
            f"<device path='{target}'/>{auth}</source>"
            "<target><path>/dev/disk/by-path</path></target></pool>")


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
