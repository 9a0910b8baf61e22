"""netfs pools through the kernel's NFS (v3, v4) and CIFS clients, against nfs-ganesha
and samba started on 127.0.0.1 inside the VM: start mounts, stop unmounts, the volumes
are the server's files byte for byte, and an NFS pool's volumes are the same seen through
the userspace client (libnfs)."""

from __future__ import annotations

import io
import os
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from net_fixtures import Server, _start_nfs, free_port, port_open, spawn, start_server, wait_for
from virtstore.api.embedded import EmbeddedConnection
from virtstore.backends.netfs import USERSPACE_OPT
from virtstore.cli.main import main

MiB = 1 << 20
FS_NS = "http://libvirt.org/schemas/storagepool/fs/1.0"


@pytest.fixture(scope="module")
def nonloopback_address() -> None:
    """An address besides loopback, on a dummy interface: the VM has no network, and
    getaddrinfo(AI_ADDRCONFIG), which ganesha uses for its Bind_addr, finds no address
    on a host that has only loopback."""
    subprocess.run(["modprobe", "dummy"], check=False)
    if "klabnet0" not in os.listdir("/sys/class/net"):
        subprocess.run(["ip", "link", "add", "klabnet0", "type", "dummy"], check=True)
        subprocess.run(["ip", "addr", "add", "192.0.2.1/32", "dev", "klabnet0"], check=True)
        subprocess.run(["ip", "link", "set", "klabnet0", "up"], check=True)


@pytest.fixture(scope="module")
def nfs(nonloopback_address: None, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[Server]:
    """nfs-ganesha with its export on a tmpfs: its VFS backend serves files by handle,
    which the VM's overlay /tmp does not give out."""
    subprocess.run(["modprobe", "nfsv4"], check=False)
    base = tmp_path_factory.mktemp("nfs")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512m", "tmpfs", str(base)], check=True)
    saved, tempfile.tempdir = tempfile.tempdir, str(base)
    try:
        srv = start_server("nfs", _start_nfs, lock="nfs")
    except Exception as exc:
        subprocess.run(["umount", str(base)], check=False)
        pytest.skip(f"nfs-ganesha could not start: {exc}")
    finally:
        tempfile.tempdir = saved
    yield srv
    srv.stop()
    subprocess.run(["umount", str(base)], check=False)


def _start_samba(srv: Server) -> None:
    d = srv.dir
    share = d / "share"
    for sub in ("share", "run", "lock", "state", "cache", "private", "ncalrpc"):
        (d / sub).mkdir()
    port = free_port()
    # A guest share: the pool mounts with libvirt's 'guest' option.
    (d / "smb.conf").write_text(f"""[global]
  smb ports = {port}
  interfaces = 127.0.0.1
  bind interfaces only = yes
  server role = standalone server
  map to guest = Bad User
  disable netbios = yes
  load printers = no
  printing = bsd
  printcap name = /dev/null
  disable spoolss = yes
  pid directory = {d}/run
  lock directory = {d}/lock
  state directory = {d}/state
  cache directory = {d}/cache
  private dir = {d}/private
  ncalrpc dir = {d}/ncalrpc
  log file = {d}/smbd.log
[share]
  path = {share}
  read only = no
  guest ok = yes
  force user = root
""")
    srv.pids.append(spawn(["smbd", "--foreground", "--no-process-group", "-s",
                           str(d / "smb.conf")], d / "smbd.out").pid)
    wait_for("smbd", lambda: port_open(port), 60, 0.2)
    srv.info.update(export=str(share), port=port)


@pytest.fixture(scope="module")
def samba() -> Iterator[Server]:
    if not os.path.exists("/usr/sbin/smbd"):
        pytest.skip("smbd is not installed (Debian samba)")
    subprocess.run(["modprobe", "cifs"], check=False)
    srv = start_server("samba", _start_samba)
    yield srv
    srv.stop()


def pool_xml(name: str, target: Path, fmt: str, path: str, *, ver: str = "",
             opts: tuple[str, ...] = ()) -> str:
    proto = f"<protocol ver='{ver}'/>" if ver else ""
    mount_opts = "".join(f"<fs:option name='{o}'/>" for o in opts)
    return (f"<pool type='netfs' xmlns:fs='{FS_NS}'><name>{name}</name><source>"
            f"<host name='127.0.0.1'/><dir path='{path}'/><format type='{fmt}'/>{proto}"
            f"</source><target><path>{target}</path></target>"
            f"<fs:mount_opts>{mount_opts}</fs:mount_opts></pool>")


def mount_at(target: Path) -> tuple[str, str, str] | None:
    """(source, fstype, options) of the mount on ``target``, or None."""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        src, mnt, fstype, opts = line.split()[:4]
        if mnt == str(target):
            return src, fstype, opts
    return None


def qemu_raw(path: Path) -> bytes:
    """The guest-visible content of an image file, read by qemu on the server side."""
    out = path.with_suffix(".check")
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(path), str(out)],
                   check=True)
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def guest_image(tmp_path: Path) -> Path:
    """A qcow2 image of a 64 MiB disk with data at 3 MiB and at its end."""
    raw = tmp_path / "guest.raw"
    with open(raw, "wb") as fh:
        fh.truncate(64 * MiB)
        fh.seek(3 * MiB)
        fh.write(os.urandom(MiB))
        fh.seek(64 * MiB - 4096)
        fh.write(os.urandom(4096))
    out = tmp_path / "guest.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(out)], check=True)
    raw.unlink()
    return out


Cli = Callable[..., str]


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    root = str(tmp_path / "state")

    def run(*args: str, ok: bool = True) -> str:
        # In process: a command's start-up costs seconds under the VM's emulated CPU.
        code = main(["--root", root, *args])
        out = capsys.readouterr()
        assert (code == 0) == ok, out.err
        return out.out if ok else out.err

    return run


