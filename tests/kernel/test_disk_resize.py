"""vol-resize of a partition in a disk pool (libvirt cannot): the partition grows into
the free space after it, its bytes are kept and the kernel sees the new size."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from block_fixtures import BlockLab
from conftest import ploop
from virtstore.api import VolumeCreateArgs
from virtstore.api.embedded import EmbeddedConnection
from virtstore.cli.main import main
from virtstore.errors import InvalidArgument, NoSpace
from virtstore.host import loop

MiB = 1 << 20


def sysfs_size(node: str) -> int:
    with open(f"/sys/class/block/{os.path.basename(node)}/size") as fh:
        return int(fh.read()) * 512


def test_grow_a_partition(lab: BlockLab, conn: EmbeddedConnection, tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    dev = ploop(lab, 64 * MiB)
    name = os.path.basename(dev)
    conn.pool_define_xml(f"<pool type='disk'><name>{name}</name><source><device "
                         f"path='{dev}'/><format type='gpt'/></source><target><path>/dev"
                         "</path></target></pool>")
    conn.pool_build(name)
    conn.pool_start(name)
    p1, p2 = f"{name}p1", f"{name}p2"
    conn.volume_create(name, VolumeCreateArgs(name=p1, capacity=8 * MiB))
    conn.volume_create(name, VolumeCreateArgs(name=p2, capacity=8 * MiB))
    payload = os.urandom(8 * MiB)
    info = conn.job_wait(conn.volume_upload(name, p2, io.BytesIO(payload)).id, 300)
    assert info.state == "done", info.error
    start = loop.kernel_partitions(dev)[2][0]

    info = conn.job_wait(conn.volume_resize(name, p2, 24 * MiB).id, 300)
    assert info.state == "done", info.error
    assert loop.kernel_partitions(dev)[2] == (start, 24 * MiB)
    assert sysfs_size(f"/dev/{p2}") == 24 * MiB
    assert conn.volume_info(name, p2).capacity == 24 * MiB
    with open(f"/dev/{p2}", "rb") as fh:
        assert fh.read(8 * MiB) == payload
        fh.seek(20 * MiB)
        assert len(fh.read(4 * MiB)) == 4 * MiB  # the new end is readable

    # p1 has p2 right behind it; shrinking is refused: the table stays as it was.
    before = loop.kernel_partitions(dev)
    with pytest.raises(NoSpace, match="can grow by 0 bytes"):
        conn.volume_resize(name, p1, 9 * MiB)
    with pytest.raises(InvalidArgument, match="not shrunk"):
        conn.volume_resize(name, p2, 4 * MiB, shrink=True)
    assert loop.kernel_partitions(dev) == before

    # The same through the CLI, in process (a process start costs seconds here).
    conn.close()
    code = main(["--root", str(tmp_path / "cli"), "pool-define-as", name, "disk",
                 "--source-dev", dev, "--source-format", "gpt", "--target", "/dev"])
    assert code == 0, capsys.readouterr().err
    for args in (["pool-start", name], ["vol-resize", "--pool", name, p2, "30M"]):
        assert main(["--root", str(tmp_path / "cli"), *args]) == 0, \
            capsys.readouterr().err
    assert sysfs_size(f"/dev/{p2}") == 30 * MiB
    with open(f"/dev/{p2}", "rb") as fh:
        assert fh.read(8 * MiB) == payload
