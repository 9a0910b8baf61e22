"""Jobs, data operations, snapshots and events: embedded and through virtstored."""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

import pytest

from conftest import dir_pool_xml, qemu_info, requires_qemu_img
from server_fixtures import Setup, setup_fixture  # noqa: F401
from virtstore.api import VolumeCreateArgs
from virtstore.errors import NoSuchJob, NoSuchVolume, OperationInvalid

MiB = 1 << 20


def _pool(setup: Setup) -> Path:
    target = setup.tmp / "data"
    setup.conn.pool_define_xml(dir_pool_xml("d", target))
    setup.conn.pool_start("d", build=True)
    return target


def _pattern(n: int) -> bytes:
    return bytes((i * 7 + i // 4096) % 251 for i in range(n))


def test_upload_and_download(setup: Setup) -> None:
    conn = setup.conn
    target = _pool(setup)
    conn.volume_create("d", VolumeCreateArgs("u.img", 4 * MiB, format="raw"))
    data = _pattern(3 * MiB) + b"\0" * MiB
    src = setup.tmp / "src.bin"
    src.write_bytes(data)
    with open(src, "rb") as fh:
        job = conn.volume_upload("d", "u.img", fh)
        job = conn.job_wait(job.id)
    assert job.state == "done", job
    assert (target / "u.img").read_bytes() == data
    # a stream source (not a regular file), at an offset
    stream = io.BytesIO(b"X" * 1000)
    job = conn.volume_upload("d", "u.img", stream, offset=MiB, length=1000)
    assert conn.job_wait(job.id).state == "done"
    assert (target / "u.img").read_bytes()[MiB:MiB + 1001] == b"X" * 1000 + data[MiB + 1000:
                                                                               MiB + 1001]
    # download to a regular file keeps the zero tail as a hole
    out = setup.tmp / "out.bin"
    with open(out, "wb") as fh:
        job = conn.volume_download("d", "u.img", fh)
        conn.job_wait(job.id)
    expect = (target / "u.img").read_bytes()
    assert out.read_bytes() == expect
    assert os.stat(out).st_blocks * 512 < 4 * MiB
    buf = io.BytesIO()
    job = conn.volume_download("d", "u.img", buf, offset=MiB, length=4096)
    conn.job_wait(job.id)
    assert buf.getvalue() == expect[MiB:MiB + 4096]
    with pytest.raises(NoSuchVolume):
        conn.volume_download("d", "missing.img", io.BytesIO())
    with pytest.raises(NoSuchVolume):
        conn.volume_upload("d", "missing.img", io.BytesIO(b"abc"))


def test_upload_refused_before_its_body_is_read(setup: Setup) -> None:
    # The daemon answers before reading a body it will not take; the client still gets
    # that answer, not a broken connection, however much it had left to send.
    _pool(setup)
    for size in (3, 64 * MiB):
        with pytest.raises(NoSuchVolume):
            setup.conn.volume_upload("d", "missing.img", io.BytesIO(b"\1" * size))
    assert setup.conn.list_volumes("d") == []


@requires_qemu_img
def test_clone_resize_wipe_and_jobs(setup: Setup) -> None:
    conn = setup.conn
    target = _pool(setup)
    conn.volume_create("d", VolumeCreateArgs("base.raw", 2 * MiB, format="raw"))
    (target / "base.raw").write_bytes(_pattern(2 * MiB))
    conn.pool_refresh("d")
    job = conn.volume_clone("d", "base.raw", "copy.qcow2", format="qcow2")
    assert job.kind == "clone" and job.id
    done = conn.job_wait(job.id)
    assert done.state == "done" and done.finished
    assert qemu_info(target / "copy.qcow2")["format"] == "qcow2"
    assert conn.volume_info("d", "copy.qcow2").capacity == 2 * MiB
    assert job.id in [j.id for j in conn.list_jobs()]
    assert conn.job_info(job.id).state == "done"
    assert job.id not in [j.id for j in conn.list_jobs(include_finished=False)]
    with pytest.raises(OperationInvalid):
        conn.job_cancel(job.id)
    with pytest.raises(NoSuchJob):
        conn.job_info("0123456789ab")
    job = conn.volume_resize("d", "base.raw", 4 * MiB)
    assert conn.job_wait(job.id).state == "done"
    assert os.path.getsize(target / "base.raw") == 4 * MiB
    job = conn.volume_wipe("d", "base.raw")
    assert conn.job_wait(job.id).state == "done"
    assert (target / "base.raw").read_bytes() == b"\0" * (4 * MiB)
    xml = ("<volume><name>from.raw</name><capacity unit='M'>4</capacity>"
           "<target><format type='raw'/></target></volume>")
    job = conn.volume_create_from("d", xml, "d", "copy.qcow2")
    assert conn.job_wait(job.id).state == "done"
    assert (target / "from.raw").read_bytes()[:2 * MiB] == _pattern(2 * MiB)


@requires_qemu_img
def test_snapshots(setup: Setup) -> None:
    conn = setup.conn
    _pool(setup)
    conn.volume_create("d", VolumeCreateArgs("s.qcow2", 8 * MiB, format="qcow2"))
    snap = conn.volume_snapshot_create("d", "s.qcow2", "first")
    assert (snap.name, snap.volume, snap.pool) == ("first", "s.qcow2", "d")
    assert [s.name for s in conn.volume_snapshot_list("d", "s.qcow2")] == ["first"]
    conn.volume_snapshot_revert("d", "s.qcow2", "first")
    conn.volume_snapshot_delete("d", "s.qcow2", "first")
    assert conn.volume_snapshot_list("d", "s.qcow2") == []


def test_events(setup: Setup) -> None:
    conn = setup.conn
    start = conn.latest_event_id()
    assert conn.events_since(-1) == []
    got: list[object] = []

    def watch() -> None:
        got.extend(conn.events_since(start, timeout=20))

    t = threading.Thread(target=watch)
    t.start()
    conn.pool_define_xml(dir_pool_xml("ev", setup.tmp / "ev"))
    t.join(30)
    assert not t.is_alive()
    evs = conn.events_since(start)
    assert any(e.kind == "pool" and e.action == "defined" and e.name == "ev" for e in evs)
    assert got and got[0] == evs[0]
    assert conn.latest_event_id() >= evs[-1].id
    assert conn.events_since(evs[-1].id, timeout=0.2) == []


def test_sparse_transfers_keep_holes(setup: Setup) -> None:
    conn = setup.conn
    target = _pool(setup)
    size = 64 * MiB
    conn.volume_create("d", VolumeCreateArgs("sp.img", size, allocation=0, format="raw"))
    src = setup.tmp / "sparse-src.img"
    with open(src, "wb") as fh:
        fh.truncate(size)
        fh.seek(10 * MiB)
        fh.write(b"A" * MiB)
        fh.seek(50 * MiB)
        fh.write(b"B" * 4096)
    with open(src, "rb") as fh:
        job = conn.volume_upload("d", "sp.img", fh)
        assert conn.job_wait(job.id).state == "done"
    vol = target / "sp.img"
    assert vol.read_bytes() == src.read_bytes()
    assert os.stat(vol).st_blocks * 512 < 8 * MiB  # the holes stayed holes
    out = setup.tmp / "sparse-out.img"
    with open(out, "wb") as fh:
        job = conn.volume_download("d", "sp.img", fh)
        conn.job_wait(job.id)
    assert out.read_bytes() == src.read_bytes()
    assert os.stat(out).st_blocks * 512 < 8 * MiB
