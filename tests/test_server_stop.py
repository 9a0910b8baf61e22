"""Stopping virtstored with SIGTERM or SIGINT while an event stream is open and a job
runs: the stream ends, the job finishes, the pid file and sockets go, one line is
logged."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import pytest

import virtstore
from conftest import dir_pool_xml
from server_fixtures import start_daemon
from virtstore.api.embedded import EmbeddedConnection

MiB = 1 << 20


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_with_an_event_stream_and_a_job(tmp_path: Path, signum: int) -> None:
    root, images = tmp_path / "state", tmp_path / "images"
    d = start_daemon(root)
    try:
        remote = virtstore.connect(d.rw_uri)
        pool = remote.define_pool(dir_pool_xml("images", images))
        pool.start(build=True)
        src = pool.create_volume("big.img", "6M", format="raw")
        with open(images / "big.img", "r+b") as fh:
            fh.write(b"z" * (6 * MiB))
        stream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stream.connect(str(d.rw_socket))
        stream.sendall(b"GET /v1/events HTTP/1.1\r\nHost: x\r\n"
                       b"Accept: text/event-stream\r\n\r\n")
        stream.settimeout(20)
        assert stream.recv(4096).startswith(b"HTTP/1.1 200")
        job = src.clone("copy.img", bandwidth="4M")  # about 1.5 s
        time.sleep(0.3)
        logged_before = len(d.log().splitlines())
        d.proc.send_signal(signum)
        assert d.proc.wait(30) == 0
        # The stream was closed by the daemon, not left hanging.
        while stream.recv(4096):
            pass
        stream.close()
    finally:
        d.stop()
    after = d.log().splitlines()[logged_before:]
    assert not any("Traceback" in line or "Error" in line for line in after), after
    said = [line for line in after if " DEBUG " not in line]
    assert len(said) == 1 and "virtstored: stopped on signal" in said[0], after
    assert not (d.sock_dir / "virtstored.pid").exists()
    assert not d.rw_socket.exists() and not d.ro_socket.exists()
    # The job was finished, not abandoned: the copy is whole.
    with EmbeddedConnection(str(root)) as conn:
        assert conn.job_info(job.id).state == "done"
    assert (images / "copy.img").read_bytes() == b"z" * (6 * MiB)
