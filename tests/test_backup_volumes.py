"""vol-backup, vol-restore and backup-verify on real dir pools, qcow2 images written
with qemu-io and raw files written directly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from virtstore.api import VolumeCreateArgs
from virtstore.api.embedded import EmbeddedConnection

MiB = 1024 * 1024
CHUNK = 4 * MiB


def done(conn: EmbeddedConnection, job_id: str) -> None:
    info = conn.job_wait(job_id)
    assert info.state == "done", info.error


def qcow2(conn: EmbeddedConnection, pool: str, name: str, size: int) -> None:
    """A qcow2 v3 volume: persistent bitmaps need compat 1.1."""
    conn.volume_create_xml(pool, f"<volume><name>{name}</name><capacity>{size}</capacity>"
                           "<target><format type='qcow2'/><compat>1.1</compat></target>"
                           "</volume>")


def qemu_io(path: Path, *cmds: str) -> None:
    argv = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        argv += ["-c", c]
    subprocess.run([*argv, str(path)], check=True, capture_output=True)


def fill_chunks(path: Path, first: int, count: int, pattern: int) -> None:
    """``count`` 4 MiB chunks from chunk ``first``, each with its own byte pattern so
    that no two chunks are alike (the store would keep one copy of equal chunks)."""
    qemu_io(path, *(f"write -P {(pattern + k) % 256} {(first + k) * CHUNK} {CHUNK}"
                    for k in range(count)))


def backed_up(conn: EmbeddedConnection, pool: str, pooldir: Path, tmp_path: Path,
              chunks: int = 4) -> tuple[Path, Path]:
    """A 64 MiB qcow2 volume g.qcow2 with ``chunks`` chunks of data, and the directory
    holding its full backup."""
    qcow2(conn, pool, "g.qcow2", 64 * MiB)
    img = pooldir / "g.qcow2"
    fill_chunks(img, 0, chunks, 1)
    bdir = tmp_path / "bk"
    done(conn, conn.volume_backup(pool, "g.qcow2", str(bdir)).id)
    return img, bdir


def same(a: Path, b: Path, fa: str, fb: str) -> bool:
    r = subprocess.run(["qemu-img", "compare", "-f", fa, "-F", fb, str(a), str(b)],
                       capture_output=True, text=True)
    return r.returncode == 0


def chunk_files(d: Path) -> list[Path]:
    return [p for p in (d / "chunks").rglob("*") if p.is_file() and not p.name.startswith(".")]


def manifests(conn: EmbeddedConnection, d: Path) -> list[dict[str, Any]]:
    return conn.backup_list(str(d))


def to_raw(src: Path, dst: Path) -> None:
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(src), str(dst)], check=True)


def test_qcow2_full_then_incremental_writes_only_changed_chunks(
        conn: EmbeddedConnection, pool: str, pooldir: Path, tmp_path: Path) -> None:
    qcow2(conn, pool, "g.qcow2", 256 * MiB)
    img = pooldir / "g.qcow2"
    fill_chunks(img, 0, 24, 1)  # 96 MiB of data, the rest unallocated
    bdir = tmp_path / "bk"
    done(conn, conn.volume_backup(pool, "g.qcow2", str(bdir)).id)
    [full] = manifests(conn, bdir)
    assert full["kind"] == "full" and full["tracking"] == "qcow2-bitmap"
    assert full["stats"]["chunks_written"] == 24
    assert len(chunk_files(bdir)) == 24
    point1 = tmp_path / "point1.raw"
    to_raw(img, point1)

    fill_chunks(img, 8, 16, 100)  # 64 MiB changed, inside the data
    done(conn, conn.volume_backup(pool, "g.qcow2", str(bdir), incremental=True).id)
    full, inc = manifests(conn, bdir)
    assert inc["kind"] == "incremental" and inc["parent"] == full["id"]
    assert inc["warnings"] == []
    stats = inc["stats"]
    assert stats["chunks_read"] == 16 and stats["chunks_written"] == 16
    assert stats["bytes_written"] == 64 * MiB
    assert len(chunk_files(bdir)) == 40
    # One bitmap per chain: the newest backup's.
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(img)],
                                     check=True, capture_output=True, text=True).stdout)
    names = [b["name"] for b in info["format-specific"]["data"]["bitmaps"]]
    assert names == [inc["bitmap"]]

    done(conn, conn.volume_restore(str(bdir), pool, "r1.raw", format="raw",
                                   point=str(full["id"])).id)
    done(conn, conn.volume_restore(str(bdir), pool, "r2.qcow2", format="qcow2").id)
    assert same(point1, pooldir / "r1.raw", "raw", "raw")
    assert same(img, pooldir / "r2.qcow2", "qcow2", "qcow2")
    assert not same(point1, img, "raw", "qcow2")  # the two points differ
    assert conn.volume_info(pool, "r2.qcow2").format == "qcow2"
    # Sparse: the unallocated 160 MiB are not in the restored file.
    assert os.stat(pooldir / "r1.raw").st_blocks * 512 <= 100 * MiB


def test_raw_incremental_compares_block_hashes(conn: EmbeddedConnection, pool: str,
                                               pooldir: Path, tmp_path: Path) -> None:
    conn.volume_create(pool, VolumeCreateArgs("d.img", 128 * MiB, format="raw"))
    path = pooldir / "d.img"
    with open(path, "r+b") as fh:
        for i in range(0, 20):
            fh.seek(i * CHUNK)
            fh.write(os.urandom(CHUNK))
    bdir = tmp_path / "bk"
    done(conn, conn.volume_backup(pool, "d.img", str(bdir)).id)
    point1 = tmp_path / "p1.raw"
    to_raw(path, point1)
    with open(path, "r+b") as fh:
        for i in range(4, 20):
            fh.seek(i * CHUNK)
            fh.write(os.urandom(CHUNK))
    done(conn, conn.volume_backup(pool, "d.img", str(bdir), incremental=True).id)
    full, inc = manifests(conn, bdir)
    assert full["tracking"] == inc["tracking"] == "block-hash"
    assert inc["kind"] == "incremental"
    stats = inc["stats"]
    # Every chunk with data is read again (the filesystem may report a zero chunk
    # beside them as data too); only the 16 changed ones are written.
    assert stats["chunks_read"] - stats["chunks_zero"] == 20
    assert stats["chunks_written"] == 16
    assert len(chunk_files(bdir)) == 36
    done(conn, conn.volume_restore(str(bdir), pool, "old.qcow2", format="qcow2",
                                   point=str(full["id"])).id)
    done(conn, conn.volume_restore(str(bdir), pool, "new.img").id)
    assert same(point1, pooldir / "old.qcow2", "raw", "qcow2")
    assert same(path, pooldir / "new.img", "raw", "raw")


@pytest.mark.parametrize(("action", "warning"), [("--remove", "is missing"),
                                                  ("--disable", "cannot be trusted")])
def test_broken_bitmap_makes_a_full_backup_with_a_warning(
        conn: EmbeddedConnection, pool: str, pooldir: Path, tmp_path: Path, action: str,
        warning: str) -> None:
    img, bdir = backed_up(conn, pool, pooldir, tmp_path)
    [full] = manifests(conn, bdir)
    # Removed, or disabled (it stops recording writes): either way it misses the next.
    subprocess.run(["qemu-img", "bitmap", action, str(img), str(full["bitmap"])],
                   check=True)
    fill_chunks(img, 10, 2, 50)
    done(conn, conn.volume_backup(pool, "g.qcow2", str(bdir), incremental=True).id)
    _, second = manifests(conn, bdir)
    assert second["kind"] == "full" and second["parent"] is None
    assert any(warning in w for w in second["warnings"])
    assert second["stats"]["chunks_read"] == 6
    done(conn, conn.volume_restore(str(bdir), pool, "r.qcow2").id)
    assert same(img, pooldir / "r.qcow2", "qcow2", "qcow2")
    # The chain goes on from the new full backup.
    fill_chunks(img, 0, 1, 77)
    done(conn, conn.volume_backup(pool, "g.qcow2", str(bdir), incremental=True).id)
    third = manifests(conn, bdir)[-1]
    assert third["kind"] == "incremental" and third["warnings"] == []
    assert third["stats"]["chunks_read"] == 1


def test_verify_finds_a_damaged_chunk_and_a_broken_chain(
        conn: EmbeddedConnection, pool: str, pooldir: Path, tmp_path: Path) -> None:
    img, bdir = backed_up(conn, pool, pooldir, tmp_path)
    fill_chunks(img, 0, 1, 9)
    done(conn, conn.volume_backup(pool, "g.qcow2", str(bdir), incremental=True).id)
    done(conn, conn.backup_verify(str(bdir)).id)

    victim = sorted(chunk_files(bdir))[0]
    data = bytearray(victim.read_bytes())
    data[1000] ^= 0xFF
    victim.write_bytes(bytes(data))
    info = conn.job_wait(conn.backup_verify(str(bdir)).id)
    assert info.state == "failed"
    assert victim.name in (info.error or "") and "damaged" in (info.error or "")
    # A restore that meets the damaged chunk fails and leaves no volume.
    point = next(m["id"] for m in manifests(conn, bdir)
                 if victim.name in (bdir / "manifests" / f"{m['id']}.json").read_text())
    bad = conn.job_wait(conn.volume_restore(str(bdir), pool, "r.qcow2", point=str(point)).id)
    assert bad.state == "failed" and "damaged" in (bad.error or "")
    assert "r.qcow2" not in [v.name for v in conn.list_volumes(pool)]
    assert not (pooldir / "r.qcow2").exists()
    assert not [n for n in os.listdir(pooldir) if n.startswith(".virtstore-")]

    victim.unlink()
    full_id = manifests(conn, bdir)[0]["id"]
    (bdir / "manifests" / f"{full_id}.json").unlink()
    info = conn.job_wait(conn.backup_verify(str(bdir)).id)
    assert info.state == "failed"
    assert f"parent {full_id} is missing" in (info.error or "")


KILL_CHILD = textwrap.dedent("""
    import sys, time
    from virtstore.api.embedded import EmbeddedConnection
    root, pool, bdir = sys.argv[1:4]
    conn = EmbeddedConnection(root)
    job = conn.volume_restore(bdir, pool, "r.img", bandwidth=4 * 1024 * 1024)
    print(job.id, flush=True)
    time.sleep(60)
