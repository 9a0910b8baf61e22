"""Volumes in a dir pool: create, refresh, lookups, delete — real files, real qemu-img."""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest
from lxml import etree

from conftest import qemu_info, requires_qemu_img
from virtstore.api import VolumeCreateArgs
from virtstore.api.embedded import EmbeddedConnection
from virtstore.backends import backend_for
from virtstore.errors import (
    AlreadyExists,
    InvalidArgument,
    NoSuchVolume,
    OperationInvalid,
    Unsupported,
    XMLError,
)

MiB = 1024 * 1024
GiB = 1024 * MiB


def vol_xml(name: str, capacity: str, fmt: str = "raw", extra: str = "",
            allocation: str | None = None) -> str:
    """Capacity as '5G' becomes <capacity unit='G'>5</capacity>, as libvirt spells it."""
    m = re.fullmatch(r"(\d+)([A-Za-z]+)", capacity)
    cap = (f"<capacity unit='{m.group(2)}'>{m.group(1)}</capacity>" if m
           else f"<capacity>{capacity}</capacity>")
    alloc = f"<allocation>{allocation}</allocation>" if allocation is not None else ""
    return (f"<volume><name>{name}</name>{cap}{alloc}"
            f"<target><format type='{fmt}'/>{extra}</target></volume>")


def test_raw_sparse_and_allocated(conn: EmbeddedConnection, pool: str, pooldir: Path) -> None:
    conn.volume_create_xml(pool, vol_xml("sparse.img", "1073741824", allocation="0"))
    conn.volume_create(pool, VolumeCreateArgs("full.img", 8 * MiB))
    sparse, full = pooldir / "sparse.img", pooldir / "full.img"
    assert sparse.stat().st_size == GiB and sparse.stat().st_blocks == 0
    assert full.stat().st_size == 8 * MiB and full.stat().st_blocks * 512 >= 8 * MiB
    assert stat.S_IMODE(full.stat().st_mode) == 0o600
    info = conn.volume_info(pool, "sparse.img")
    assert (info.type, info.format, info.capacity, info.allocation) == ("file", "raw", GiB, 0)
    assert info.path == info.key == str(sparse)
    names = [v.name for v in conn.list_volumes(pool)]
    assert names == ["full.img", "sparse.img"]


