"""NBD: volumes exported with qemu-nbd (unix socket and TCP, read-only or not) read back
by qemu-img, a remote NBD export used as a volume's backing, and the CLI command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from virtstore.api.embedded import EmbeddedConnection
from virtstore.engine.nbd import export_volume
from virtstore.errors import Busy
from virtstore.host.nbd import NbdClient, NbdError, NbdServer, parse_url

pytestmark = pytest.mark.skipif(subprocess.run(["which", "qemu-nbd"], capture_output=True)
                                .returncode != 0, reason="qemu-nbd (qemu-utils) is missing")
MiB = 1 << 20


def qemu_read(url: str, out: Path) -> bytes:
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", url, str(out)],
                   check=True, capture_output=True)
    return out.read_bytes()


def _make(conn: EmbeddedConnection, pool: str, name: str, data: bytes, fmt: str = "raw") -> None:
    import io

    conn.volume_create_xml(pool, f"<volume><name>{name}</name><capacity>{len(data)}</capacity>"
                                 f"<target><format type='{fmt}'/></target></volume>")
    job = conn.volume_upload(pool, name, io.BytesIO(data)) if fmt == "raw" else None
    if job is not None:
        assert conn.job_wait(job.id, 60).state == "done"


def test_export_on_unix_socket_reads_back(conn: EmbeddedConnection, pool: str,
                                          tmp_path: Path) -> None:
    data = os.urandom(2 * MiB) + bytes(MiB) + b"x" * MiB
    _make(conn, pool, "v.raw", data)
    sock = str(tmp_path / "v.sock")
    with export_volume(conn, pool, "v.raw", socket_path=sock, read_only=True) as exp:
        assert exp.url == f"nbd+unix:///v.raw?socket={sock}"
        assert qemu_read(exp.url, tmp_path / "out.raw") == data
        # a read-only export refuses writes, and the volume stays locked for writers
        w = subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 512", exp.url],
                           capture_output=True, text=True, check=False)
        assert w.returncode != 0 or "failed" in (w.stdout + w.stderr).lower()
        with pytest.raises(Busy):
            conn.volume_wipe(pool, "v.raw")
    # after the export the volume is free again
    assert conn.job_wait(conn.volume_wipe(pool, "v.raw").id, 30).state == "done"


def test_export_qcow2_over_tcp_is_the_guest_view(conn: EmbeddedConnection, pool: str,
                                                 pooldir: Path, tmp_path: Path) -> None:
    conn.volume_create_xml(pool, "<volume><name>q.qcow2</name><capacity unit='M'>4</capacity>"
                                 "<target><format type='qcow2'/></target></volume>")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 64k",
                    str(pooldir / "q.qcow2")], check=True, capture_output=True)
    with export_volume(conn, pool, "q.qcow2", host="127.0.0.1", export_name="disk") as exp:
        assert exp.url.startswith("nbd://127.0.0.1:") and exp.url.endswith("/disk")
        got = qemu_read(exp.url, tmp_path / "q.raw")
        assert len(got) == 4 * MiB
        assert got[MiB:MiB + 65536] == b"\x5a" * 65536 and got[:MiB] == bytes(MiB)
        # a writable export: writes land in the volume
        with NbdClient(parse_url(exp.url)) as c:
            assert c.size == 4 * MiB and not c.read_only
            c.pwrite(b"hello", 0)
            c.flush()
        with pytest.raises(Busy):
            export_volume(conn, pool, "q.qcow2", host="127.0.0.1")
    out = subprocess.run(["qemu-io", "-f", "qcow2", "-r", "-c", "read -P 0x68 0 1",
                          str(pooldir / "q.qcow2")], capture_output=True, text=True, check=True)
    assert "read 1/1 bytes" in out.stdout


def test_remote_export_as_a_volume(conn: EmbeddedConnection, pool: str, tmp_path: Path) -> None:
    """A remote NBD export used as a volume: a qcow2 overlay whose backing is the URL."""
    remote = tmp_path / "remote.raw"
    data = os.urandom(MiB) + bytes(MiB)
    remote.write_bytes(data)
    with NbdServer(str(remote), socket_path=str(tmp_path / "remote.sock"), export="r",
                   read_only=True) as srv:
        url = srv.address.url
        conn.volume_create_xml(pool, "<volume><name>over.qcow2</name>"
                                     f"<capacity>{len(data)}</capacity>"
                                     "<target><format type='qcow2'/></target>"
                                     f"<backingStore><path>{url}</path><format type='raw'/>"
                                     "</backingStore></volume>")
        vol = conn.volume_info(pool, "over.qcow2")
        out = tmp_path / "flat.raw"
        subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", vol.path, str(out)],
                       check=True, capture_output=True)
        assert out.read_bytes() == data
        assert url in conn.volume_xml(pool, "over.qcow2")


def test_cli_nbd_export(conn: EmbeddedConnection, pool: str, root: Path, tmp_path: Path) -> None:
    data = os.urandom(MiB)
    _make(conn, pool, "c.raw", data)
    sock = tmp_path / "cli.sock"
    exe = Path(sys.executable).parent / "virtstore"
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "virtstore.cli.main"]
    proc = subprocess.Popen([*argv, "--root", str(root), "nbd-export", "c.raw", "--pool", pool,
                             "--socket", str(sock), "--read-only"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line == f"nbd+unix:///c.raw?socket={sock}", proc.stderr.read() if proc.stderr else ""
        assert qemu_read(line, tmp_path / "c.out") == data
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 0
    deadline = time.monotonic() + 5
    while sock.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert conn.job_wait(conn.volume_wipe(pool, "c.raw").id, 30).state == "done"


def test_server_that_cannot_open_the_image_fails_to_start(tmp_path: Path) -> None:
    """qemu-nbd listens before it opens the image; an image it cannot open is a failed
    start with qemu's reason, not an export that vanishes at the first client."""
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"not a qcow2 image" + bytes(4096))
    server = NbdServer(str(bad), fmt="qcow2", socket_path=str(tmp_path / "bad.sock"))
    with pytest.raises(NbdError, match=r"could not serve the image: .*qcow2"):
        server.start()
    assert not server.running