""")


def test_killed_restore_leaves_nothing(conn: EmbeddedConnection, pool: str, pooldir: Path,
                                       root: Path, tmp_path: Path) -> None:
    _, bdir = backed_up(conn, pool, pooldir, tmp_path, chunks=8)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    child = subprocess.Popen([sys.executable, "-c", KILL_CHILD, str(root), pool, str(bdir)],
                             stdout=subprocess.PIPE, text=True, env=env)
    assert child.stdout is not None
    job_id = child.stdout.readline().strip()
    assert job_id, "the child did not start its restore"
    deadline = time.monotonic() + 20
    while conn.job_info(job_id).bytes_done == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert conn.job_info(job_id).bytes_done > 0
    # The staging file is there while the restore runs.
    assert [n for n in os.listdir(pooldir) if n.startswith(".virtstore-")]
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    with EmbeddedConnection(str(root)) as fresh:
        assert fresh.job_info(job_id).state == "failed"
        assert not [n for n in os.listdir(pooldir) if n.startswith(".virtstore-")]
        assert "r.img" not in [v.name for v in fresh.list_volumes(pool)]
        assert not (pooldir / "r.img").exists()
        # The name is free again.
        done(fresh, fresh.volume_restore(str(bdir), pool, "r.img").id)
        assert same(pooldir / "g.qcow2", pooldir / "r.img", "qcow2", "qcow2")


def test_cancelled_backup_writes_no_manifest(conn: EmbeddedConnection, pool: str,
                                             pooldir: Path, tmp_path: Path) -> None:
    qcow2(conn, pool, "g.qcow2", 64 * MiB)
    img = pooldir / "g.qcow2"
    fill_chunks(img, 0, 8, 1)
    bdir = tmp_path / "bk"
    job = conn.volume_backup(pool, "g.qcow2", str(bdir), bandwidth=2 * MiB)
    conn.job_cancel(job.id)
    assert conn.job_wait(job.id).state == "cancelled"
    assert manifests(conn, bdir) == []
    # Its bitmap went with it: the image holds none.
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(img)],
                                     check=True, capture_output=True, text=True).stdout)
    assert not info["format-specific"]["data"].get("bitmaps")


def test_a_directory_holds_one_volume(conn: EmbeddedConnection, pool: str,
                                      tmp_path: Path) -> None:
    conn.volume_create(pool, VolumeCreateArgs("a.img", MiB))
    conn.volume_create(pool, VolumeCreateArgs("b.img", MiB))
    bdir = tmp_path / "bk"
    done(conn, conn.volume_backup(pool, "a.img", str(bdir)).id)
    with pytest.raises(Exception, match=r"holds the chain of volume 'a\.img'"):
        conn.volume_backup(pool, "b.img", str(bdir))


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_import_copies_a_sparse_file_into_a_new_volume(conn: EmbeddedConnection, pool: str,
                                                       pooldir: Path, tmp_path: Path,
                                                       fmt: str) -> None:
    src = tmp_path / "disk.bin"
    with open(src, "wb") as fh:
        fh.truncate(64 * MiB)
        for off in (0, 20 * MiB, 63 * MiB):
            fh.seek(off)
            fh.write(os.urandom(MiB))
        fh.seek(30 * MiB)  # written zeros: allocated in the source, a hole in the volume
        fh.write(bytes(16 * MiB))
    assert os.stat(src).st_blocks * 512 >= 19 * MiB
    done(conn, conn.volume_import(str(src), pool, f"imp.{fmt}", format=fmt).id)
    vol = conn.volume_info(pool, f"imp.{fmt}")
    assert vol.capacity == 64 * MiB and vol.format == fmt
    assert same(src, pooldir / f"imp.{fmt}", "raw", fmt)
    # Sparse: only the three written MiB (and the image's metadata) are allocated.
    assert os.stat(pooldir / f"imp.{fmt}").st_blocks * 512 < 8 * MiB


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_failed_import_leaves_no_volume(conn: EmbeddedConnection, pool: str, pooldir: Path,
                                        tmp_path: Path, fmt: str) -> None:
    src = tmp_path / "disk.bin"
    src.write_bytes(os.urandom(8 * MiB))
    job = conn.volume_import(str(src), pool, "imp.img", format=fmt, bandwidth=MiB)
    conn.job_cancel(job.id)
    assert conn.job_wait(job.id).state == "cancelled"
    assert "imp.img" not in [v.name for v in conn.list_volumes(pool)]
    assert not (pooldir / "imp.img").exists()
    assert not [n for n in os.listdir(pooldir) if n.startswith(".virtstore-")]


def test_raw_file_on_xfs_is_backed_up_from_a_frozen_copy(conn: EmbeddedConnection,
                                                         tmp_path: Path) -> None:
    """What a guest writes while the backup runs is not in it: the backup reads a
    reflink copy taken when it started."""
    from conftest import dir_pool_xml
    from data_fixtures import loop_fs

    with loop_fs(tmp_path, "xfs", "300M") as mnt:
        conn.pool_define_xml(dir_pool_xml("x", mnt))
        conn.pool_start("x")
        conn.volume_create("x", VolumeCreateArgs("d.img", 64 * MiB, allocation=0))
        img = mnt / "d.img"
        with open(img, "r+b") as fh:
            for k in range(8):
                fh.seek(k * CHUNK)
                fh.write(bytes([k + 1]) * CHUNK)
        before = img.read_bytes()
        job = conn.volume_backup("x", "d.img", str(tmp_path / "bk"), bandwidth=8 * MiB)
        deadline = time.monotonic() + 30
        while conn.job_info(job.id).bytes_done == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        with open(img, "r+b") as fh:  # the guest writes the last chunk meanwhile
            fh.seek(7 * CHUNK)
            fh.write(b"\xee" * CHUNK)
        done(conn, job.id)
        done(conn, conn.volume_restore(str(tmp_path / "bk"), "x", "r.img").id)
        assert (mnt / "r.img").read_bytes() == before
        (m,) = manifests(conn, tmp_path / "bk")
        assert m["snapshot"] == "frozen copy"
        assert not [n for n in os.listdir(mnt) if n.startswith(".virtstore-")]
        conn.pool_stop("x")