@requires_qemu_img
@pytest.mark.parametrize(("extra", "compat", "cluster", "lazy"), [
    ("", "0.10", 65536, False),
    ("<compat>1.1</compat>", "1.1", 65536, False),
    ("<compat>1.1</compat><features><lazy_refcounts/></features>", "1.1", 65536, True),
    ("<clusterSize unit='KiB'>256</clusterSize>", "0.10", 262144, False),
])
def test_qcow2_matches_request(conn: EmbeddedConnection, pool: str, pooldir: Path, extra: str,
                               compat: str, cluster: int, lazy: bool) -> None:
    conn.volume_create_xml(pool, vol_xml("q.qcow2", "5G", "qcow2", extra))
    info = qemu_info(pooldir / "q.qcow2")
    assert info["format"] == "qcow2" and info["virtual-size"] == 5 * GiB
    assert info["cluster-size"] == cluster
    data = info["format-specific"]["data"]  # type: ignore[index]
    assert data["compat"] == compat
    assert bool(data.get("lazy-refcounts", False)) == lazy
    check = subprocess.run(["qemu-img", "check", str(pooldir / "q.qcow2")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    vi = conn.volume_info(pool, "q.qcow2")
    assert (vi.format, vi.capacity) == ("qcow2", 5 * GiB)


@requires_qemu_img
def test_qcow2_backing_volume(conn: EmbeddedConnection, pool: str, pooldir: Path) -> None:
    conn.volume_create(pool, VolumeCreateArgs("base.img", 64 * MiB, allocation=0))
    conn.volume_create(pool, VolumeCreateArgs("top.qcow2", 64 * MiB, format="qcow2",
                                              backing_vol="base.img"))
    info = qemu_info(pooldir / "top.qcow2")
    assert info["backing-filename"] == str(pooldir / "base.img")
    assert info["backing-filename-format"] == "raw"
    doc = etree.fromstring(conn.volume_xml(pool, "top.qcow2").encode())
    assert doc.findtext("backingStore/path") == str(pooldir / "base.img")
    assert doc.find("backingStore/format").get("type") == "raw"  # type: ignore[union-attr]
    # Capacity may be left out when a backing store gives it.
    conn.volume_create_xml(pool, "<volume><name>top2</name><target><format type='qcow2'/>"
                                 f"</target><backingStore><path>{pooldir / 'base.img'}</path>"
                                 "<format type='raw'/></backingStore></volume>")
    assert qemu_info(pooldir / "top2")["virtual-size"] == 64 * MiB


@requires_qemu_img
@pytest.mark.parametrize("fmt", ["qed", "vmdk", "vdi", "vpc"])
def test_other_formats(conn: EmbeddedConnection, pool: str, pooldir: Path, fmt: str) -> None:
    conn.volume_create(pool, VolumeCreateArgs(f"v.{fmt}", 32 * MiB, format=fmt))
    info = qemu_info(pooldir / f"v.{fmt}")
    assert info["format"] == fmt
    assert int(info["virtual-size"]) >= 32 * MiB  # type: ignore[call-overload]
    assert conn.volume_info(pool, f"v.{fmt}").format == fmt


def test_refresh_finds_foreign_files_and_skips_others(conn: EmbeddedConnection, pool: str,
                                                       pooldir: Path) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(pooldir / "made.qcow2"),
                    "3G"], check=True)
    with open(pooldir / "plain.raw", "wb") as fh:
        fh.truncate(10 * MiB)
    os.mkfifo(pooldir / "fifo")
    os.symlink("/nonexistent", pooldir / "dangling")
    conn.pool_refresh(pool)
    vols = {v.name: v for v in conn.list_volumes(pool)}
    assert set(vols) == {"made.qcow2", "plain.raw"}
    assert (vols["made.qcow2"].format, vols["made.qcow2"].capacity) == ("qcow2", 3 * GiB)
    assert vols["plain.raw"].capacity == 10 * MiB
    # A file that changes behind our back is re-read; one that goes away is dropped.
    with open(pooldir / "plain.raw", "r+b") as fh:
        fh.truncate(20 * MiB)
    (pooldir / "made.qcow2").unlink()
    conn.pool_refresh(pool)
    vols = {v.name: v for v in conn.list_volumes(pool)}
    assert set(vols) == {"plain.raw"} and vols["plain.raw"].capacity == 20 * MiB


def test_refresh_racing_a_delete_brings_no_ghost_back(conn: EmbeddedConnection, pool: str,
                                                      pooldir: Path) -> None:
    # The scan sees a volume that another process deletes (file and row) before the scan's
    # result is written: the volume must stay deleted, not come back as a row with no file.
    conn.volume_create(pool, VolumeCreateArgs("doomed.img", MiB))
    conn.volume_create(pool, VolumeCreateArgs("kept.img", MiB))
    definition = conn.state.definition(conn.state.row(pool))
    known = {n: s for n, s in conn.index.stamps(pool).items() if n != "kept.img"}
    result = backend_for("dir").scan(definition, known)
    assert "doomed.img" in result.unchanged
    result.changed += [r for r in backend_for("dir").scan(definition, {}).changed
                       if r.name == "doomed.img"]  # as if its stamp had changed too
    conn.volume_delete(pool, "doomed.img")
    (pooldir / "outside.img").write_bytes(b"x")  # appears meanwhile: the next scan's
    conn.index.apply_scan(pool, known, result,
                          still_there=lambda rec: backend_for("dir").still_there(definition, rec))
    assert [v.name for v in conn.list_volumes(pool)] == ["kept.img"]
    conn.pool_refresh(pool)
    assert [v.name for v in conn.list_volumes(pool)] == ["kept.img", "outside.img"]


