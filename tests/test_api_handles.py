"""The Python API as libvirt-python users reach for it: handles for pools, volumes,
secrets and jobs, sizes as virsh writes them, and what a script's exit does with a job
it did not wait for."""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import virtstore
from conftest import dir_pool_xml
from virtstore import Connection, Job, Pool, Secret, Volume, VolumeInfo
from virtstore.errors import InvalidArgument, NoSuchVolume

MiB = 1 << 20


def test_public_types_come_from_the_package() -> None:
    import virtstore.api

    for name in ("Connection", "Pool", "Volume", "Secret", "Job", "PoolInfo", "VolumeInfo",
                 "SecretInfo", "JobInfo", "SnapshotInfo", "VolumeCreateArgs", "PoolFilter",
                 "VirtstoreError"):
        assert name in virtstore.__all__
        assert getattr(virtstore, name) is not None
    assert virtstore.Volume is virtstore.api.Volume


def test_every_public_method_has_a_docstring() -> None:
    missing = [f"{cls.__name__}.{name}"
               for cls in (Connection, Pool, Volume, Secret, Job)
               for name, member in inspect.getmembers(cls, inspect.isfunction)
               if not name.startswith("_") and not (member.__doc__ or "").strip()]
    assert missing == []


def test_handles_do_what_virsh_does(tmp_path: Path) -> None:
    with virtstore.connect(root=str(tmp_path / "state")) as conn:
        pool = conn.define_pool(dir_pool_xml("images", tmp_path / "images"))
        assert isinstance(pool, Pool)
        pool.build()
        pool.start()
        vol = pool.create_volume("a.qcow2", "64M", format="qcow2")
        assert isinstance(vol, Volume)
        found = pool.volume("a.qcow2")
        info = found.info()
        assert isinstance(info, VolumeInfo) and info.capacity == 64 * MiB
        assert found.path() == str(tmp_path / "images" / "a.qcow2")
        assert "<clusterSize unit='B'>65536</clusterSize>" in found.xml()
        with pytest.raises(NoSuchVolume):
            pool.volume("nosuch")

        job = vol.resize("128MiB")
        assert isinstance(job, Job)
        assert job.wait().state == "done"
        assert vol.info().capacity == 128 * MiB
        vol.resize("64M", delta=True).wait()
        assert vol.info().capacity == 192 * MiB

        clone = vol.clone("b.qcow2", bandwidth="100M")
        assert clone.wait().state == "done"
        copy = conn.volume("images", "b.qcow2")
        assert copy.info().capacity == 192 * MiB

        raw = pool.create_volume("c.raw", 1 * MiB, format="raw")
        src = tmp_path / "in.bin"
        src.write_bytes(b"x" * 4096)
        with open(src, "rb") as fh:
            raw.upload(fh, offset="4K").wait()
        out = tmp_path / "out.bin"
        with open(out, "wb") as fh:
            raw.download(fh, length=8192).wait()
        assert out.read_bytes() == b"\0" * 4096 + b"x" * 4096
        raw.wipe().wait()
        assert raw.info().capacity == MiB

        vol.snapshot("s1")
        assert [s.name for s in vol.snapshots()] == ["s1"]
        vol.delete_snapshot("s1")
        assert vol.snapshots() == []

        with pytest.raises(InvalidArgument, match=r"Malformed capacity 1\.5G"):
            pool.create_volume("bad.img", "1.5G")
        with pytest.raises(InvalidArgument):
            pool.create_volume("bad.img", -1)

        for v in (vol, copy, raw):
            v.delete()
        assert pool.volumes() == []
        pool.stop()
        pool.delete()
        assert not (tmp_path / "images").exists()
        pool.undefine()
        assert conn.list_pools() == []


def test_secret_handle(tmp_path: Path) -> None:
    with virtstore.connect(root=str(tmp_path / "state")) as conn:
        secret = conn.define_secret(
            "<secret ephemeral='no' private='no'><usage type='volume'>"
            "<volume>/x.img</volume></usage></secret>")
        assert isinstance(secret, Secret)
        secret.set_value(b"s3cret")
        assert conn.secret(secret.uuid).value() == b"s3cret"
        assert secret.info().usage_id == "/x.img" and "<volume>/x.img</volume>" in secret.xml()
        secret.undefine()
        assert conn.list_secrets() == []


SCRIPT = """
import sys, virtstore
conn = virtstore.connect(root=sys.argv[1])
pool = conn.pool("images")
job = pool.volume("big.img").clone("copy.img", bandwidth="4M")
print(job.id, flush=True)
if sys.argv[2] == "cancel":
    conn.close(cancel_jobs=True)
"""


@pytest.mark.parametrize("how", ["leave", "cancel"])
def test_a_job_not_waited_for_at_exit(tmp_path: Path, how: str) -> None:
    root, images = tmp_path / "state", tmp_path / "images"
    with virtstore.connect(root=str(root)) as conn:
        pool = conn.define_pool(dir_pool_xml("images", images))
        pool.start(build=True)
        big = pool.create_volume("big.img", "8M", format="raw")
        with open(big.path(), "r+b") as fh:
            fh.write(b"y" * (8 * MiB))
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(SCRIPT), str(root), how],
                          capture_output=True, text=True, timeout=60)
    took = time.monotonic() - started
    assert proc.returncode == 0 and proc.stderr == "", proc
    job_id = proc.stdout.strip()
    with virtstore.connect(root=str(root)) as conn:
        state = conn.job_info(job_id).state
        names = [v.name for v in conn.list_volumes("images")]
    if how == "leave":
        # The process ends when its job does: the copy is whole.
        assert took >= 1.5 and state == "done"
        assert (images / "copy.img").read_bytes() == b"y" * (8 * MiB)
        assert names == ["big.img", "copy.img"]
    else:
        # close(cancel_jobs=True): it stops at once and leaves nothing half made.
        assert took < 1.5 and state == "cancelled"
        assert names == ["big.img"] and sorted(p.name for p in images.iterdir()) == ["big.img"]
