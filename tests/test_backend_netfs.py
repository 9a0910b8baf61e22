"""netfs pools: libvirt's mount commands, the kernel check, and the userspace NFS mode
end to end against nfs-ganesha on 127.0.0.1."""

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
from net_fixtures import Server, nfs_fixture  # noqa: F401
from virtstore.api.embedded import EmbeddedConnection
from virtstore.backends.fs import kernel_filesystems
from virtstore.backends.netfs import USERSPACE_OPT, kernel_problem, mount_argv, mount_source
from virtstore.errors import AlreadyExists, Unsupported
from virtstore.host import mounts
from virtstore.xml import parse_pool_xml

MiB = 1 << 20
DATA = Path(__file__).parent / "data" / "net"
CONFORMANCE = Path(os.environ.get(
    "VIRTSTORE_CONFORMANCE",
    Path(__file__).resolve().parent.parent.parent / "shared" / "conformance" / "libvirt"))


def _argv_cases() -> list[tuple[str, str]]:
    rows = []
    for line in (CONFORMANCE / "cases.tsv").read_text().splitlines():
        cols = line.split("\t")
        if len(cols) > 5 and cols[0] == "pool-xml2argv" and cols[1].startswith("pool-netfs"):
            rows.append((cols[1], cols[5]))
    return rows


@pytest.mark.parametrize(("name", "expected"), _argv_cases())
def test_mount_argv_matches_libvirt(name: str, expected: str) -> None:
    pool = parse_pool_xml((CONFORMANCE / "storagepoolxml2xmlin" / f"{name}.xml").read_text())
    want = (CONFORMANCE / expected).read_text().replace("\\\n", " ").split()
    assert mount_argv(pool) == want


def test_argv_cases_present() -> None:
    assert len(_argv_cases()) >= 6


def _netfs_xml(name: str, target: Path, fmt: str, host: str = "127.0.0.1",
               path: str = "/export", opts: tuple[str, ...] = ()) -> str:
    ns = "http://libvirt.org/schemas/storagepool/fs/1.0"
    extra = ""
    if opts:
        extra = (f"<fs:mount_opts xmlns:fs='{ns}'>"
                 + "".join(f"<fs:option name='{o}'/>" for o in opts) + "</fs:mount_opts>")
    return (f"<pool type='netfs'><name>{name}</name><source><host name='{host}'/>"
            f"<dir path='{path}'/><format type='{fmt}'/></source>"
            f"<target><path>{target}</path></target>{extra}</pool>")


@pytest.mark.skipif("nfs" in kernel_filesystems() or "nfs4" in kernel_filesystems(),
                    reason="this kernel has an NFS client: the refusal cannot be seen")
def test_start_without_kernel_nfs_client_names_it(conn: EmbeddedConnection,
                                                  tmp_path: Path) -> None:
    target = tmp_path / "mnt"
    conn.pool_define_xml(_netfs_xml("n", target, "nfs"))
    conn.pool_build("n")
    assert target.is_dir()
    with pytest.raises(Unsupported, match="this kernel has no NFS client: 'nfs' is not in "
                                          "/proc/filesystems"):
        conn.pool_start("n")
    assert conn.pool_info("n").state == "inactive"


@pytest.mark.skipif("nfs" in kernel_filesystems() or "nfs4" in kernel_filesystems(),
                    reason="this kernel has an NFS client: the refusal cannot be seen")
def test_recorded_kernel_mounts_are_their_pools() -> None:
    """/proc/self/mountinfo as the kernel lab's NFS v3, v4 and CIFS pools left it
    (Linux 6.1, nfs-utils 2.6.2, cifs-utils 7.0): each mount is found as its pool's by
    source and target, as start (already mounted?) and stop (ours to unmount?) look."""
    found = mounts.parse_mountinfo((DATA / "mountinfo-netfs.txt").read_text())
    pools = [parse_pool_xml(x) for x in (DATA / "netfs-pools.txt").read_text().splitlines()]
    assert [(m.fstype, m.target, m.source) for m in found] == [
        (fstype, p.target.path, mount_source(p)) for fstype, p in zip(("nfs", "nfs4", "cifs"),
                                                                      pools, strict=True)]
    assert found[1].source == "127.0.0.1:/export" and found[2].source == "//127.0.0.1/share"
    for m in found:  # libvirt's default options
        assert {"nosuid", "nodev", "noexec"} <= set(m.options)
    v3, v4, cifs = (set(m.super_options) for m in found)
    assert {"vers=3", "nolock", "port=35003", "addr=127.0.0.1"} <= v3
    assert {"vers=4.2", "port=35003"} <= v4
    assert {"vers=3.1.1", "sec=none"} <= cifs  # the guest option: no credentials


def test_kernel_problem_messages() -> None:
    nfs = kernel_problem("nfs")
    assert nfs is not None and "NFS client" in nfs and USERSPACE_OPT in nfs
    if "cifs" not in kernel_filesystems():
        cifs = kernel_problem("cifs")
        assert cifs is not None and "CIFS" in cifs


