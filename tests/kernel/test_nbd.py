"""Volume exports read back through the kernel's NBD client (/dev/nbdN, nbd-client),
and a volume attached that way as the block device a disk pool needs."""

from __future__ import annotations

import io
import mmap
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtstore.api import VolumeCreateArgs
from virtstore.api.embedded import EmbeddedConnection
from virtstore.errors import Busy

MiB = 1 << 20


@pytest.fixture(scope="module")
def nbd_module() -> None:
    if shutil.which("nbd-client") is None:
        pytest.skip("nbd-client is not installed (Debian nbd-client)")
    subprocess.run(["modprobe", "nbd"], check=True)


def free_nbd() -> str:
    """A /dev/nbdN with nothing connected."""
    for name in sorted(os.listdir("/sys/block"), key=lambda n: (len(n), n)):
        if name.startswith("nbd") and not os.path.exists(f"/sys/block/{name}/pid"):
            return f"/dev/{name}"
    raise RuntimeError("no free /dev/nbdN")


@pytest.fixture
def attach(nbd_module: None) -> Iterator[list[str]]:
    """Connects /dev/nbdN to a unix socket's export; disconnects at the end."""
    attached: list[str] = []
    yield attached
    for dev in attached:
        subprocess.run(["nbd-client", "-d", dev], capture_output=True, check=False)


def connect(attached: list[str], socket: str, export: str) -> str:
    dev = free_nbd()
    res = subprocess.run(["nbd-client", "-unix", socket, "-N", export, dev],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    attached.append(dev)
    return dev


def disconnect(attached: list[str], dev: str) -> None:
    subprocess.run(["nbd-client", "-d", dev], check=True, capture_output=True)
    attached.remove(dev)


def wait(conn: EmbeddedConnection, job_id: str) -> None:
    info = conn.job_wait(job_id, 300)
    assert info.state == "done", info.error


def guest_view(conn: EmbeddedConnection, pool: str, name: str) -> bytes:
    """The disk a qcow2 volume holds, read by qemu-img from the volume's file."""
    path = conn.volume_info(pool, name).path
    out = os.path.join(os.path.dirname(os.path.dirname(path)), name + ".check")
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", path, out], check=True)
    try:
        return Path(out).read_bytes()
    finally:
        os.unlink(out)


def dir_pool(conn: EmbeddedConnection, tmp_path: Path) -> str:
    d = tmp_path / "pool"
    d.mkdir()
    conn.pool_define_xml(f"<pool type='dir'><name>p</name><target><path>{d}</path>"
                         "</target></pool>")
    conn.pool_start("p")
    return "p"


def pread_direct(dev: str, offset: int, length: int) -> bytes:
    """Bytes from the device itself, past the page cache."""
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    try:
        with mmap.mmap(-1, length) as buf:  # page-aligned, as O_DIRECT wants
            got = os.preadv(fd, [buf], offset)
            return buf[:got]
    finally:
        os.close(fd)


def test_cli_export_through_dev_nbd(attach: list[str], tmp_path: Path) -> None:
    root = str(tmp_path / "state")
    conn = EmbeddedConnection(root)
    pool = dir_pool(conn, tmp_path)
    conn.volume_create(pool, VolumeCreateArgs(name="v.qcow2", capacity=64 * MiB,
                                              format="qcow2"))
    # The volume's file becomes a qcow2 image of a disk with data at 5 MiB.
    payload = os.urandom(MiB)
    raw = tmp_path / "disk.raw"
    with open(raw, "wb") as fh:
        fh.truncate(64 * MiB)
        fh.seek(5 * MiB)
        fh.write(payload)
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(image)], check=True)
    with open(image, "rb") as fh:
        wait(conn, conn.volume_upload(pool, "v.qcow2", fh).id)
    sock = str(tmp_path / "nbd.sock")
    for read_only in (True, False):
        # Its own process: the command serves until interrupted.
        argv = [sys.executable, "-m", "virtstore.cli.main", "--root", root, "nbd-export",
                "--pool", pool, "v.qcow2", "--socket", sock] + \
            (["--read-only"] if read_only else [])
        exporter = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
        try:
            assert exporter.stdout is not None
            url = exporter.stdout.readline().strip()
            assert url == f"nbd+unix:///v.qcow2?socket={sock}"
            dev = connect(attach, sock, "v.qcow2")
            name = os.path.basename(dev)
            # The disk the qcow2 holds, as a guest would see it.
            assert int(Path(f"/sys/block/{name}/size").read_text()) * 512 == 64 * MiB
            assert Path(f"/sys/block/{name}/ro").read_text().strip() == str(int(read_only))
            assert pread_direct(dev, 5 * MiB, MiB) == payload
            assert not any(pread_direct(dev, 0, MiB))
            if read_only:
                with pytest.raises(OSError):
                    fd = os.open(dev, os.O_WRONLY)
                    try:
                        os.pwrite(fd, b"x" * 4096, 0)
                        os.fsync(fd)
                    finally:
                        os.close(fd)
            else:
                with pytest.raises(Busy, match="is in use"):
                    conn.volume_delete(pool, "v.qcow2")  # exported: locked
                fd = os.open(dev, os.O_WRONLY)
                try:
                    os.pwrite(fd, b"W" * 65536, 20 * MiB)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            disconnect(attach, dev)
        finally:
            exporter.send_signal(signal.SIGINT)
            assert exporter.wait(120) == 0, exporter.stderr.read() if exporter.stderr else ""
    data = guest_view(conn, pool, "v.qcow2")
    assert data[5 * MiB:6 * MiB] == payload and data[20 * MiB:20 * MiB + 65536] == b"W" * 65536
    # Nothing holds the volume any more.
    conn.volume_delete(pool, "v.qcow2")
    conn.close()


