"""vol-move: copy into another pool, check, delete the source, as one job; all or
nothing when a step fails. Dir pools in temporary directories and the real one-node
Ceph cluster."""

from __future__ import annotations

import hashlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli_fixtures import Cli, cli_fixture  # noqa: F401
from conftest import dir_pool_xml
from net_fixtures import Server, ceph_fixture  # noqa: F401
from server_fixtures import Daemon, daemon_fixture  # noqa: F401
from test_backend_rbd import ceph, download, rconn, rpool  # noqa: F401
from test_backup_volumes import MiB, done, fill_chunks, qcow2
from virtstore import connect
from virtstore.api import VolumeCreateArgs
from virtstore.api.embedded import EmbeddedConnection
from virtstore.errors import AlreadyExists


def raw_of(img: Path, fmt: str) -> bytes:
    out = img.with_name(img.name + ".raw")
    subprocess.run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", str(img), str(out)],
                   check=True)
    try:
        return out.read_bytes()
    finally:
        out.unlink()


@pytest.fixture
def other(conn: EmbeddedConnection, tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "other"
    d.mkdir()
    conn.pool_define_xml(dir_pool_xml("other", d))
    conn.pool_start("other")
    yield d


def test_move_converts_and_deletes_the_source(conn: EmbeddedConnection, pool: str,
                                              pooldir: Path, other: Path) -> None:
    qcow2(conn, pool, "g.qcow2", 24 * MiB)
    fill_chunks(pooldir / "g.qcow2", 1, 3, 40)
    want = raw_of(pooldir / "g.qcow2", "qcow2")
    job = conn.volume_move(pool, "g.qcow2", "other", new_name="g.img", format="raw")
    done(conn, job.id)
    info = conn.job_info(job.id)
    assert info.kind == "move" and info.bytes_done == info.bytes_total == 2 * 12 * MiB
    assert [v.name for v in conn.list_volumes(pool)] == []
    assert not (pooldir / "g.qcow2").exists()
    assert conn.volume_info("other", "g.img").format == "raw"
    assert (other / "g.img").read_bytes() == want
    # The name is taken in the target pool: refused before anything happens.
    qcow2(conn, pool, "g.img", 8 * MiB)
    with pytest.raises(AlreadyExists):
        conn.volume_move(pool, "g.img", "other")
    assert {v.name for v in conn.list_volumes(pool)} == {"g.img"}


def test_a_source_that_cannot_be_deleted_stays_and_the_copy_goes(
        conn: EmbeddedConnection, pool: str, pooldir: Path, other: Path) -> None:
    qcow2(conn, pool, "g.qcow2", 16 * MiB)
    fill_chunks(pooldir / "g.qcow2", 0, 2, 5)
    before = hashlib.sha256((pooldir / "g.qcow2").read_bytes()).hexdigest()
    subprocess.run(["chattr", "+i", str(pooldir)], check=True)
    try:
        info = conn.job_wait(conn.volume_move(pool, "g.qcow2", "other").id)
    finally:
        subprocess.run(["chattr", "-i", str(pooldir)], check=True)
    assert info.state == "failed"
    assert "Operation not permitted" in (info.error or ""), info.error
    assert [v.name for v in conn.list_volumes("other")] == []
    assert [p.name for p in other.iterdir()] == []
    assert [v.name for v in conn.list_volumes(pool)] == ["g.qcow2"]
    assert hashlib.sha256((pooldir / "g.qcow2").read_bytes()).hexdigest() == before


def test_cancelled_move_changes_nothing(conn: EmbeddedConnection, pool: str, pooldir: Path,
                                        other: Path) -> None:
    qcow2(conn, pool, "g.qcow2", 32 * MiB)
    fill_chunks(pooldir / "g.qcow2", 0, 6, 9)
    job = conn.volume_move(pool, "g.qcow2", "other", bandwidth=4 * MiB)
    deadline = time.monotonic() + 30
    while conn.job_info(job.id).bytes_done == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    conn.job_cancel(job.id)
    assert conn.job_wait(job.id).state == "cancelled"
    assert [p.name for p in other.iterdir()] == []
    assert [v.name for v in conn.list_volumes(pool)] == ["g.qcow2"]
    assert conn.volume_info(pool, "g.qcow2").format == "qcow2"


def test_move_into_rbd_through_the_cli(rconn: EmbeddedConnection, rpool: str,  # noqa: F811
                                       pool: str, pooldir: Path, cli: Cli) -> None:
    qcow2(rconn, pool, "g.qcow2", 16 * MiB)
    fill_chunks(pooldir / "g.qcow2", 2, 1, 77)
    want = raw_of(pooldir / "g.qcow2", "qcow2")
    r = cli("vol-move", "g.qcow2", "--pool", pool, "--to-pool", rpool, "--name", "g")
    assert f"Vol g.qcow2 moved from pool {pool} to pool {rpool} as g" in r.out
    assert download(rconn, rpool, "g") == want
    assert not (pooldir / "g.qcow2").exists()


def test_move_and_migrate_info_over_rest(daemon: Daemon, tmp_path: Path) -> None:
    """The remote client's calls and the server's routes come from one declaration."""
    a, b = tmp_path / "a", tmp_path / "b"
    with connect(daemon.rw_uri) as c:
        for d in (a, b):
            d.mkdir()
            c.pool_define_xml(dir_pool_xml(d.name, d))
            c.pool_start(d.name)
        c.volume_create("a", VolumeCreateArgs("v.img", 16 * MiB, allocation=0))
        with open(a / "v.img", "r+b") as fh:
            fh.seek(4 * MiB)
            fh.write(b"z" * (3 * MiB))
        info = c.volume_migrate_info("a", "v.img")
        assert (info["storage"], info["format"], info["capacity"]) == ("", "raw", 16 * MiB)
        assert 3 * MiB <= info["required"] < 4 * MiB
        job = c.volume_move("a", "v.img", "b", new_name="w.img")
        assert c.job_wait(job.id).state == "done"
        assert [v.name for v in c.list_volumes("a")] == []
        assert (b / "w.img").read_bytes() == bytes(4 * MiB) + b"z" * (3 * MiB) + bytes(9 * MiB)