def exercise(cli: Cli, tmp_path: Path, name: str, xml: str, export: Path,
             fstype: str) -> None:
    """The pool's whole life through the CLI, each step checked on the server's files."""
    target = tmp_path / f"mnt-{name}"
    (tmp_path / f"{name}.xml").write_text(xml)
    cli("pool-define", str(tmp_path / f"{name}.xml"))
    cli("pool-build", name)
    assert target.is_dir()
    cli("pool-start", name)
    try:
        mounted = mount_at(target)
        assert mounted is not None and mounted[1] == fstype, mounted
        cli("vol-create-as", name, "a.raw", "8M")
        cli("vol-create-as", name, "b.qcow2", "64M", "--format", "qcow2")
        assert sorted(os.listdir(export)) == ["a.raw", "b.qcow2"]
        payload = os.urandom(MiB) + bytes(MiB) + os.urandom(4096)
        src = tmp_path / "payload.bin"
        src.write_bytes(payload)
        cli("vol-upload", "--pool", name, "a.raw", str(src))
        raw = (export / "a.raw").read_bytes()
        assert len(raw) == 8 * MiB and raw[:len(payload)] == payload
        # An upload writes the volume's file: a qcow2 image made here arrives whole.
        disk = guest_image(tmp_path)
        cli("vol-upload", "--pool", name, "b.qcow2", str(disk))
        assert (export / "b.qcow2").read_bytes() == disk.read_bytes()
        guest = qemu_raw(export / "b.qcow2")
        out = tmp_path / "out.bin"
        cli("vol-download", "--pool", name, "a.raw", str(out))
        assert out.read_bytes() == raw
        cli("vol-clone", "--pool", name, "b.qcow2", "c.qcow2")
        assert qemu_raw(export / "c.qcow2") == guest
        cli("vol-resize", "--pool", name, "a.raw", "16M")
        assert (export / "a.raw").stat().st_size == 16 * MiB
        cli("vol-resize", "--pool", name, "c.qcow2", "128M")
        assert "128.00 MiB" in cli("vol-info", "--pool", name, "c.qcow2")
        cli("vol-delete", "--pool", name, "c.qcow2")
        assert sorted(os.listdir(export)) == ["a.raw", "b.qcow2"]
    finally:
        cli("pool-destroy", name)
    assert mount_at(target) is None
    assert not os.listdir(target)
    cli("pool-start", name)
    try:
        listed = cli("vol-list", name)
        assert "a.raw" in listed and "b.qcow2" in listed and "c.qcow2" not in listed
        cli("vol-download", "--pool", name, "a.raw", str(out))
        assert out.read_bytes() == (export / "a.raw").read_bytes()
    finally:
        cli("pool-destroy", name)
    assert mount_at(target) is None


@pytest.fixture
def nfs_export(nfs: Server) -> Iterator[Path]:
    export = Path(nfs.info["export"])
    yield export
    for child in export.iterdir():
        child.unlink()


@pytest.mark.parametrize("ver", ["3", "4"])
def test_nfs_kernel_mount(ver: str, nfs: Server, nfs_export: Path, cli: Cli,
                          tmp_path: Path) -> None:
    port = nfs.info["nfs_port"]
    # ganesha listens on a port of its own; v3 takes locks through rpc.statd, which the
    # VM does not run (ganesha here serves no NLM either).
    opts = (f"port={port}", "nolock") if ver == "3" else (f"port={port}",)
    # NFSv4 sees ganesha's pseudo filesystem: the export is at its Pseudo path.
    path = str(nfs_export) if ver == "3" else "/export"
    name = f"nfs{ver}"
    exercise(cli, tmp_path, name, pool_xml(name, tmp_path / f"mnt-{name}", "nfs", path,
                                           ver=ver, opts=opts),
             nfs_export, "nfs" if ver == "3" else "nfs4")
    # The same files through the userspace client, as the kernel mount showed them.
    conn = EmbeddedConnection(str(tmp_path / "state"))  # the CLI calls' state
    conn.pool_start(name)
    kernel = {v.name: v for v in conn.list_volumes(name)}
    conn.pool_define_xml(pool_xml("user", tmp_path / "unused", "nfs", str(nfs_export),
                                  opts=(USERSPACE_OPT,)))
    conn.pool_start("user")
    try:
        user = {v.name: v for v in conn.list_volumes("user")}
        assert sorted(user) == sorted(kernel) == ["a.raw", "b.qcow2"]
        for vol in ("a.raw", "b.qcow2"):
            assert (user[vol].capacity, user[vol].format) == (kernel[vol].capacity,
                                                             kernel[vol].format)
            got = io.BytesIO()
            job = conn.volume_download("user", vol, got)
            assert conn.job_wait(job.id, 300).state == "done"
            want = io.BytesIO()
            job = conn.volume_download(name, vol, want)
            assert conn.job_wait(job.id, 300).state == "done"
            assert got.getvalue() == want.getvalue()
        # Through the server: ganesha's cache does not see files removed behind it.
        for vol in kernel:
            conn.volume_delete(name, vol)
        assert os.listdir(nfs_export) == []
    finally:
        conn.pool_stop("user")
        conn.pool_stop(name)
        conn.close()
    assert mount_at(tmp_path / f"mnt-{name}") is None


def test_cifs_kernel_mount(samba: Server, cli: Cli, tmp_path: Path) -> None:
    export = Path(samba.info["export"])
    xml = pool_xml("smb", tmp_path / "mnt-smb", "cifs", "share",
                   opts=(f"port={samba.info['port']}",))
    try:
        exercise(cli, tmp_path, "smb", xml, export, "cifs")
    finally:
        for child in export.iterdir():
            child.unlink()
