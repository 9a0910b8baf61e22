"""virtstored with several worker processes: they share the limits, a dead worker is
replaced, the daemon stops (or dies) whole, and one daemon per state root still holds."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from server_fixtures import Daemon, read_response, start_daemon
from virtstore.server.http import Limits
from virtstore.server.workers import SharedCounts


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            out.append(int(entry))
    return sorted(out)


def _wait(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def _ask(path: Path) -> tuple[socket.socket, int]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(path))
    try:
        s.sendall(b"GET /v1/version HTTP/1.1\r\nHost: x\r\n\r\n")
    except OSError:
        pass  # refused: the daemon answered 503 and closed before the request was sent
    return s, read_response(s).status


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Daemon]:
    d = start_daemon(tmp_path / "state", "--workers", "2",
                     "--max-connections-per-peer", "2")
    _wait(lambda: len(_children(d.proc.pid)) == 2)
    yield d
    d.stop()


def test_workers_serve_and_share_the_per_peer_limit(workers: Daemon) -> None:
    held = [_ask(workers.ro_socket) for _ in range(3)]
    try:
        # Whichever worker took each connection, the third from one uid is refused.
        assert [status for _, status in held] == [200, 200, 503]
    finally:
        for s, _ in held:
            s.close()
    # Counted out again when they close, in whichever worker held them.
    _wait(lambda: _ask(workers.ro_socket)[1] == 200)


def test_a_dead_worker_is_replaced(workers: Daemon) -> None:
    first = _children(workers.proc.pid)
    os.kill(first[0], signal.SIGKILL)
    _wait(lambda: len(_children(workers.proc.pid)) == 2
          and first[0] not in _children(workers.proc.pid))
    assert _ask(workers.rw_socket)[1] == 200
    assert "starting another" in workers.log()


def test_one_daemon_per_root_with_workers(workers: Daemon) -> None:
    try:
        second = start_daemon(workers.root, "--socket-dir", str(workers.sock_dir),
                              "--workers", "2", sock_dir=workers.sock_dir)
    except RuntimeError as exc:
        assert "another virtstored" in str(exc)
    else:
        second.stop()
        pytest.fail("a second daemon started on the same root")
    assert _ask(workers.rw_socket)[1] == 200


def test_stop_and_kill_take_the_workers_along(workers: Daemon) -> None:
    kids = _children(workers.proc.pid)
    os.kill(workers.proc.pid, signal.SIGKILL)
    workers.proc.wait(10)
    # The kernel ends them with their supervisor: nothing keeps the sockets or the
    # state root's journal rows.
    _wait(lambda: not [k for k in kids if _alive(k)])
    again = start_daemon(workers.root, "--socket-dir", str(workers.sock_dir), "--workers",
                         "2", sock_dir=workers.sock_dir)
    try:
        assert _ask(again.rw_socket)[1] == 200
        kids = _children(again.proc.pid)
        assert again.stop() == 0
        assert not [k for k in kids if _alive(k)]
    finally:
        again.stop()


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:].split()[0] not in ("Z", "X")


def test_shared_counts_add_up_across_slots() -> None:
    counts = SharedCounts(Limits(total=8, rw_reserve=1, ro=4, tcp=4, per_peer=2), workers=2)
    counts.bind(0)
    assert counts.admit("unix-ro", "uid 5") is None
    counts.bind(1)
    assert counts.admit("unix-ro", "uid 5") is None
    assert "2 connections already open from uid 5" in (counts.admit("unix-ro", "uid 5")
                                                       or "")
    assert counts.admit("unix-ro", "uid 6") is None
    assert counts.active() == 3
    counts.clear(0)  # slot 0's worker died
    assert counts.active() == 2
    assert counts.admit("unix-ro", "uid 5") is None
    counts.release("unix-ro", "uid 5")
    counts.release("unix-ro", "uid 5")
    counts.release("unix-ro", "uid 6")
    assert counts.active() == 0


def test_ephemeral_secrets_are_known_to_every_worker(workers: Daemon) -> None:
    import virtstore

    uuid = "6a1c0c47-2e5e-4d0e-9a39-2f1b9d3f4c11"
    conn = virtstore.connect(workers.rw_uri)
    try:
        conn.secret_define_xml(f"<secret ephemeral='yes' private='no'><uuid>{uuid}</uuid>"
                               "<usage type='volume'><volume>/v/a.img</volume></usage>"
                               "</secret>")
        conn.secret_set_value(uuid, b"s3cret")
    finally:
        conn.close()
    # Each connection lands on whichever worker accepts it first.
    for _ in range(8):
        other = virtstore.connect(workers.rw_uri)
        try:
            assert other.secret_get_value(uuid) == b"s3cret"
            assert other.secret_info(uuid).ephemeral
        finally:
            other.close()
    conn = virtstore.connect(workers.rw_uri)
    conn.secret_undefine(uuid)
    conn.close()
    for _ in range(4):
        other = virtstore.connect(workers.rw_uri)
        try:
            assert uuid not in {s.uuid for s in other.list_secrets()}
        finally:
            other.close()


def test_a_child_inherited_through_exec_is_not_taken_for_a_worker(tmp_path: Path) -> None:
    # scripts/run execs virtstored from a shell that has a background job: the job is
    # then the daemon's child, and its end must not look like a worker's.
    d = start_daemon(tmp_path / "state", "--workers", "2",
                     wrap=("bash", "-c", '(sleep 1) & exec "$0" "$@"'))
    try:
        time.sleep(2.5)  # the sleep has ended and been reaped
        assert d.proc.poll() is None, d.log()
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(d.rw_socket))
            s.sendall(b"GET /v1/version HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(s).status == 200
        assert "Traceback" not in d.log() and "ended (" not in d.log()
    finally:
        assert d.stop() == 0
