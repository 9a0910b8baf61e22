"""gluster pools and netfs pools of format glusterfs, against glusterd on 127.0.0.1."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import clone_resize_wipe, job_done
from contract_walk import walk
from net_fixtures import Server, gluster_fixture  # noqa: F401
from virtstore.api.embedded import EmbeddedConnection
from virtstore.backends.fs import kernel_filesystems
from virtstore.backends.gluster import GlusterBackend, mount_point
from virtstore.errors import AlreadyExists, NoSuchVolume, OperationInvalid
from virtstore.host import mounts

MiB = 1 << 20
needs_fuse = pytest.mark.skipif("fuse" not in kernel_filesystems(),
                                reason="this kernel has no FUSE: gluster volumes cannot be "
                                       "mounted")


@pytest.fixture
def gl(gluster_fixture: Server) -> Server:  # noqa: F811
    return gluster_fixture


def _gluster_xml(name: str, gl: Server, sub: str | None = None) -> str:
    d = f"<dir path='{sub}'/>" if sub else ""
    return (f"<pool type='gluster'><name>{name}</name><source><name>{gl.info['volume']}</name>"
            f"{d}<host name='{gl.info['host']}'/></source></pool>")


@pytest.fixture(params=["fuse", "gfapi"])
def gmode(request: pytest.FixtureRequest) -> Iterator[str]:
    """Both ways to a gluster volume: a private FUSE mount, and libgfapi."""
    if request.param == "fuse" and "fuse" not in kernel_filesystems():
        pytest.skip("this kernel has no FUSE: gluster volumes cannot be mounted")
    old = GlusterBackend.mode  # every instance, the engine's included
    GlusterBackend.mode = request.param
    yield request.param
    GlusterBackend.mode = old


@pytest.fixture
def gpool(conn: EmbeddedConnection, gl: Server, gmode: str) -> Iterator[str]:
    brick = Path(gl.info["brick"])
    for child in brick.iterdir():
        if not child.name.startswith("."):
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    conn.pool_define_xml(_gluster_xml("g", gl))
    conn.pool_start("g")
    yield "g"
    if conn.pool_info("g").state == "running":
        conn.pool_stop("g")


def test_gluster_pool_volumes(conn: EmbeddedConnection, gpool: str, gl: Server,
                              gmode: str) -> None:
    vol, brick = gl.info["volume"], Path(gl.info["brick"])
    info = conn.pool_info(gpool)
    assert info.capacity > 0 and info.shared
    conn.volume_create_xml(gpool, "<volume><name>a.raw</name><capacity unit='M'>4</capacity>"
                                  "</volume>")
    conn.volume_create_xml(gpool, "<volume><name>b.qcow2</name><capacity unit='M'>32"
                                  "</capacity><target><format type='qcow2'/></target></volume>")
    v = conn.volume_info(gpool, "a.raw")
    assert v.path == f"gluster://127.0.0.1/{vol}/a.raw" and v.key == v.path
    assert v.type == "network" and v.capacity == 4 * MiB
    assert conn.volume_info(gpool, "b.qcow2").format == "qcow2"
    xml = conn.volume_xml(gpool, "b.qcow2")
    assert f"<path>gluster://127.0.0.1/{vol}/b.qcow2</path>" in xml
    assert sorted(p.name for p in brick.iterdir() if not p.name.startswith(".")) == \
        ["a.raw", "b.qcow2"]
    with pytest.raises(AlreadyExists):
        conn.volume_create_xml(gpool, "<volume><name>a.raw</name><capacity>1</capacity>"
                                      "</volume>")
    # qemu opens the volume at its URL with its own gluster client (each qemu run on a
    # gluster URL spends ~10 s in libgfapi's shutdown: once is enough)
    if gmode == "fuse":
        out = subprocess.run(["qemu-img", "info", "--output=json",
                              f"gluster://127.0.0.1/{vol}/b.qcow2"], capture_output=True,
                             text=True, check=False)
        assert out.returncode == 0, out.stderr
        assert '"virtual-size": 33554432' in out.stdout
    # data
    payload = os.urandom(MiB) + b"end"
    job_done(conn, conn.volume_upload(gpool, "a.raw", io.BytesIO(payload)).id)
    sink = io.BytesIO()
    job_done(conn, conn.volume_download(gpool, "a.raw", sink, length=len(payload)).id)
    assert sink.getvalue() == payload
    assert (brick / "a.raw").read_bytes()[:len(payload)] == payload
    clone_resize_wipe(conn, gpool, brick, 6 * MiB)
    # a linked clone: a qcow2 overlay on its source, by name
    job_done(conn, conn.volume_clone(gpool, "a.raw", "l.qcow2", linked=True).id)
    assert conn.volume_info(gpool, "l.qcow2").format == "qcow2"
    # qcow2 internal snapshots
    conn.volume_snapshot_create(gpool, "b.qcow2", "s1")
    assert [s.name for s in conn.volume_snapshot_list(gpool, "b.qcow2")] == ["s1"]
    if gmode == "fuse":
        conn.volume_snapshot_revert(gpool, "b.qcow2", "s1")
    conn.volume_snapshot_delete(gpool, "b.qcow2", "s1")
    assert conn.volume_snapshot_list(gpool, "b.qcow2") == []
    with pytest.raises(NoSuchVolume):
        conn.volume_snapshot_delete(gpool, "b.qcow2", "s1")
    # outside changes show on refresh
    (brick / "outside").write_bytes(b"x" * 100)
    conn.pool_refresh(gpool)
    assert conn.volume_info(gpool, "outside").capacity == 100
    for name in ("a.raw", "b.qcow2", "c.raw", "l.qcow2", "outside"):
        conn.volume_delete(gpool, name)
    assert not [p for p in brick.iterdir() if not p.name.startswith(".")]
    # stop unmounts the private mount (libgfapi mode has none)
    mp = mount_point(conn.state.definition(conn.state.row(gpool)))
    assert (mounts.mounted_at(mp) is not None) == (gmode == "fuse")
    conn.pool_stop(gpool)
    assert mounts.mounted_at(mp) is None


def test_gluster_subdir_must_exist(conn: EmbeddedConnection, gl: Server, gmode: str) -> None:
    conn.pool_define_xml(_gluster_xml("gs", gl, "/missing"))
    with pytest.raises(OperationInvalid, match="'missing' does not exist"):
        conn.pool_start("gs")
    (Path(gl.info["brick"]) / "sub").mkdir(exist_ok=True)
    conn.pool_undefine("gs")
    conn.pool_define_xml(_gluster_xml("gs", gl, "/sub"))
    conn.pool_start("gs")
    try:
        conn.volume_create_xml("gs", "<volume><name>x</name><capacity>1024</capacity></volume>")
        assert conn.volume_info("gs", "x").path == \
            f"gluster://127.0.0.1/{gl.info['volume']}/sub/x"
        assert (Path(gl.info["brick"]) / "sub" / "x").exists()
        conn.volume_delete("gs", "x")
    finally:
        conn.pool_stop("gs")


@needs_fuse
def test_netfs_glusterfs_mounts_with_libvirts_options(conn: EmbeddedConnection, gl: Server,
                                                      tmp_path: Path) -> None:
    target = tmp_path / "mnt"
    conn.pool_define_xml(f"<pool type='netfs'><name>ng</name><source><host name='127.0.0.1'/>"
                         f"<dir path='/{gl.info['volume']}'/><format type='glusterfs'/>"
                         f"</source><target><path>{target}</path></target></pool>")
    conn.pool_build("ng")
    conn.pool_start("ng")
    try:
        m = mounts.mounted_at(str(target))
        assert m is not None and m.source == f"127.0.0.1:/{gl.info['volume']}"
        conn.volume_create_xml("ng", "<volume><name>n.img</name><capacity unit='M'>2"
                                     "</capacity></volume>")
        v = conn.volume_info("ng", "n.img")
        assert v.path == str(target / "n.img") and v.type == "file"
        assert (Path(gl.info["brick"]) / "n.img").exists()
        job_done(conn, conn.volume_upload("ng", "n.img", io.BytesIO(b"abc" * 100)).id)
        assert (Path(gl.info["brick"]) / "n.img").read_bytes()[:300] == b"abc" * 100
        conn.volume_delete("ng", "n.img")
    finally:
        conn.pool_stop("ng")
    assert mounts.mounted_at(str(target)) is None


def test_walk_every_operation(conn: EmbeddedConnection, gpool: str, gmode: str,
                              tmp_path: Path) -> None:
    """Each feature a gluster volume advertises works, in both modes; each other one
    says unsupported."""
    conn.volume_create_xml(gpool, "<volume><name>w.qcow2</name><capacity unit='M'>8"
                                  "</capacity><target><format type='qcow2'/></target></volume>")
    seen = walk(conn, gpool, "w.qcow2", tmp_path)
    assert seen["snapshot"] and seen["clone-linked"] and seen["upload"], seen
    assert not seen["snapshot-external"], seen
