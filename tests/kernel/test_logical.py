"""logical pools on a kernel with device-mapper: LVs are activated at start and
deactivated at stop, and their bytes are read and written through the Connection and
the CLI (upload, download, wipe, clone, resize)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from block_fixtures import BlockLab, lvm
from conftest import virtstore_cli
from virtstore.api import VolumeCreateArgs
from virtstore.api.embedded import EmbeddedConnection
from virtstore.backends.logical import LogicalBackend
from virtstore.cli.main import main
from virtstore.errors import InvalidArgument
from virtstore.host import lvm as lvmmod

MiB = 1 << 20


def logical_xml(vg: str, *devs: str) -> str:
    src = "".join(f"<device path='{d}'/>" for d in devs)
    return (f"<pool type='logical'><name>{vg}</name><source>{src}</source>"
            f"<target><path>/dev/{vg}</path></target></pool>")


def lv_report(vg: str) -> dict[str, dict[str, str]]:
    out = lvm("lvs", "--reportformat", "json", "-a", "-o",
              "lv_name,lv_attr,segtype,stripes,lv_size", "--units", "b", "--nosuffix",
              vg).stdout
    return {r["lv_name"]: r for r in json.loads(out)["report"][0]["lv"]}


def wait(conn: EmbeddedConnection, job_id: str) -> None:
    info = conn.job_wait(job_id, 300)
    assert info.state == "done", info.error


def upload(conn: EmbeddedConnection, pool: str, vol: str, data: bytes,
           offset: int = 0) -> None:
    wait(conn, conn.volume_upload(pool, vol, io.BytesIO(data), offset=offset).id)


def download(conn: EmbeddedConnection, pool: str, vol: str, offset: int = 0,
             length: int | None = None) -> bytes:
    sink = io.BytesIO()
    wait(conn, conn.volume_download(pool, vol, sink, offset=offset, length=length).id)
    return sink.getvalue()


def read_dev(path: str, offset: int, n: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, n, offset)
    finally:
        os.close(fd)


@pytest.fixture
def vg_pool(lab: BlockLab, conn: EmbeddedConnection) -> str:
    d1, d2 = lab.loop(96 * MiB), lab.loop(96 * MiB)
    vg = lab.vg("vsklab")
    conn.pool_define_xml(logical_xml(vg, d1, d2))
    conn.pool_build(vg)
    conn.pool_start(vg)
    return vg


def test_device_mapper_is_detected() -> None:
    assert lvmmod.device_mapper_available()


def test_start_activates_and_stop_deactivates(vg_pool: str, root: Path,
                                              conn: EmbeddedConnection) -> None:
    vg = vg_pool
    conn.volume_create(vg, VolumeCreateArgs(name="lv1", capacity=8 * MiB))
    node = Path(f"/dev/{vg}/lv1")
    assert node.is_block_device() or node.resolve().is_block_device()
    assert lv_report(vg)["lv1"]["lv_attr"][4] == "a"
    payload = os.urandom(MiB)
    upload(conn, vg, "lv1", payload, offset=MiB)
    conn.pool_stop(vg)
    assert not node.exists()
    assert lv_report(vg)["lv1"]["lv_attr"][4] == "-"
    # A new connection (a restart) starts the pool again: the LV is back, bytes kept.
    conn.close()
    again = EmbeddedConnection(str(root))
    try:
        again.pool_start(vg)
        assert node.exists()
        assert lv_report(vg)["lv1"]["lv_attr"][4] == "a"
        assert download(again, vg, "lv1", offset=MiB, length=MiB) == payload
        assert read_dev(str(node), MiB, MiB) == payload
    finally:
        again.close()


def test_upload_download_wipe_resize_clone_delete(vg_pool: str,
                                                  conn: EmbeddedConnection) -> None:
    vg = vg_pool
    conn.volume_create(vg, VolumeCreateArgs(name="data", capacity=12 * MiB))
    payload = os.urandom(3 * MiB + 512)
    upload(conn, vg, "data", payload, offset=4096)
    assert read_dev(f"/dev/{vg}/data", 4096, len(payload)) == payload
    whole = download(conn, vg, "data")
    assert len(whole) == 12 * MiB and whole[4096:4096 + len(payload)] == payload

    # More than the LV holds is refused before a byte is written.
    job = conn.volume_upload(vg, "data", io.BytesIO(bytes(13 * MiB)))
    info = conn.job_wait(job.id, 300)
    assert info.state == "failed" and "larger than volume 'data'" in (info.error or "")
    assert download(conn, vg, "data") == whole

    wait(conn, conn.volume_clone(vg, "data", "copy").id)
    assert download(conn, vg, "copy") == whole
    assert lv_report(vg)["copy"]["lv_size"] == str(12 * MiB)
    assert not any(n.startswith("virtstore-staging") for n in lv_report(vg))

    wait(conn, conn.volume_resize(vg, "copy", 20 * MiB).id)
    assert conn.volume_info(vg, "copy").capacity == 20 * MiB
    assert lv_report(vg)["copy"]["lv_size"] == str(20 * MiB)
    assert download(conn, vg, "copy", length=12 * MiB) == whole
    with pytest.raises(InvalidArgument, match="shrink flag"):
        conn.volume_resize(vg, "copy", 8 * MiB)
    wait(conn, conn.volume_resize(vg, "copy", 8 * MiB, shrink=True).id)
    assert lv_report(vg)["copy"]["lv_size"] == str(8 * MiB)
    assert download(conn, vg, "copy") == whole[:8 * MiB]

    wait(conn, conn.volume_wipe(vg, "data", "zero").id)
    assert download(conn, vg, "data") == bytes(12 * MiB)
    assert download(conn, vg, "copy") == whole[:8 * MiB]  # the clone is independent

    conn.volume_delete(vg, "copy")
    assert not os.path.exists(f"/dev/{vg}/copy")
    assert "copy" not in lv_report(vg)


def test_linked_clone_is_a_snapshot(vg_pool: str, conn: EmbeddedConnection) -> None:
    vg = vg_pool
    conn.volume_create(vg, VolumeCreateArgs(name="base", capacity=8 * MiB))
    first = os.urandom(MiB)
    upload(conn, vg, "base", first)
    wait(conn, conn.volume_clone(vg, "base", "snap", linked=True).id)
    rep = lv_report(vg)
    assert rep["snap"]["lv_attr"][0] == "s"
    upload(conn, vg, "base", os.urandom(MiB))
    assert download(conn, vg, "snap", length=MiB) == first


def test_striped_and_raid1_volumes_carry_data(vg_pool: str,
                                              conn: EmbeddedConnection) -> None:
    vg = vg_pool
    be = LogicalBackend()
    be.create_lv(vg, "striped", 8 * MiB, stripes=2, stripe_size=64 * 1024)
    be.create_lv(vg, "mirror", 8 * MiB, mirrors=1)
    conn.pool_refresh(vg)
    names = {v.name for v in conn.list_volumes(vg)}
    assert {"striped", "mirror"} <= names
    assert not any(n.startswith("[") or "_rimage" in n or "_rmeta" in n for n in names)
    rep = lv_report(vg)
    assert (rep["striped"]["segtype"], rep["striped"]["stripes"]) == ("striped", "2")
    assert rep["mirror"]["segtype"] == "raid1"
    for name in ("striped", "mirror"):
        payload = os.urandom(5 * MiB)
        upload(conn, vg, name, payload)
        assert download(conn, vg, name, length=5 * MiB) == payload
    # Both raid1 legs hold the bytes.
    legs = [f"/dev/mapper/{vg}-mirror_rimage_{i}" for i in (0, 1)]
    assert read_dev(legs[0], 0, MiB) == read_dev(legs[1], 0, MiB) == payload[:MiB]


def test_sparse_volume_is_a_thin_lv(vg_pool: str, conn: EmbeddedConnection) -> None:
    vg = vg_pool
    conn.volume_create(vg, VolumeCreateArgs(name="thin", capacity=64 * MiB,
                                            allocation=8 * MiB))
    rep = lv_report(vg)
    assert rep["thin"]["lv_attr"][0] == "V"
    assert conn.volume_info(vg, "thin").capacity == 64 * MiB
    payload = os.urandom(MiB)
    upload(conn, vg, "thin", payload, offset=40 * MiB)
    assert download(conn, vg, "thin", offset=40 * MiB, length=MiB) == payload


def test_data_operations_through_the_cli(lab: BlockLab, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    dev = lab.loop(64 * MiB)
    vg = lab.vg("vsklabcli")
    root = str(tmp_path / "state")

    def cli(*args: str, ok: bool = True) -> str:
        # In process: a command's start-up costs seconds under the VM's emulated CPU.
        code = main(["--root", root, *args])
        out = capsys.readouterr()
        assert (code == 0) == ok, out.err
        return out.out if ok else out.err

    cli("pool-define-as", vg, "logical", "--source-dev", dev, "--source-name", vg)
    cli("pool-build", vg)
    cli("pool-start", vg)
    cli("vol-create-as", vg, "lv1", "8M")
    src = tmp_path / "in.bin"
    payload = os.urandom(2 * MiB)
    src.write_bytes(payload)
    cli("vol-upload", "--pool", vg, "lv1", str(src))
    cli("vol-clone", "--pool", vg, "lv1", "lv2")
    cli("vol-resize", "--pool", vg, "lv2", "16M")
    assert "16.00 MiB" in cli("vol-info", "--pool", vg, "lv2")
    assert "shrink" in cli("vol-resize", "--pool", vg, "lv2", "4M", ok=False)
    cli("vol-wipe", "--pool", vg, "lv1")
    out = tmp_path / "out.bin"
    cli("vol-download", "--pool", vg, "lv1", str(out))
    assert out.read_bytes() == bytes(8 * MiB)
    cli("pool-destroy", vg)
    assert not os.path.exists(f"/dev/{vg}/lv1")
    cli("pool-start", vg)
    # Once through the installed command, in its own process.
    res = subprocess.run([virtstore_cli(), "--root", root, "vol-download", "--pool", vg,
                          "lv2", str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    got = out.read_bytes()
    assert len(got) == 16 * MiB and got[:len(payload)] == payload


def test_cancelled_clone_leaves_no_volume(vg_pool: str, conn: EmbeddedConnection) -> None:
    vg = vg_pool
    conn.volume_create(vg, VolumeCreateArgs(name="big", capacity=32 * MiB))
    job = conn.volume_clone(vg, "big", "copy", bandwidth=2 * MiB)
    deadline = time.monotonic() + 120
    while conn.job_info(job.id).bytes_done == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    conn.job_cancel(job.id)
    info = conn.job_wait(job.id, 120)
    assert info.state == "cancelled", info
    assert "copy" not in {v.name for v in conn.list_volumes(vg)}
    assert not [n for n in lv_report(vg) if n == "copy" or n.startswith("virtstore-staging")]


def test_a_mounted_volume_is_not_overwritten(vg_pool: str, conn: EmbeddedConnection,
                                            tmp_path: Path) -> None:
    vg = vg_pool
    conn.volume_create(vg, VolumeCreateArgs(name="fs", capacity=16 * MiB))
    dev = f"/dev/{vg}/fs"
    subprocess.run(["mkfs.ext4", "-q", dev], check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", dev, str(mnt)], check=True)
    try:
        (mnt / "keep").write_text("still here")
        # One after the other: each job holds the volume's write lock until it ends.
        for start in (lambda: conn.volume_wipe(vg, "fs", "zero"),
                      lambda: conn.volume_upload(vg, "fs", io.BytesIO(bytes(MiB)))):
            info = conn.job_wait(start().id, 120)
            assert info.state == "failed" and "in use" in (info.error or ""), info
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    subprocess.run(["mount", dev, str(mnt)], check=True)
    try:
        assert (mnt / "keep").read_text() == "still here"
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_restore_of_a_backup_into_a_logical_pool(vg_pool: str, conn: EmbeddedConnection,
                                                 pool: str, pooldir: Path,
                                                 tmp_path: Path) -> None:
    # An LV full of 0xff, deleted: the restored one gets its extents, and the backup's
    # holes must read as zeros there all the same.
    conn.volume_create(vg_pool, VolumeCreateArgs(name="old", capacity=16 * MiB))
    upload(conn, vg_pool, "old", b"\xff" * (16 * MiB))
    conn.volume_delete(vg_pool, "old")
    conn.volume_create(pool, VolumeCreateArgs(name="src.img", capacity=16 * MiB))
    data = bytes(5 * MiB) + b"\x5a" * MiB + bytes(10 * MiB)
    with open(pooldir / "src.img", "r+b") as fh:
        fh.seek(5 * MiB)
        fh.write(b"\x5a" * MiB)
    bdir = tmp_path / "bk"
    wait(conn, conn.volume_backup(pool, "src.img", str(bdir)).id)
    wait(conn, conn.volume_restore(str(bdir), vg_pool, "restored").id)
    assert conn.volume_info(vg_pool, "restored").capacity == 16 * MiB
    assert download(conn, vg_pool, "restored") == data
