"""Jobs through the embedded engine: clone, convert, resize, wipe, upload, download and
snapshots on real files; locks, cancel, kills and full disks."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import dir_pool_xml, qemu_info
from data_fixtures import chunks_layout, digest, loop_fs, make_sparse
from virtstore.api import VolumeCreateArgs
from virtstore.api.embedded import EmbeddedConnection
from virtstore.errors import Busy, InvalidArgument, NoSuchVolume, Unsupported

MiB = 1024 * 1024
GiB = 1024 * MiB


def sparse_volume(conn: EmbeddedConnection, pool: str, pooldir: Path, name: str,
                  size: int = GiB, chunks: int = 16, length: int = 4 * MiB) -> Path:
    path = pooldir / name
    make_sparse(path, size, chunks_layout(size, chunks, length))
    conn.pool_refresh(pool)
    return path


def done(conn: EmbeddedConnection, job_id: str) -> None:
    info = conn.job_wait(job_id)
    assert info.state == "done", info.error


def test_clone_keeps_holes_and_bytes(conn: EmbeddedConnection, pool: str, pooldir: Path) -> None:
    src = sparse_volume(conn, pool, pooldir, "src.img")
    job = conn.volume_clone(pool, "src.img", "dst.img")
    assert job.kind == "clone" and job.target_volume == "dst.img"
    done(conn, job.id)
    dst = pooldir / "dst.img"
    assert digest(dst) == digest(src)
    assert dst.stat().st_size == GiB
    assert dst.stat().st_blocks * 512 <= src.stat().st_blocks * 512 + MiB
    info = conn.job_info(job.id)
    assert info.bytes_done == info.bytes_total > 0
    assert conn.volume_info(pool, "dst.img").capacity == GiB
    assert not [n for n in os.listdir(pooldir) if n.startswith(".virtstore-")]


def test_clone_across_pools_and_formats(conn: EmbeddedConnection, pool: str, pooldir: Path,
                                        tmp_path: Path) -> None:
    src = sparse_volume(conn, pool, pooldir, "src.img", size=64 * MiB, chunks=4,
                        length=MiB)
    other = tmp_path / "other"
    other.mkdir()
    conn.pool_create_xml(dir_pool_xml("other", other))
    done(conn, conn.volume_clone(pool, "src.img", "copy.qcow2", target_pool="other",
                                 format="qcow2").id)
    info = qemu_info(other / "copy.qcow2")
    assert info["format"] == "qcow2" and info["virtual-size"] == 64 * MiB
    back = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(src),
                           str(other / "copy.qcow2")], capture_output=True, text=True)
    assert back.returncode == 0, back.stdout + back.stderr
    # A linked clone is an overlay on the source: no data copied.
    done(conn, conn.volume_clone(pool, "src.img", "linked", linked=True).id)
    linked = qemu_info(pooldir / "linked")
    assert linked["backing-filename"] == str(src)
    assert linked["backing-filename-format"] == "raw"


def test_clone_reflink_on_xfs(conn: EmbeddedConnection, tmp_path: Path) -> None:
    with loop_fs(tmp_path, "xfs", "2G") as mnt:
        conn.pool_create_xml(dir_pool_xml("x", mnt))
        size = 10 * GiB
        path = mnt / "big.img"
        with open(path, "wb") as fh:
            fh.truncate(size)
            os.posix_fallocate(fh.fileno(), 0, 256 * MiB)
            fh.write(b"marker" * 1000)
        conn.pool_refresh("x")
        before = os.statvfs(mnt).f_bfree
        done(conn, conn.volume_clone("x", "big.img", "clone.img", reflink=True).id)
        after = os.statvfs(mnt).f_bfree
        assert (before - after) * os.statvfs(mnt).f_frsize < 16 * MiB  # extents shared
        assert digest(mnt / "clone.img", 0, 64 * MiB) == digest(path, 0, 64 * MiB)
        conn.pool_stop("x")


def test_reflink_refused_where_impossible(conn: EmbeddedConnection, pool: str,
                                          pooldir: Path) -> None:
    sparse_volume(conn, pool, pooldir, "src.img", size=8 * MiB, chunks=1, length=MiB)
    fs = subprocess.run(["stat", "-f", "-c", "%T", str(pooldir)], capture_output=True,
                        text=True).stdout.strip()
    if fs in ("xfs", "btrfs"):
        pytest.skip(f"the test directory is on {fs}, which can reflink")
    info = conn.job_wait(conn.volume_clone(pool, "src.img", "r.img", reflink=True).id)
    assert info.state == "failed" and info.error_code == Unsupported.code
    assert not (pooldir / "r.img").exists()
    with pytest.raises(NoSuchVolume):
        conn.volume_info(pool, "r.img")


def test_locks_per_volume_not_per_pool(conn: EmbeddedConnection, pool: str,
                                       pooldir: Path) -> None:
    sparse_volume(conn, pool, pooldir, "src.img", size=64 * MiB, chunks=1, length=32 * MiB)
    conn.volume_create(pool, VolumeCreateArgs("other.img", MiB))
    job = conn.volume_clone(pool, "src.img", "slow.img", bandwidth=4 * MiB)
    try:
        with pytest.raises(Busy):
            conn.volume_delete(pool, "src.img")
        with pytest.raises(Busy):
            conn.volume_wipe(pool, "src.img")
        with pytest.raises(Busy):
            conn.volume_resize(pool, "src.img", 128 * MiB)
        # Everything else goes on: listing, refresh, other volumes.
        conn.pool_refresh(pool)
        assert "slow.img" not in [v.name for v in conn.list_volumes(pool)]
        conn.volume_delete(pool, "other.img")
        done(conn, conn.volume_clone(pool, "src.img", "reader2.img").id)  # a second reader
    finally:
        conn.job_cancel(job.id)
    info = conn.job_wait(job.id)
    assert info.state == "cancelled"
    assert not (pooldir / "slow.img").exists()
    assert not [n for n in os.listdir(pooldir) if n.startswith(".virtstore-")]
    conn.volume_delete(pool, "src.img")  # the lock went with the job


def test_resize_rules(conn: EmbeddedConnection, pool: str, pooldir: Path) -> None:
    conn.volume_create(pool, VolumeCreateArgs("r.img", 10 * MiB, allocation=0))
    done(conn, conn.volume_resize(pool, "r.img", 20 * MiB).id)
    assert (pooldir / "r.img").stat().st_size == 20 * MiB
    with pytest.raises(InvalidArgument, match="unless shrink flag explicitly specified"):
        conn.volume_resize(pool, "r.img", 5 * MiB)
    done(conn, conn.volume_resize(pool, "r.img", 5 * MiB, shrink=True).id)
    assert conn.volume_info(pool, "r.img").capacity == 5 * MiB
    done(conn, conn.volume_resize(pool, "r.img", 3 * MiB, delta=True).id)
    assert (pooldir / "r.img").stat().st_size == 8 * MiB
    done(conn, conn.volume_resize(pool, "r.img", 8 * MiB, delta=True, allocate=True).id)
    assert (pooldir / "r.img").stat().st_blocks * 512 >= 8 * MiB
    conn.volume_create(pool, VolumeCreateArgs("q.qcow2", 10 * MiB, format="qcow2"))
    done(conn, conn.volume_resize(pool, "q.qcow2", GiB).id)
    assert qemu_info(pooldir / "q.qcow2")["virtual-size"] == GiB
    conn.volume_create(pool, VolumeCreateArgs("v.vdi", 10 * MiB, format="vdi"))
    with pytest.raises(Unsupported):
        conn.volume_resize(pool, "v.vdi", GiB)


def test_wipe_zero_keeps_sparse(conn: EmbeddedConnection, pool: str, pooldir: Path) -> None:
    path = sparse_volume(conn, pool, pooldir, "w.img", size=256 * MiB, chunks=4, length=MiB)
    done(conn, conn.volume_wipe(pool, "w.img", "zero").id)
    with open(path, "rb") as fh:
        assert not any(fh.read())
    assert path.stat().st_size == 256 * MiB and path.stat().st_blocks * 512 <= 4 * MiB
    with pytest.raises(InvalidArgument, match="unknown wipe algorithm"):
        conn.volume_wipe(pool, "w.img", "shred-it")


def test_wipe_qcow2_keeps_format(conn: EmbeddedConnection, pool: str, pooldir: Path) -> None:
    conn.volume_create(pool, VolumeCreateArgs("q.qcow2", 32 * MiB, format="qcow2"))
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xab 0 1M",
                    str(pooldir / "q.qcow2")], check=True, capture_output=True)
    done(conn, conn.volume_wipe(pool, "q.qcow2", "zero").id)
    assert qemu_info(pooldir / "q.qcow2")["virtual-size"] == 32 * MiB
    read = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0 0 1M",
                           str(pooldir / "q.qcow2")], capture_output=True, text=True)
    assert read.returncode == 0 and "Pattern verification failed" not in read.stdout


def test_upload_download_round_trip(conn: EmbeddedConnection, pool: str, pooldir: Path,
                                    tmp_path: Path) -> None:
    conn.volume_create(pool, VolumeCreateArgs("u.img", 64 * MiB, allocation=0))
    local = tmp_path / "local.img"
    make_sparse(local, 64 * MiB, chunks_layout(64 * MiB, 8, 2 * MiB))
    with open(local, "rb") as fh:
        done(conn, conn.volume_upload(pool, "u.img", fh).id)
    vol = pooldir / "u.img"
    assert digest(vol) == digest(local)
    assert vol.stat().st_blocks * 512 <= 17 * MiB
    out = tmp_path / "out.img"
    with open(out, "wb") as fh:
        done(conn, conn.volume_download(pool, "u.img", fh).id)
    assert digest(out) == digest(local) and out.stat().st_blocks * 512 <= 17 * MiB
    # A partial upload changes only its range.
    done(conn, conn.volume_upload(pool, "u.img", io.BytesIO(b"\x11" * 4096),
                                  offset=MiB).id)
    with open(vol, "rb") as fh:
        fh.seek(MiB)
        assert fh.read(4096) == b"\x11" * 4096
    assert digest(vol, 2 * MiB) == digest(local, 2 * MiB)


def _qemu_io(path: str, command: str) -> str:
    out = subprocess.run(["qemu-io", "-f", "qcow2", "-c", command, path],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _reads(path: str, pattern: int) -> bool:
    return "Pattern verification failed" not in _qemu_io(path, f"read -P {pattern} 0 64k")


def test_snapshots_qcow2_internal(conn: EmbeddedConnection, pool: str, pooldir: Path) -> None:
    conn.volume_create(pool, VolumeCreateArgs("s.qcow2", 16 * MiB, format="qcow2"))
    path = str(pooldir / "s.qcow2")
    _qemu_io(path, "write -P 1 0 64k")
    conn.volume_snapshot_create(pool, "s.qcow2", "one")
    _qemu_io(path, "write -P 2 0 64k")
    assert [(s.name, s.kind) for s in conn.volume_snapshot_list(pool, "s.qcow2")] == [
        ("one", "internal")]
    conn.volume_snapshot_revert(pool, "s.qcow2", "one")
    assert _reads(path, 1)
    conn.volume_snapshot_delete(pool, "s.qcow2", "one")
    assert conn.volume_snapshot_list(pool, "s.qcow2") == []


def test_snapshots_qcow2_external(conn: EmbeddedConnection, pool: str, pooldir: Path) -> None:
    conn.volume_create(pool, VolumeCreateArgs("e.qcow2", 16 * MiB, format="qcow2"))
    path = str(pooldir / "e.qcow2")
    _qemu_io(path, "write -P 1 0 64k")
    conn.volume_snapshot_create(pool, "e.qcow2", "a", external=True)
    _qemu_io(path, "write -P 2 0 64k")
    conn.volume_snapshot_create(pool, "e.qcow2", "b", external=True)
    _qemu_io(path, "write -P 3 0 64k")
    snaps = conn.volume_snapshot_list(pool, "e.qcow2")
    assert [(s.name, s.kind) for s in snaps] == [("a", "external"), ("b", "external")]
    with pytest.raises(Exception, match="only the newest"):
        conn.volume_snapshot_revert(pool, "e.qcow2", "a")
    conn.volume_snapshot_revert(pool, "e.qcow2", "b")
    assert _reads(path, 2)
    conn.volume_snapshot_delete(pool, "e.qcow2", "a")  # an inner layer: rebased away
    assert _reads(path, 2)
    conn.volume_snapshot_delete(pool, "e.qcow2", "b")  # the top layer: merged
    assert _reads(path, 2) and "backing-filename" not in qemu_info(path)
    assert conn.volume_snapshot_list(pool, "e.qcow2") == []
    assert [v.name for v in conn.list_volumes(pool)] == ["e.qcow2"]
    assert not [n for n in os.listdir(pooldir) if n.startswith(".virtstore-")]


def test_snapshots_raw_by_reflink(conn: EmbeddedConnection, tmp_path: Path) -> None:
    with loop_fs(tmp_path, "xfs", "1G") as mnt:
        conn.pool_create_xml(dir_pool_xml("x", mnt))
        conn.volume_create("x", VolumeCreateArgs("r.img", 8 * MiB))
        (mnt / "r.img").write_bytes(b"A" * 8 * MiB)
        conn.volume_snapshot_create("x", "r.img", "before")
        (mnt / "r.img").write_bytes(b"B" * 8 * MiB)
        conn.volume_snapshot_revert("x", "r.img", "before")
        assert (mnt / "r.img").read_bytes() == b"A" * 8 * MiB
        conn.volume_delete("x", "r.img")
        assert os.listdir(mnt) == []  # the snapshot file went with the volume
        conn.pool_stop("x")


def test_events_seen_by_another_connection(conn: EmbeddedConnection, root: Path,
                                           pooldir: Path) -> None:
    watcher = EmbeddedConnection(str(root))
    start = watcher.latest_event_id()
    conn.pool_define_xml(dir_pool_xml("ev", pooldir))
    conn.pool_start("ev")
    conn.volume_create("ev", VolumeCreateArgs("e.img", MiB))
    done(conn, conn.volume_clone("ev", "e.img", "e2.img").id)
    conn.volume_delete("ev", "e2.img")
    seen = [(e.kind, e.action, e.name) for e in watcher.events_since(start, timeout=1)]
    watcher.close()
    assert ("pool", "defined", "ev") in seen and ("pool", "started", "ev") in seen
    assert ("volume", "created", "e.img") in seen and ("volume", "deleted", "e2.img") in seen
    assert any(k == "job" and a == "done" for k, a, _ in seen)


def test_full_disk_leaves_nothing(conn: EmbeddedConnection, tmp_path: Path) -> None:
    with loop_fs(tmp_path, "ext4", "64M") as mnt:
        src_dir = tmp_path / "src"
        src_dir.mkdir()
        conn.pool_create_xml(dir_pool_xml("src", src_dir))
        conn.pool_create_xml(dir_pool_xml("small", mnt))
        make_sparse(src_dir / "big.img", 256 * MiB, [(0, 128 * MiB)])
        conn.pool_refresh("src")
        before = digest(src_dir / "big.img")
        info = conn.job_wait(conn.volume_clone("src", "big.img", "big.img",
                                               target_pool="small").id)
        assert info.state == "failed" and info.error_code == "no-space", info.error
        assert [n for n in os.listdir(mnt) if n != "lost+found"] == []
        assert digest(src_dir / "big.img") == before
        with pytest.raises(NoSuchVolume):
            conn.volume_info("small", "big.img")
        conn.pool_stop("small")


KILL_CHILD = textwrap.dedent("""
    import io, os, sys, time
    from virtstore.api.embedded import EmbeddedConnection
    root, pool, op = sys.argv[1:4]
    c = EmbeddedConnection(root)
    if op == "clone":
        job = c.volume_clone(pool, "src.img", "dst.img", bandwidth=8 << 20)
    elif op == "upload":
        job = c.volume_upload(pool, "victim.img", open(sys.argv[4], "rb"), bandwidth=8 << 20)
    else:
        job = c.volume_wipe(pool, "victim.img", "random", bandwidth=8 << 20)
    while c.job_info(job.id).bytes_done == 0:
        time.sleep(0.02)
    print(job.id, flush=True)
    time.sleep(60)