def test_disk_pool_on_an_attached_volume(attach: list[str], conn: EmbeddedConnection,
                                         tmp_path: Path) -> None:
    """A qcow2 volume attached as /dev/nbdN is the device of a disk pool: the kernel
    scans its partition table, partition volumes take data, and it all lands in the
    qcow2 image."""
    from virtstore.host.devices import host_devices

    pool = dir_pool(conn, tmp_path)
    conn.volume_create(pool, VolumeCreateArgs(name="disk.qcow2", capacity=64 * MiB,
                                              format="qcow2"))
    sock = str(tmp_path / "disk.sock")
    payload = os.urandom(2 * MiB)
    with conn.volume_export_nbd(pool, "disk.qcow2", socket_path=sock):
        dev = connect(attach, sock, "disk.qcow2")
        name = os.path.basename(dev)
        conn.pool_define_xml(f"<pool type='disk'><name>{name}</name><source><device "
                             f"path='{dev}'/><format type='gpt'/></source><target><path>"
                             "/dev</path></target></pool>")
        conn.pool_build(name)
        conn.pool_start(name)
        try:
            conn.volume_create(name, VolumeCreateArgs(name=f"{name}p1", capacity=8 * MiB))
            part = f"/dev/{name}p1"
            assert os.path.exists(part)
            assert conn.volume_info(name, f"{name}p1").path == part
            wait(conn, conn.volume_upload(name, f"{name}p1", io.BytesIO(payload)).id)
            assert pread_direct(part, 0, len(payload)) == payload
            devs = {d.path: d for d in host_devices()}
            assert devs[dev].transport == "nbd" and devs[dev].size == 64 * MiB
            assert devs[dev].partition_table == "gpt" and devs[dev].partitions == [part]
            start = devs[part].start
            assert start is not None and start > 0
        finally:
            conn.pool_stop(name)
        disconnect(attach, dev)
    image = guest_view(conn, pool, "disk.qcow2")
    assert image[512:520] == b"EFI PART"
    assert image[start:start + len(payload)] == payload