def test_lookup_by_key_and_path(conn: EmbeddedConnection, pool: str, pooldir: Path) -> None:
    conn.volume_create(pool, VolumeCreateArgs("k.img", MiB))
    path = str(pooldir / "k.img")
    assert conn.volume_lookup_by_key(path).name == "k.img"
    assert conn.volume_lookup_by_path(str(pooldir) + "//k.img").pool == pool
    with pytest.raises(NoSuchVolume, match="no storage vol with matching path"):
        conn.volume_lookup_by_path(str(pooldir / "nope"))
    conn.pool_stop(pool)
    with pytest.raises(NoSuchVolume):
        conn.volume_lookup_by_key(path)
    with pytest.raises(OperationInvalid, match="is not active"):
        conn.list_volumes(pool)


def test_duplicate_and_foreign_name(conn: EmbeddedConnection, pool: str, pooldir: Path) -> None:
    conn.volume_create(pool, VolumeCreateArgs("d", MiB))
    with pytest.raises(AlreadyExists, match="exists already"):
        conn.volume_create(pool, VolumeCreateArgs("d", 2 * MiB))
    assert (pooldir / "d").stat().st_size == MiB
    (pooldir / "theirs").write_bytes(b"keep me")
    with pytest.raises(AlreadyExists, match="already exists"):
        conn.volume_create(pool, VolumeCreateArgs("theirs", MiB))
    assert (pooldir / "theirs").read_bytes() == b"keep me"


@pytest.mark.parametrize("name", ["a/b", "..", ".", "-x", "a\nb", "a\x00b", "x" * 256])
def test_bad_volume_names_refused(conn: EmbeddedConnection, pool: str, pooldir: Path,
                                  name: str) -> None:
    with pytest.raises(InvalidArgument) as ei:
        conn.volume_create(pool, VolumeCreateArgs(name, MiB))
    assert "\n" not in str(ei.value)
    assert os.listdir(pooldir) == []


def test_bad_sizes_refused(conn: EmbeddedConnection, pool: str, pooldir: Path) -> None:
    for cap in ("-1", "99999999999999999999999", "12 parsecs", "1e9"):
        with pytest.raises((InvalidArgument, XMLError)):
            conn.volume_create_xml(pool, vol_xml("s", cap))
    with pytest.raises(InvalidArgument):
        conn.volume_create(pool, VolumeCreateArgs("s", -5))
    assert os.listdir(pooldir) == []


def test_qcow2_rules_from_libvirt(conn: EmbeddedConnection, pool: str, pooldir: Path) -> None:
    with pytest.raises(InvalidArgument, match="lazy_refcounts"):
        conn.volume_create_xml(pool, vol_xml("l", "1G", "qcow2", "<compat>0.10</compat>"
                                             "<features><lazy_refcounts/></features>"))
    with pytest.raises(Unsupported, match="legacy encryption"):
        conn.volume_create_xml(pool, vol_xml("e", "1G", "qcow2", "<encryption format='qcow'>"
                                             "<secret type='passphrase' uuid='e78d4b51-a2af-485f"
                                             "-b0f5-afca709a80f4'/></encryption>"))
    with pytest.raises(Unsupported, match="backing storage not supported for raw"):
        conn.volume_create_xml(pool, "<volume><name>r</name><capacity>1</capacity><target>"
                                     "<format type='raw'/></target><backingStore><path>/dev/null"
                                     "</path></backingStore></volume>")
    assert os.listdir(pooldir) == []