""")


@pytest.mark.parametrize("op", ["clone", "upload"])
def test_sigkill_mid_job(conn: EmbeddedConnection, pool: str, pooldir: Path, root: Path,
                         tmp_path: Path, op: str) -> None:
    src = sparse_volume(conn, pool, pooldir, "src.img", size=64 * MiB, chunks=1,
                        length=64 * MiB)
    victim = pooldir / "victim.img"
    victim.write_bytes(b"\x42" * 64 * MiB)
    conn.pool_refresh(pool)
    before = {p: digest(pooldir / p) for p in ("src.img", "victim.img")}
    child = subprocess.Popen([sys.executable, "-c", KILL_CHILD, str(root), pool, op, str(src)],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    job_id = child.stdout.readline().strip()
    assert job_id, "the child did not start its job"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    time.sleep(0.1)
    with EmbeddedConnection(str(root)) as fresh:
        info = fresh.job_info(job_id)
        assert info.state == "failed" and "interrupted" in (info.error or "")
        assert not [n for n in os.listdir(pooldir) if n.startswith(".virtstore-")]
        names = [v.name for v in fresh.list_volumes(pool)]
        assert "dst.img" not in names and not (pooldir / "dst.img").exists()
        for p, d in before.items():
            assert digest(pooldir / p) == d, f"{p} changed"
        fresh.volume_delete(pool, "victim.img")  # no stale lock
