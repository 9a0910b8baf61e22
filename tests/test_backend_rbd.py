"""rbd pools end to end against a real one-node Ceph cluster on 127.0.0.1."""

from __future__ import annotations

import base64
import io
import json
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from contract_walk import walk
from net_fixtures import Server, ceph_cmd, ceph_fixture  # noqa: F401
from virtstore.api.embedded import EmbeddedConnection
from virtstore.errors import AuthFailed, Busy, InvalidArgument, NoSuchVolume, Unsupported

MiB = 1 << 20


def secret_xml(usage: str) -> str:
    return (f"<secret ephemeral='no' private='yes'><usage type='ceph'><name>{usage}</name>"
            "</usage></secret>")


def pool_xml(name: str, srv: Server, *, usage: str = "client.admin secret",
             source: str = "rbd", user: str = "admin", extra: str = "") -> str:
    return (f"<pool type='rbd'><name>{name}</name><source><name>{source}</name>"
            f"<host name='127.0.0.1' port='{srv.info['mon_port']}'/>"
            f"<auth username='{user}' type='ceph'><secret usage='{usage}'/></auth>"
            f"</source>{extra}</pool>")


@pytest.fixture
def ceph(ceph_fixture: Server) -> Server:  # noqa: F811
    return ceph_fixture


@pytest.fixture
def rconn(conn: EmbeddedConnection, ceph: Server) -> Iterator[EmbeddedConnection]:
    u = conn.secret_define_xml(secret_xml("client.admin secret"))
    conn.secret_set_value(u, base64.b64decode(ceph.info["admin_key"]))
    yield conn


@pytest.fixture
def rpool(rconn: EmbeddedConnection, ceph: Server) -> Iterator[str]:
    name = "ceph" + secrets.token_hex(3)
    rconn.pool_define_xml(pool_xml(name, ceph))
    rconn.pool_start(name)
    made: list[str] = []
    yield name
    for v in rconn.list_volumes(name):
        made.append(v.name)
    for v in made:
        try:
            rconn.volume_delete(name, v)
        except Exception:
            pass
    rconn.pool_stop(name)


def rbd_ls(ceph: Server) -> list[str]:
    return ceph_cmd(ceph, "rbd", "ls", "rbd").stdout.split()


def upload(conn: EmbeddedConnection, pool: str, vol: str, data: bytes, **kw: object) -> None:
    job = conn.volume_upload(pool, vol, io.BytesIO(data), **kw)  # type: ignore[arg-type]
    info = conn.job_wait(job.id, 60)
    assert info.state == "done", info.error


def download(conn: EmbeddedConnection, pool: str, vol: str, **kw: object) -> bytes:
    sink = io.BytesIO()
    job = conn.volume_download(pool, vol, sink, **kw)  # type: ignore[arg-type]
    info = conn.job_wait(job.id, 60)
    assert info.state == "done", info.error
    return sink.getvalue()


def wait_job(conn: EmbeddedConnection, job_id: str) -> None:
    info = conn.job_wait(job_id, 120)
    assert info.state == "done", info.error


def test_pool_start_info_and_capabilities(rconn: EmbeddedConnection, rpool: str) -> None:
    deadline = time.monotonic() + 30
    info = rconn.pool_info(rpool)
    while info.capacity == 0 and time.monotonic() < deadline:  # the manager's first stats
        time.sleep(0.5)
        info = rconn.pool_info(rpool)
    assert info.state == "running"
    assert info.capacity > 0 and info.available > 0
    assert info.shared is True
    caps = rconn.pool_capabilities_xml()
    assert "<pool type='rbd' supported='yes'>" in caps
    xml = rconn.pool_xml(rpool)
    assert "<capacity unit='bytes'>" in xml and "<name>rbd</name>" in xml