def test_permissions_applied(conn: EmbeddedConnection, pool: str, pooldir: Path) -> None:
    conn.volume_create_xml(pool, vol_xml("m", "1M", extra="<permissions><mode>0640</mode>"
                                         "<owner>107</owner><group>108</group></permissions>"))
    st = (pooldir / "m").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 107, 108)
    doc = etree.fromstring(conn.volume_xml(pool, "m").encode())
    assert doc.findtext("target/permissions/mode") == "0640"
    assert doc.findtext("target/permissions/owner") == "107"


def test_delete(conn: EmbeddedConnection, pool: str, pooldir: Path) -> None:
    conn.volume_create(pool, VolumeCreateArgs("gone", MiB))
    conn.volume_delete(pool, "gone")
    assert not (pooldir / "gone").exists()
    with pytest.raises(NoSuchVolume):
        conn.volume_info(pool, "gone")
    with pytest.raises(NoSuchVolume):
        conn.volume_delete(pool, "gone")


def test_volume_xml_validates(conn: EmbeddedConnection, pool: str) -> None:
    from virtstore.xml import validate

    conn.volume_create(pool, VolumeCreateArgs("x.qcow2", GiB, format="qcow2"))
    validate(conn.volume_xml(pool, "x.qcow2"), "volume")
    validate(conn.pool_xml(pool), "pool")


def test_no_staging_files_left_after_failure(conn: EmbeddedConnection, pool: str,
                                             pooldir: Path) -> None:
    # A preallocation larger than the filesystem fails; nothing stays behind.
    with pytest.raises(Exception, match=r"[Ss]pace|too large"):
        conn.volume_create(pool, VolumeCreateArgs("huge", 1 << 62, allocation=1 << 62))
    assert os.listdir(pooldir) == []
    with pytest.raises(NoSuchVolume):
        conn.volume_info(pool, "huge")


@requires_qemu_img
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_luks_volume_key_from_secret(conn: EmbeddedConnection, pool: str, pooldir: Path,
                                     fmt: str) -> None:
    path = pooldir / "enc.img"
    uuid = conn.secret_define_xml(f"<secret><usage type='volume'><volume>{path}</volume>"
                                  "</usage></secret>")
    conn.secret_set_value(uuid, b"correct horse")
    conn.volume_create_xml(pool, vol_xml("enc.img", "16M", fmt,
                                         f"<encryption format='luks'><secret type='passphrase' "
                                         f"uuid='{uuid}'/></encryption>"))
    info = qemu_info(path)
    expected = "luks" if fmt == "raw" else "qcow2"
    assert info["format"] == expected
    # The image opens with the secret's value and not with another.
    driver = "luks" if fmt == "raw" else "qcow2"
    key = "key-secret" if fmt == "raw" else "encrypt.key-secret"

    def opens(pw: str) -> bool:
        return subprocess.run(
            ["qemu-io", "--object", f"secret,id=s0,data={pw}", "--image-opts",
             f"driver={driver},{key}=s0,file.filename={path}", "-c", "read 0 4096"],
            capture_output=True).returncode == 0
    assert opens("correct horse") and not opens("wrong")
    assert conn.volume_info(pool, "enc.img").capacity == 16 * MiB


@requires_qemu_img
def test_qcow2_v3_details_in_xml_as_libvirt(conn: EmbeddedConnection, pool: str,
                                            pooldir: Path) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    "compat=1.1,lazy_refcounts=on,cluster_size=131072",
                    str(pooldir / "v3.qcow2"), "10M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10",
                    str(pooldir / "v2.qcow2"), "10M"], check=True)
    conn.pool_refresh(pool)
    v3 = etree.fromstring(conn.volume_xml(pool, "v3.qcow2").encode())
    assert v3.findtext("target/compat") == "1.1"
    assert v3.findtext("target/clusterSize") == "131072"
    assert v3.find("target/features/lazy_refcounts") is not None
    v2 = etree.fromstring(conn.volume_xml(pool, "v2.qcow2").encode())
    assert v2.find("target/compat") is None and v2.find("target/features") is None
