"""vol-move to another host: two real virtstored on this machine, the copy through the
target's API, checked there, then the source deleted; a refusal or a cancel leaves the
source and nothing on the target."""

from __future__ import annotations

import hashlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

import virtstore
from cli_fixtures import Cli, cli_fixture  # noqa: F401
from conftest import dir_pool_xml
from server_fixtures import (  # noqa: F401
    RW_TOKEN,
    Certs,
    Daemon,
    certs_fixture,
    start_daemon,
    tls_daemon_fixture,
    write_tokens,
)
from test_backup_move import raw_of
from test_backup_volumes import MiB, fill_chunks, qcow2
from virtstore.api import Connection
from virtstore.api.embedded import EmbeddedConnection
from virtstore.errors import AlreadyExists, Forbidden, NoSpace


def _pool(c: Connection, name: str, d: Path) -> Path:
    d.mkdir(exist_ok=True)
    c.pool_define_xml(dir_pool_xml(name, d))
    c.pool_start(name)
    return d


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[tuple[Daemon, Daemon]]:
    a = start_daemon(tmp_path / "a")
    try:
        b = start_daemon(tmp_path / "b")
    except BaseException:
        a.stop()
        raise
    yield a, b
    a.stop()
    b.stop()


class Pair(NamedTuple):
    src: Connection
    dst: Connection
    sdir: Path
    ddir: Path
    target: str


@pytest.fixture
def pair(hosts: tuple[Daemon, Daemon], tmp_path: Path) -> Iterator[Pair]:
    """Clients of both hosts, a dir pool 'src' on the first and 'dst' on the second."""
    a, b = hosts
    with virtstore.connect(a.rw_uri) as src, virtstore.connect(b.rw_uri) as dst:
        yield Pair(src, dst, _pool(src, "src", tmp_path / "src"),
                   _pool(dst, "dst", tmp_path / "dst"), b.rw_uri)


def test_move_to_another_host(pair: Pair) -> None:
    src, dst, sdir, ddir, target = pair
    qcow2(src, "src", "g.qcow2", 40 * MiB)  # type: ignore[arg-type]
    fill_chunks(sdir / "g.qcow2", 1, 3, 40)
    fill_chunks(sdir / "g.qcow2", 8, 1, 90)
    want = raw_of(sdir / "g.qcow2", "qcow2")
    job = src.volume_move("src", "g.qcow2", "dst", target=target)
    info = src.job_wait(job.id)
    assert info.state == "done", info.error
    assert info.kind == "move" and info.bytes_done == info.bytes_total == 2 * 16 * MiB
    assert (info.target_pool, info.target_volume) == ("dst", "g.qcow2")
    assert src.list_volumes("src") == []
    assert not (sdir / "g.qcow2").exists()
    assert dst.volume_info("dst", "g.qcow2").format == "qcow2"
    assert raw_of(ddir / "g.qcow2", "qcow2") == want
    # Holes stayed holes: only the data was written there.
    assert dst.volume_info("dst", "g.qcow2").allocation < 24 * MiB
    # What the check compared: the target's hashes of its chunks that hold data.
    got = dst.volume_chunk_hashes("dst", "g.qcow2", offset=8 * MiB, length=28 * MiB)
    assert got["chunks"] == {str(i): hashlib.sha256(want[i * 4 * MiB:(i + 1) * 4 * MiB])
                             .hexdigest() for i in (2, 3, 8)}


def test_refused_before_anything_is_copied(pair: Pair, tmp_path: Path) -> None:
    src, dst, sdir, ddir, target = pair
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(small)], check=True)
    try:
        _pool(dst, "small", small)
        src.volume_create_xml("src", "<volume><name>v.img</name>"
                              "<capacity unit='M'>32</capacity>"
                              "<allocation>0</allocation></volume>")
        with open(sdir / "v.img", "r+b") as fh:
            fh.write(b"\x5a" * (12 * MiB))
        before = (sdir / "v.img").read_bytes()
        dst.volume_create_xml("dst", "<volume><name>v.img</name><capacity unit='M'>1</capacity>"
                              "</volume>")
        with pytest.raises(AlreadyExists, match=r"'v\.img' exists already in pool 'dst'"):
            src.volume_move("src", "v.img", "dst", target=target)
        with pytest.raises(NoSpace, match=r"pool 'small' has \d+ bytes free, \d+ needed"):
            src.volume_move("src", "v.img", "small", target=target)
        assert [v.name for v in src.list_volumes("src")] == ["v.img"]
        assert (sdir / "v.img").read_bytes() == before
        assert [v.name for v in dst.list_volumes("small")] == []
        assert [p.name for p in small.iterdir()] == []
        assert (ddir / "v.img").stat().st_size == MiB
        assert src.list_jobs() == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_cancelled_move_leaves_nothing_on_the_target(pair: Pair) -> None:
    src, dst, sdir, ddir, target = pair
    qcow2(src, "src", "g.qcow2", 32 * MiB)  # type: ignore[arg-type]
    fill_chunks(sdir / "g.qcow2", 0, 6, 9)
    job = src.volume_move("src", "g.qcow2", "dst", target=target, bandwidth=4 * MiB)
    deadline = time.monotonic() + 30
    while src.job_info(job.id).bytes_done == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    src.job_cancel(job.id)
    assert src.job_wait(job.id).state == "cancelled"
    # The target sees its stream cut: its job fails and discards what it received.
    deadline = time.monotonic() + 30
    while any(not j.finished for j in dst.list_jobs()) and time.monotonic() < deadline:
        time.sleep(0.05)
    [received] = dst.list_jobs()
    assert (received.kind, received.state) == ("receive", "failed")
    assert dst.list_volumes("dst") == []
    assert [p.name for p in ddir.iterdir()] == []
    assert [v.name for v in src.list_volumes("src")] == ["g.qcow2"]
    assert src.volume_info("src", "g.qcow2").format == "qcow2"