def test_volume_lifecycle_and_data(rconn: EmbeddedConnection, rpool: str,
                                   ceph: Server) -> None:
    rconn.volume_create_xml(rpool, "<volume><name>v1</name><capacity unit='M'>8</capacity>"
                                   "</volume>")
    vol = rconn.volume_info(rpool, "v1")
    assert vol.path == "rbd/v1" and vol.key == "rbd/v1" and vol.type == "network"
    assert vol.capacity == 8 * MiB and vol.format == "raw"
    assert "v1" in rbd_ls(ceph)
    assert not [n for n in rbd_ls(ceph) if n.startswith("virtstore-")]
    xml = rconn.volume_xml(rpool, "v1")
    assert "<volume type='network'>" in xml and "<path>rbd/v1</path>" in xml
    # data in and out, holes included
    payload = os.urandom(MiB) + bytes(2 * MiB) + b"tail" * 1024
    upload(rconn, rpool, "v1", payload)
    got = download(rconn, rpool, "v1")
    assert len(got) == 8 * MiB
    assert got[:len(payload)] == payload and got[len(payload):] == bytes(8 * MiB - len(payload))
    # partial download, and a download into a regular file keeps the holes
    assert download(rconn, rpool, "v1", offset=10, length=20) == payload[10:30]
    # upload at an offset
    upload(rconn, rpool, "v1", b"X" * 100, offset=MiB + 5, length=100)
    assert download(rconn, rpool, "v1", offset=MiB, length=110) == bytes(5) + b"X" * 100 + \
        bytes(5)
    with pytest.raises(InvalidArgument):
        rconn.volume_upload(rpool, "v1", io.BytesIO(b"x"), offset=-1)
    # an upload past the end fails and leaves the volume as it was
    job = rconn.volume_upload(rpool, "v1", io.BytesIO(b"Y" * (9 * MiB)))
    assert rconn.job_wait(job.id, 60).state == "failed"
    assert download(rconn, rpool, "v1", offset=0, length=MiB) == payload[:MiB]
    # an existing name is refused
    with pytest.raises(Exception, match="exists"):
        rconn.volume_create_xml(rpool, "<volume><name>v1</name><capacity>1024</capacity>"
                                       "</volume>")
    # only raw
    with pytest.raises(Unsupported):
        rconn.volume_create_xml(rpool, "<volume><name>q</name><capacity>1024</capacity>"
                                       "<target><format type='qcow2'/></target></volume>")
    rconn.volume_delete(rpool, "v1")
    assert "v1" not in rbd_ls(ceph)
    with pytest.raises(NoSuchVolume):
        rconn.volume_info(rpool, "v1")


def test_download_to_regular_file_is_sparse(rconn: EmbeddedConnection, rpool: str,
                                            tmp_path: Path) -> None:
    rconn.volume_create_xml(rpool, "<volume><name>sp</name><capacity unit='M'>16</capacity>"
                                   "</volume>")
    upload(rconn, rpool, "sp", b"A" * 4096, length=4096)
    out = tmp_path / "sp.raw"
    with open(out, "wb") as fh:
        job = rconn.volume_download(rpool, "sp", fh)
        wait_job(rconn, job.id)
    st = out.stat()
    assert st.st_size == 16 * MiB and st.st_blocks * 512 < 16 * MiB
    assert out.read_bytes()[:4097] == b"A" * 4096 + b"\0"


def test_resize_and_wipe(rconn: EmbeddedConnection, rpool: str) -> None:
    rconn.volume_create_xml(rpool, "<volume><name>r</name><capacity unit='M'>4</capacity>"
                                   "</volume>")
    wait_job(rconn, rconn.volume_resize(rpool, "r", 12 * MiB).id)
    assert rconn.volume_info(rpool, "r").capacity == 12 * MiB
    with pytest.raises(InvalidArgument):
        rconn.volume_resize(rpool, "r", 2 * MiB)
    wait_job(rconn, rconn.volume_resize(rpool, "r", 2 * MiB, delta=True, shrink=True).id)
    assert rconn.volume_info(rpool, "r").capacity == 10 * MiB
    upload(rconn, rpool, "r", b"\x55" * (10 * MiB))
    wait_job(rconn, rconn.volume_wipe(rpool, "r", "zero").id)
    assert download(rconn, rpool, "r") == bytes(10 * MiB)
    upload(rconn, rpool, "r", b"\x66" * MiB, length=MiB)
    wait_job(rconn, rconn.volume_wipe(rpool, "r", "trim").id)
    assert download(rconn, rpool, "r", length=MiB) == bytes(MiB)
    job = rconn.volume_wipe(rpool, "r", "gutmann")
    info = rconn.job_wait(job.id, 30)
    assert info.state == "failed" and "zero, trim" in (info.error or "")


