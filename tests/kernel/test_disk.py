"""disk pools on loop devices whose partition table the kernel scans itself
(``losetup --partscan``): partition nodes come and go without partx, and a
partition volume's bytes are uploaded, downloaded and wiped through the Connection."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from block_fixtures import BlockLab
from conftest import ploop
from virtstore.api import VolumeCreateArgs
from virtstore.api.embedded import EmbeddedConnection
from virtstore.host import loop, runner

MiB = 1 << 20


def disk_xml(name: str, dev: str, fmt: str = "gpt") -> str:
    return (f"<pool type='disk'><name>{name}</name><source><device path='{dev}'/>"
            f"<format type='{fmt}'/></source><target><path>/dev</path></target></pool>")


@pytest.fixture
def commands(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[list[str]]]:
    """The argv of every outside command virtstore runs (they still run)."""
    seen: list[list[str]] = []
    real = runner.run

    def spy(argv: Sequence[str], **kw: object) -> runner.Result:
        seen.append([str(a) for a in argv])
        return real(argv, **kw)  # type: ignore[arg-type]

    for mod in ("virtstore.host.loop", "virtstore.host.partitions"):
        monkeypatch.setattr(f"{mod}.run", spy)
    yield seen


def wait(conn: EmbeddedConnection, job_id: str) -> None:
    info = conn.job_wait(job_id, 300)
    assert info.state == "done", info.error


@pytest.mark.parametrize("label", ["gpt", "dos"])
def test_partitions_appear_and_go_without_partx(label: str, lab: BlockLab,
                                                conn: EmbeddedConnection,
                                                commands: list[list[str]]) -> None:
    dev = ploop(lab, 64 * MiB)
    name = os.path.basename(dev)
    conn.pool_define_xml(disk_xml(name, dev, label))
    conn.pool_build(name)
    conn.pool_start(name)
    for i in (1, 2):
        conn.volume_create(name, VolumeCreateArgs(name=f"{name}p{i}", capacity=8 * MiB))
        assert os.path.exists(f"/dev/{name}p{i}")
    assert sorted(loop.kernel_partitions(dev)) == [1, 2]
    assert loop.kernel_partitions(dev)[2][1] == 8 * MiB
    conn.volume_delete(name, f"{name}p1")
    assert not os.path.exists(f"/dev/{name}p1")
    assert os.path.exists(f"/dev/{name}p2")
    assert not [c for c in commands if c[0] == "partx"], commands


def test_partition_data_operations(lab: BlockLab, conn: EmbeddedConnection,
                                   tmp_path: Path) -> None:
    dev = ploop(lab, 64 * MiB)
    name = os.path.basename(dev)
    conn.pool_define_xml(disk_xml(name, dev))
    conn.pool_build(name)
    conn.pool_start(name)
    conn.volume_create(name, VolumeCreateArgs(name=f"{name}p1", capacity=4 * MiB))
    conn.volume_create(name, VolumeCreateArgs(name=f"{name}p2", capacity=4 * MiB))
    vol = f"{name}p1"
    payload = os.urandom(MiB + 4096)
    wait(conn, conn.volume_upload(name, vol, io.BytesIO(payload), offset=MiB).id)
    sink = io.BytesIO()
    wait(conn, conn.volume_download(name, vol, sink).id)
    got = sink.getvalue()
    assert len(got) == 4 * MiB and got[MiB:MiB + len(payload)] == payload
    # The partition's bytes are where the table says, on the disk itself.
    start = loop.kernel_partitions(dev)[1][0]
    with open(dev, "rb") as fh:
        fh.seek(start + MiB)
        assert fh.read(len(payload)) == payload
    # An upload larger than the partition is refused before a byte is written.
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(5 * MiB))
    with open(big, "rb") as fh:
        info = conn.job_wait(conn.volume_upload(name, vol, fh).id, 300)
    assert info.state == "failed" and "larger than volume" in (info.error or "")
    with open(dev, "rb") as fh:
        fh.seek(start + MiB)
        assert fh.read(len(payload)) == payload
    wait(conn, conn.volume_wipe(name, vol, "zero").id)
    sink = io.BytesIO()
    wait(conn, conn.volume_download(name, vol, sink).id)
    assert sink.getvalue() == bytes(4 * MiB)