def test_move_from_the_embedded_engine_through_the_cli(
        pair: Pair, conn: EmbeddedConnection, pool: str, pooldir: Path, cli: Cli,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The copy is checked in several calls of the target: one per chunk of data here.
    monkeypatch.setattr("virtstore.backup.move._CHECK_STEP", 1)
    conn.volume_create_xml(pool, "<volume><name>r.img</name><capacity unit='M'>12</capacity>"
                           "<allocation>0</allocation></volume>")
    with open(pooldir / "r.img", "r+b") as fh:
        fh.seek(3 * MiB)
        fh.write(b"abc" * MiB)
    want = (pooldir / "r.img").read_bytes()
    r = cli("vol-move", "r.img", "--pool", pool, "--to-pool", "dst", "--name", "s.raw",
            "--format", "raw", "--target", pair.target)
    assert f"Vol r.img moved from pool {pool} to pool dst of {pair.target} as s.raw" in r.out
    assert (pair.ddir / "s.raw").read_bytes() == want
    assert not (pooldir / "r.img").exists()


def test_https_target_with_the_engines_own_credentials(
        tls_daemon: Daemon, certs: Certs, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The source daemon reaches the target with the token and CA of its environment.
    monkeypatch.setenv("VIRTSTORE_TOKEN", RW_TOKEN)
    monkeypatch.setenv("VIRTSTORE_CA", str(certs.ca))
    a = start_daemon(tmp_path / "a")
    try:
        with virtstore.connect(a.rw_uri) as src, virtstore.connect(tls_daemon.https_uri) as dst:
            sdir = _pool(src, "src", tmp_path / "src")
            ddir = _pool(dst, "dst", tmp_path / "dst")
            src.volume_create_xml("src", "<volume><name>v.img</name>"
                                  "<capacity unit='M'>8</capacity></volume>")
            (sdir / "v.img").write_bytes(b"\x01" * (8 * MiB))
            job = src.volume_move("src", "v.img", "dst", target=tls_daemon.https_uri)
            assert src.job_wait(job.id).state == "done"
            assert (ddir / "v.img").read_bytes() == b"\x01" * (8 * MiB)
            assert src.list_volumes("src") == []
            # A caller over TCP cannot have the daemon act as root on a local socket.
            with pytest.raises(Forbidden, match="unix:// target is for local callers"):
                dst.volume_move("dst", "v.img", "x", target=a.rw_uri)
            assert [v.name for v in dst.list_volumes("dst")] == ["v.img"]
    finally:
        a.stop()


def test_remote_callers_move_only_to_the_configured_targets(
        tls_daemon: Daemon, certs: Certs, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The daemon takes its own token to the target: a caller over TCP may name only the
    # hosts of its move_targets, lest the token go to a host of the caller's choosing.
    monkeypatch.setenv("VIRTSTORE_TOKEN", RW_TOKEN)
    monkeypatch.setenv("VIRTSTORE_CA", str(certs.ca))
    c = start_daemon(tmp_path / "c", "--listen", "127.0.0.1:0", "--tls-cert",
                     str(certs.server_cert), "--tls-key", str(certs.server_key), "--tokens",
                     str(write_tokens(tmp_path / "tokens-c")), "--remote-pool-root",
                     str(tmp_path), "--move-target", tls_daemon.https_uri)
    try:
        with virtstore.connect(c.https_uri) as src, \
                virtstore.connect(tls_daemon.https_uri) as dst:
            sdir = _pool(src, "src", tmp_path / "src")
            ddir = _pool(dst, "dst", tmp_path / "dst")
            src.volume_create_xml("src", "<volume><name>v.img</name>"
                                  "<capacity unit='M'>4</capacity></volume>")
            (sdir / "v.img").write_bytes(b"\x02" * (4 * MiB))
            for elsewhere in ("https://127.0.0.2:1", f"https://localhost:{tls_daemon.tcp_port}"):
                with pytest.raises(Forbidden, match="not a move target remote callers"):
                    src.volume_move("src", "v.img", "dst", target=elsewhere)
            assert (sdir / "v.img").exists() and not (ddir / "v.img").exists()
            job = src.volume_move("src", "v.img", "dst", target=tls_daemon.https_uri)
            assert src.job_wait(job.id).state == "done"
            assert (ddir / "v.img").read_bytes() == b"\x02" * (4 * MiB)
            assert not (sdir / "v.img").exists()
    finally:
        c.stop()