def test_snapshots(rconn: EmbeddedConnection, rpool: str) -> None:
    rconn.volume_create_xml(rpool, "<volume><name>s</name><capacity unit='M'>4</capacity>"
                                   "</volume>")
    upload(rconn, rpool, "s", b"one" * 1000, length=3000)
    snap = rconn.volume_snapshot_create(rpool, "s", "first")
    assert snap.name == "first" and snap.kind == "native"
    upload(rconn, rpool, "s", b"two" * 1000, length=3000)
    assert [s.name for s in rconn.volume_snapshot_list(rpool, "s")] == ["first"]
    rconn.volume_snapshot_revert(rpool, "s", "first")
    assert download(rconn, rpool, "s", length=3000) == b"one" * 1000
    with pytest.raises(Unsupported):
        rconn.volume_snapshot_create(rpool, "s", "ext", external=True)
    with pytest.raises(NoSuchVolume):
        rconn.volume_snapshot_revert(rpool, "s", "nope")
    rconn.volume_snapshot_create(rpool, "s", "second")
    rconn.volume_snapshot_delete(rpool, "s", "second")
    assert [s.name for s in rconn.volume_snapshot_list(rpool, "s")] == ["first"]
    # a volume is deleted with its snapshots
    rconn.volume_delete(rpool, "s")


def test_clones(rconn: EmbeddedConnection, rpool: str, ceph: Server) -> None:
    rconn.volume_create_xml(rpool, "<volume><name>base</name><capacity unit='M'>8</capacity>"
                                   "</volume>")
    data = os.urandom(2 * MiB)
    upload(rconn, rpool, "base", data, length=len(data))
    # a linked (copy-on-write) clone, as libvirt's vol-clone makes
    wait_job(rconn, rconn.volume_clone(rpool, "base", "linked", linked=True).id)
    info = ceph_cmd(ceph, "rbd", "info", "rbd/linked").stdout
    assert "parent: rbd/base@virtstore-clone-" in info
    assert download(rconn, rpool, "linked", length=len(data)) == data
    # a plain clone is flattened: independent, no snapshot left on the source
    wait_job(rconn, rconn.volume_clone(rpool, "base", "full").id)
    assert "parent:" not in ceph_cmd(ceph, "rbd", "info", "rbd/full").stdout
    assert download(rconn, rpool, "full", length=len(data)) == data
    # the snapshot behind the linked clone does not block deleting the source
    rconn.volume_delete(rpool, "base")
    assert "base" not in rbd_ls(ceph)
    assert "parent:" not in ceph_cmd(ceph, "rbd", "info", "rbd/linked").stdout
    assert download(rconn, rpool, "linked", length=len(data)) == data
    # deleting the last clone removes the hidden snapshot
    rconn.volume_create_xml(rpool, "<volume><name>b2</name><capacity unit='M'>4</capacity>"
                                   "</volume>")
    wait_job(rconn, rconn.volume_clone(rpool, "b2", "c2", linked=True).id)
    assert ceph_cmd(ceph, "rbd", "snap", "ls", "rbd/b2").stdout.strip()
    rconn.volume_delete(rpool, "c2")
    assert not ceph_cmd(ceph, "rbd", "snap", "ls", "rbd/b2").stdout.strip()
    # a user snapshot with a clone on it cannot be deleted by itself
    rconn.volume_snapshot_create(rpool, "b2", "keep")
    with pytest.raises(Unsupported):
        rconn.volume_clone(rpool, "b2", "c3", format="qcow2")


def clone_snaps(ceph: Server, image: str) -> list[str]:
    out = ceph_cmd(ceph, "rbd", "snap", "ls", "--format", "json", f"rbd/{image}").stdout
    return [s["name"] for s in json.loads(out) if s["name"].startswith("virtstore-clone-")]


def parent_of(ceph: Server, image: str) -> str:
    return str(json.loads(ceph_cmd(ceph, "rbd", "info", "--format", "json",
                                   f"rbd/{image}").stdout)["parent"]["snapshot"])


