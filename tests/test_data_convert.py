"""convert: raw copies in process, everything else through qemu-img -p."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import qemu_info, requires_qemu_img, same_image
from data_fixtures import (
    GiB,
    MiB,
    alive,
    allocated,
    chunks_layout,
    digest,
    make_sparse,
    processes_with,
)
from virtstore.data.convert import convert
from virtstore.data.monitor import Monitor
from virtstore.errors import Cancelled, InvalidArgument
from virtstore.formats import qemuimg

pytestmark = requires_qemu_img

LAYOUT = chunks_layout(GiB, 16, 4 * MiB)


@pytest.fixture(scope="module")
def raw_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("convert") / "src.raw"
    make_sparse(path, GiB, LAYOUT)
    return path


def test_raw_qcow2_raw_round_trip(raw_src: Path, tmp_path: Path) -> None:
    qcow2 = tmp_path / "a.qcow2"
    progress: list[tuple[int, int]] = []
    m = Monitor(on_progress=lambda d, t: progress.append((d, t)))
    convert(str(raw_src), "raw", str(qcow2), "qcow2", None, monitor=m)
    assert qemu_info(qcow2)["format"] == "qcow2"
    assert qemu_info(qcow2)["virtual-size"] == GiB
    assert m.done == m.total == GiB
    assert progress[-1] == (GiB, GiB)
    assert allocated(qcow2) < 80 * MiB  # sparse output
    back = tmp_path / "back.raw"
    m = Monitor()
    convert(str(qcow2), "qcow2", str(back), "raw", None, monitor=m)
    assert m.done == m.total == GiB
    assert digest(back) == digest(raw_src)
    assert allocated(back) <= 65 * MiB


def test_qcow2_to_vmdk(raw_src: Path, tmp_path: Path) -> None:
    qcow2 = tmp_path / "a.qcow2"
    convert(str(raw_src), "raw", str(qcow2), "qcow2",
            qemuimg.ImageOptions(format="qcow2", compat="1.1", cluster_size=128 << 10),
            monitor=Monitor())
    assert qemu_info(qcow2)["cluster-size"] == 128 << 10
    vmdk = tmp_path / "a.vmdk"
    m = Monitor()
    convert(str(qcow2), "qcow2", str(vmdk), "vmdk", None, monitor=m)
    assert qemu_info(vmdk)["format"] == "vmdk"
    assert m.done == m.total == GiB
    assert same_image(qcow2, "qcow2", vmdk, "vmdk")
    assert same_image(raw_src, "raw", vmdk, "vmdk")


def test_into_a_target_the_caller_made(raw_src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "made.qcow2"
    qemuimg.create(str(dst), qemuimg.ImageOptions(format="qcow2", capacity=GiB))
    convert(str(raw_src), "raw", str(dst), "qcow2", None, monitor=Monitor(),
            target_exists=True)
    assert same_image(raw_src, "raw", dst, "qcow2")


def test_raw_to_raw_is_a_sparse_copy(raw_src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "copy.raw"
    m = Monitor()
    convert(str(raw_src), "raw", str(dst), "raw", None, monitor=m)
    assert digest(dst) == digest(raw_src)
    assert allocated(dst) <= 65 * MiB
    assert m.done == GiB
    with pytest.raises(InvalidArgument):
        convert(str(raw_src), "raw", str(tmp_path / "x.qcow2"), "qcow2", None,
                monitor=Monitor(), reflink="always")


def test_encrypted_both_ways(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    make_sparse(src, 32 * MiB, [(MiB, MiB), (20 * MiB, 3 * MiB)])
    qcow2 = tmp_path / "enc.qcow2"
    m = Monitor()
    # A short key derivation keeps the opens cheap (creating still takes qemu seconds).
    convert(str(src), "raw", str(qcow2), "qcow2",
            qemuimg.ImageOptions(format="qcow2", compat="1.1",
                                 encryption=qemuimg.Encryption(),
                                 extra={"encrypt.iter-time": "10"}),
            monitor=m, dst_secret=b"s3cret")
    assert m.done == m.total == 32 * MiB
    enc = qemu_info(qcow2)["format-specific"]
    assert isinstance(enc, dict) and enc["data"]["encrypt"]["format"] == "luks"
    back = tmp_path / "back.raw"
    convert(str(qcow2), "qcow2", str(back), "raw", None, monitor=Monitor(),
            src_secret=b"s3cret")
    assert digest(back) == digest(src)


def test_cancel_kills_qemu_img(tmp_path: Path) -> None:
    src = tmp_path / "busy.raw"
    make_sparse(src, 512 * MiB, [(0, 512 * MiB)])
    dst = tmp_path / "busy-target.qcow2"
    pids: list[int] = []
    m: Monitor

    def on_progress(done: int, total: int) -> None:
        pids.extend(p for p in processes_with(str(dst)) if p not in pids)

    # A bandwidth limit (qemu-img -r) keeps it running long enough to be cancelled
    # after its first progress report.
    m = Monitor(bandwidth=64 * MiB, on_progress=on_progress,
                should_cancel=lambda: m.done > 0)
    with pytest.raises(Cancelled):
        convert(str(src), "raw", str(dst), "qcow2", None, monitor=m)
    assert 0 < m.done < 512 * MiB
    assert pids, "qemu-img was never seen running"
    assert not any(alive(p) for p in pids)