@pytest.fixture
def nfs(nfs_fixture: Server) -> Server:  # noqa: F811
    return nfs_fixture


@pytest.fixture
def upool(conn: EmbeddedConnection, nfs: Server, tmp_path: Path) -> Iterator[str]:
    export = Path(nfs.info["export"])
    for child in export.iterdir():
        child.unlink()
    conn.pool_define_xml(_netfs_xml("u", tmp_path / "mnt", "nfs", path=str(export),
                                    opts=(USERSPACE_OPT,)))
    conn.pool_build("u")
    conn.pool_start("u")
    yield "u"
    conn.pool_stop("u")


def test_userspace_nfs_volumes(conn: EmbeddedConnection, upool: str, nfs: Server) -> None:
    export = Path(nfs.info["export"])
    info = conn.pool_info(upool)
    assert info.state == "running" and info.shared
    st = os.statvfs(export)
    assert info.capacity == st.f_frsize * st.f_blocks and 0 < info.available <= info.capacity
    conn.volume_create_xml(upool, "<volume><name>a.raw</name><capacity unit='M'>4</capacity>"
                                  "</volume>")
    conn.volume_create_xml(upool, "<volume><name>b.qcow2</name><capacity unit='M'>64"
                                  "</capacity><target><format type='qcow2'/></target></volume>")
    vols = {v.name: v for v in conn.list_volumes(upool)}
    assert set(vols) == {"a.raw", "b.qcow2"}
    assert vols["a.raw"].path == f"nfs://127.0.0.1{export}/a.raw"
    assert vols["a.raw"].capacity == 4 * MiB and vols["a.raw"].format == "raw"
    assert vols["b.qcow2"].format == "qcow2" and vols["b.qcow2"].capacity == 64 * MiB
    # the server has them, with no staging file left
    assert sorted(os.listdir(export)) == ["a.raw", "b.qcow2"]
    # qemu reads the volume through its own NFS client at the volume's path
    if shutil.which("qemu-img"):
        out = subprocess.run(["qemu-img", "info", "--output=json", vols["b.qcow2"].path],
                             capture_output=True, text=True, check=False)
        assert out.returncode == 0, out.stderr
        assert '"format": "qcow2"' in out.stdout
    with pytest.raises(AlreadyExists):
        conn.volume_create_xml(upool, "<volume><name>a.raw</name><capacity>1</capacity>"
                                      "</volume>")
    # upload and download
    payload = os.urandom(MiB) + bytes(MiB) + b"end"
    job_done(conn, conn.volume_upload(upool, "a.raw", io.BytesIO(payload)).id)
    assert (export / "a.raw").read_bytes()[:len(payload)] == payload
    assert (export / "a.raw").stat().st_size == 4 * MiB
    sink = io.BytesIO()
    job_done(conn, conn.volume_download(upool, "a.raw", sink, offset=5, length=100).id)
    assert sink.getvalue() == payload[5:105]
    job_done(conn, conn.volume_upload(upool, "a.raw", io.BytesIO(b"Z" * 10), offset=7,
                                   length=10).id)
    assert (export / "a.raw").read_bytes()[:20] == payload[:7] + b"Z" * 10 + payload[17:20]
    # clone, resize, wipe
    clone_resize_wipe(conn, upool, export, 8 * MiB)
    # outside changes show on refresh; delete
    (export / "outside.img").write_bytes(b"x" * 4096)
    conn.pool_refresh(upool)
    assert conn.volume_info(upool, "outside.img").capacity == 4096
    for name in ("a.raw", "b.qcow2", "c.raw", "outside.img"):
        conn.volume_delete(upool, name)
    assert os.listdir(export) == []


def test_userspace_mode_is_for_nfs_only(conn: EmbeddedConnection, tmp_path: Path) -> None:
    conn.pool_define_xml(_netfs_xml("g", tmp_path, "glusterfs", opts=(USERSPACE_OPT,)))
    with pytest.raises(Unsupported, match="userspace mode"):
        conn.pool_start("g")


def test_userspace_nfs_unreachable_server(conn: EmbeddedConnection, tmp_path: Path,
                                          nfs: Server) -> None:
    conn.pool_define_xml(_netfs_xml("x", tmp_path, "nfs", path="/no/such/export",
                                    opts=(USERSPACE_OPT,)))
    with pytest.raises(Exception, match="cannot mount NFS export"):
        conn.pool_start("x")


def test_walk_userspace_volume(conn: EmbeddedConnection, upool: str, tmp_path: Path) -> None:
    """Each feature a volume reached through the userspace NFS client advertises works;
    each other one says unsupported."""
    conn.volume_create_xml(upool, "<volume><name>w.raw</name><capacity unit='M'>8"
                                  "</capacity></volume>")
    seen = walk(conn, upool, "w.raw", tmp_path)
    assert seen["upload"] and seen["download"] and seen["clone-full"], seen
    assert not seen["snapshot"] and not seen["snapshot-external"], seen