def test_clones_share_a_snapshot_while_the_source_is_unchanged(
        rconn: EmbeddedConnection, rpool: str, ceph: Server) -> None:
    rconn.volume_create_xml(rpool, "<volume><name>src</name><capacity unit='M'>8</capacity>"
                                   "</volume>")
    old, new = os.urandom(MiB), os.urandom(MiB)
    upload(rconn, rpool, "src", old, length=MiB)
    wait_job(rconn, rconn.volume_clone(rpool, "src", "l1", linked=True).id)
    wait_job(rconn, rconn.volume_clone(rpool, "src", "l2", linked=True).id)
    [first] = clone_snaps(ceph, "src")
    assert parent_of(ceph, "l1") == parent_of(ceph, "l2") == first
    # written since: the next clone needs a snapshot of its own
    upload(rconn, rpool, "src", new, length=MiB)
    wait_job(rconn, rconn.volume_clone(rpool, "src", "l3", linked=True).id)
    assert len(clone_snaps(ceph, "src")) == 2 and parent_of(ceph, "l3") != first
    assert download(rconn, rpool, "l1", length=MiB) == old
    assert download(rconn, rpool, "l3", length=MiB) == new
    # the shared snapshot goes with the last clone on it
    rconn.volume_delete(rpool, "l1")
    assert first in clone_snaps(ceph, "src")
    rconn.volume_delete(rpool, "l2")
    assert first not in clone_snaps(ceph, "src")
    assert download(rconn, rpool, "l3", length=MiB) == new


def test_snapshot_with_libvirt_clone_is_busy(rconn: EmbeddedConnection, rpool: str,
                                             ceph: Server) -> None:
    rconn.volume_create_xml(rpool, "<volume><name>p</name><capacity unit='M'>4</capacity>"
                                   "</volume>")
    rconn.volume_snapshot_create(rpool, "p", "s1")
    ceph_cmd(ceph, "rbd", "snap", "protect", "rbd/p@s1")
    ceph_cmd(ceph, "rbd", "clone", "rbd/p@s1", "rbd/kid")
    rconn.pool_refresh(rpool)
    with pytest.raises(Busy, match="kid"):
        rconn.volume_snapshot_delete(rpool, "p", "s1")
    rconn.volume_delete(rpool, "p")  # flattens the clone first
    assert "parent:" not in ceph_cmd(ceph, "rbd", "info", "rbd/kid").stdout
    rconn.pool_refresh(rpool)
    rconn.volume_delete(rpool, "kid")


def test_refresh_sees_outside_changes(rconn: EmbeddedConnection, rpool: str,
                                      ceph: Server) -> None:
    ceph_cmd(ceph, "rbd", "create", "--size", "3M", "rbd/outside")
    rconn.pool_refresh(rpool)
    assert rconn.volume_info(rpool, "outside").capacity == 3 * MiB
    ceph_cmd(ceph, "rbd", "resize", "--size", "5M", "rbd/outside")
    rconn.pool_refresh(rpool)
    assert rconn.volume_info(rpool, "outside").capacity == 5 * MiB
    ceph_cmd(ceph, "rbd", "rm", "rbd/outside")
    rconn.pool_refresh(rpool)
    assert "outside" not in [v.name for v in rconn.list_volumes(rpool)]


def test_wrong_secret_and_missing_pool(rconn: EmbeddedConnection, ceph: Server) -> None:
    other_key = ceph_cmd(ceph, "ceph-authtool", "--gen-print-key").stdout.strip()
    u = rconn.secret_define_xml(secret_xml("wrong"))
    rconn.secret_set_value(u, base64.b64decode(other_key))
    ns = "http://libvirt.org/schemas/storagepool/rbd/1.0"
    quick = (f"<rbd:config_opts xmlns:rbd='{ns}'>"
             "<rbd:option name='client_mount_timeout' value='5'/></rbd:config_opts>")
    rconn.pool_define_xml(pool_xml("bad", ceph, usage="wrong", extra=quick))
    if ceph.info["v1"] == 6789:
        with pytest.raises(AuthFailed, match="authentication failed for user 'admin'"):
            rconn.pool_start("bad")
    else:  # msgr2 on a non-standard port reports a refused key as a timeout
        with pytest.raises(Exception, match="timed out"):
            rconn.pool_start("bad")
    assert rconn.pool_info("bad").state == "inactive"
    u = rconn.secret_define_xml(secret_xml("garbage"))
    rconn.secret_set_value(u, os.urandom(16))
    rconn.pool_define_xml(pool_xml("bad2", ceph, usage="garbage"))
    with pytest.raises(AuthFailed, match="not a valid cephx key"):
        rconn.pool_start("bad2")
    rconn.pool_define_xml(pool_xml("nopool", ceph, source="nosuchpool"))
    with pytest.raises(Exception, match="Does the pool 'nosuchpool' exist"):
        rconn.pool_start("nopool")
    rconn.pool_define_xml(pool_xml("nosecret", ceph, usage="undefined usage"))
    with pytest.raises(Exception, match="secret"):
        rconn.pool_start("nosecret")


def test_config_opts_and_allocation_capacity(rconn: EmbeddedConnection, ceph: Server) -> None:
    ns = "http://libvirt.org/schemas/storagepool/rbd/1.0"
    extra = ("<refresh><volume allocation='capacity'/></refresh>"
             f"<rbd:config_opts xmlns:rbd='{ns}'>"
             "<rbd:option name='client_mount_timeout' value='15'/></rbd:config_opts>")
    rconn.pool_create_xml(pool_xml("opts", ceph, extra=extra))
    try:
        rconn.volume_create_xml("opts", "<volume><name>a</name><capacity unit='M'>6</capacity>"
                                        "</volume>")
        vol = rconn.volume_info("opts", "a")
        # as libvirt 9.0: every object of the image, its size rounded up to 4 MiB objects
        assert (vol.capacity, vol.allocation) == (6 * MiB, 8 * MiB)
        # only allocation='default' counts the objects written (none here), by fast-diff
        rconn.pool_create_xml(pool_xml("counted", ceph, extra="<refresh><volume "
                                                            "allocation='default'/></refresh>"))
        try:
            vol = rconn.volume_info("counted", "a")
            assert (vol.capacity, vol.allocation) == (6 * MiB, 0)
        finally:
            rconn.pool_stop("counted")
        rconn.volume_delete("opts", "a")
    finally:
        rconn.pool_stop("opts")


def test_leftover_staging_image_is_removed_at_next_start(tmp_path: Path, ceph: Server) -> None:
    from virtstore.backends import backend_for

    root = tmp_path / "crash"
    root.mkdir()
    c = EmbeddedConnection(str(root))
    u = c.secret_define_xml(secret_xml("client.admin secret"))
    c.secret_set_value(u, base64.b64decode(ceph.info["admin_key"]))
    c.pool_define_xml(pool_xml("cr", ceph))
    c.pool_start("cr")
    be = backend_for("rbd")
    pool = c.state.definition(c.state.row("cr"))
    staging = be.staging_path(pool, "deadbeef")
    with c.state.store.write() as db:
        db.execute("INSERT INTO journal(op, pool, name, tmp_path, final_path, pid, pid_start,"
                   " started) VALUES('create','cr','ghost',?,'rbd/ghost',?,'0',0)",
                   (staging, 2 ** 22 + 12345))
    ceph_cmd(ceph, "rbd", "create", "--size", "1M", "rbd/virtstore-staging-deadbeef")
    c.close()
    c2 = EmbeddedConnection(str(root))  # recovery discards what the journal names
    assert "virtstore-staging-deadbeef" not in rbd_ls(ceph)
    c2.pool_stop("cr")
    c2.close()


def test_cli_vol_list(rconn: EmbeddedConnection, rpool: str, root: Path) -> None:
    import subprocess
    import sys

    rconn.volume_create_xml(rpool, "<volume><name>clivol</name><capacity>1048576</capacity>"
                                   "</volume>")
    out = subprocess.run([sys.executable, "-m", "virtstore.cli.main", "--root", str(root),
                          "vol-list", rpool], capture_output=True, text=True, check=False)
    if out.returncode != 0 and "No module named" in out.stderr:
        out = subprocess.run([os.path.join(os.path.dirname(sys.executable), "virtstore"),
                              "--root", str(root), "vol-list", rpool],
                             capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert "clivol" in out.stdout and "rbd/clivol" in out.stdout


def test_nbd_export_of_an_rbd_image(rconn: EmbeddedConnection, rpool: str,
                                    tmp_path: Path) -> None:
    import subprocess

    from virtstore.engine.nbd import export_volume

    rconn.volume_create_xml(rpool, "<volume><name>nb</name><capacity unit='M'>2</capacity>"
                                   "</volume>")
    data = os.urandom(2 * MiB)
    upload(rconn, rpool, "nb", data)
    with export_volume(rconn, rpool, "nb", socket_path=str(tmp_path / "s"),
                       read_only=True) as exp:
        out = tmp_path / "nb.raw"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", exp.url, str(out)],
                       check=True, capture_output=True)
        assert out.read_bytes() == data


def test_cli_data_commands(rconn: EmbeddedConnection, rpool: str, root: Path,
                           tmp_path: Path) -> None:
    import subprocess
    import sys

    exe = Path(sys.executable).parent / "virtstore"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(exe), "--root", str(root), *args], capture_output=True,
                              text=True, check=False)

    r = cli("vol-create-as", rpool, "cv", "3M")
    assert r.returncode == 0, r.stderr
    src = tmp_path / "in.raw"
    data = os.urandom(MiB)
    src.write_bytes(data)
    r = cli("vol-upload", "cv", str(src), "--pool", rpool)
    assert r.returncode == 0, r.stderr
    r = cli("vol-clone", "cv", "cv2", "--pool", rpool)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out.raw"
    r = cli("vol-download", "cv2", str(out), "--pool", rpool)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == data + bytes(2 * MiB)
    r = cli("vol-wipe", "cv", "--pool", rpool, "--algorithm", "nnsa")
    assert r.returncode != 0
    # virsh's two lines: what failed, then why.
    assert r.stderr.strip().splitlines() == [
        "error: Failed to wipe vol cv",
        "error: unsupported flags (nnsa) for wiping an rbd volume: use one of zero, trim"]
    r = cli("vol-info", "cv", "--pool", rpool)
    assert r.returncode == 0 and "network" in r.stdout


def test_namespace_pool(rconn: EmbeddedConnection, ceph: Server) -> None:
    ns = "ns" + secrets.token_hex(3)
    rconn.pool_define_xml(pool_xml("nsp", ceph, source=f"rbd/{ns}"))
    with pytest.raises(Exception, match=f"namespace '{ns}' does not exist"):
        rconn.pool_start("nsp")
    ceph_cmd(ceph, "rbd", "namespace", "create", f"rbd/{ns}")
    rconn.pool_start("nsp")
    try:
        rconn.volume_create_xml("nsp", "<volume><name>inns</name><capacity>1048576</capacity>"
                                       "</volume>")
        assert rconn.volume_info("nsp", "inns").path == f"rbd/{ns}/inns"
        assert ceph_cmd(ceph, "rbd", "ls", f"rbd/{ns}").stdout.split() == ["inns"]
        assert "inns" not in rbd_ls(ceph)
        wait_job(rconn, rconn.volume_clone("nsp", "inns", "inns2", linked=True).id)
        rconn.volume_delete("nsp", "inns")
        rconn.volume_delete("nsp", "inns2")
    finally:
        rconn.pool_stop("nsp")


def test_walk_every_operation(rconn: EmbeddedConnection, rpool: str, tmp_path: Path) -> None:
    """Each feature an RBD image advertises works; each other one says unsupported."""
    rconn.volume_create_xml(rpool, "<volume><name>w</name><capacity unit='M'>8</capacity>"
                                   "</volume>")
    seen = walk(rconn, rpool, "w", tmp_path)
    assert seen["snapshot"] and seen["clone-linked"] and seen["clone-full"], seen
    assert seen["resize-shrink"] and seen["upload"] and seen["wipe"] and seen["export"], seen
    assert not seen["snapshot-external"] and not seen["copy"], seen


@pytest.mark.parametrize("fence", [False, True])
def test_a_fenced_upload_stops_without_rolling_back(rconn: EmbeddedConnection, rpool: str,
                                                   fence: bool) -> None:
    """A cancelled upload rolls the image back; one whose cluster lease was lost (fenced)
    must not write at all once told, the rollback included: it leaves the bytes it
    wrote, as a crash would."""
    rconn.volume_create_xml(rpool, "<volume><name>f</name><capacity unit='M'>16</capacity>"
                                   "</volume>")
    upload(rconn, rpool, "f", b"O" * (16 * MiB))
    r, w = os.pipe()
    with os.fdopen(r, "rb") as source, os.fdopen(w, "wb", buffering=0) as feed:
        job = rconn.volume_upload(rpool, "f", source, length=16 * MiB)
        feed.write(b"N" * (8 * MiB))
        deadline = time.monotonic() + 60
        while rconn.job_info(job.id).bytes_done < 4 * MiB:
            assert time.monotonic() < deadline, "the upload wrote nothing"
            time.sleep(0.05)
        rconn.jobs.cancel(job.id, fence=fence)
        time.sleep(0.3)  # past the monitor's check interval
        # One more chunk, the one its blocked read waits for: it sees the cancel after.
        feed.write(b"N" * (4 * MiB))
    assert rconn.job_wait(job.id, 60).state == "cancelled"
    head = download(rconn, rpool, "f", offset=0, length=MiB)
    assert head == (b"N" if fence else b"O") * MiB
