"""The same scenarios through the embedded engine and through virtstored's client.

Whatever a caller does with ``virtstore.connect()`` must give the same results, files on
disk and errors over ``unix:///...`` as in process.
"""

from __future__ import annotations

import os
import stat

import pytest

from conftest import dir_pool_xml, qemu_info, requires_qemu_img
from server_fixtures import Setup, setup_fixture  # noqa: F401
from virtstore.api import PoolFilter, VolumeCreateArgs
from virtstore.errors import (
    AlreadyExists,
    InvalidArgument,
    NoSuchPool,
    NoSuchSecret,
    NoSuchVolume,
    OperationInvalid,
)


def test_pool_lifecycle(setup: Setup) -> None:
    conn, _, tmp = setup
    target = tmp / "p1"
    name = conn.pool_define_xml(dir_pool_xml("p1", target))
    assert name == "p1"
    info = conn.pool_info("p1")
    assert (info.state, info.persistent, info.autostart) == ("inactive", True, False)
    with pytest.raises(OperationInvalid):
        conn.list_volumes("p1")
    conn.pool_build("p1")
    assert target.is_dir()
    conn.pool_start("p1")
    assert conn.pool_info("p1").state == "running"
    assert conn.pool_lookup_by_uuid(info.uuid) == "p1"
    assert conn.pool_lookup_by_target_path(str(target)) == "p1"
    names = [p.name for p in conn.list_pools()]
    assert names == sorted(names) and "p1" in names
    assert [p.name for p in conn.list_pools(PoolFilter(active=False))] == []
    assert "p1" in [p.name for p in conn.list_pools(PoolFilter(types=("dir",)))]
    assert conn.list_pools(PoolFilter(types=("logical",))) == []
    conn.pool_set_autostart("p1", True)
    assert conn.pool_info("p1").autostart
    assert "p1" in [p.name for p in conn.list_pools(PoolFilter(autostart=True))]
    xml = conn.pool_xml("p1")
    assert "<name>p1</name>" in xml and str(target) in xml
    assert "<name>p1</name>" in conn.pool_xml("p1", inactive=True)
    # a file dropped in by hand appears after a refresh
    (target / "by-hand.img").write_bytes(b"\0" * 4096)
    assert conn.list_volumes("p1") == []
    conn.pool_refresh("p1")
    assert [v.name for v in conn.list_volumes("p1")] == ["by-hand.img"]
    conn.pool_stop("p1")
    assert conn.pool_info("p1").state == "inactive"
    conn.pool_start("p1")
    with pytest.raises(OperationInvalid):
        conn.pool_undefine("p1")  # running
    conn.pool_stop("p1")
    (target / "by-hand.img").unlink()
    conn.pool_delete("p1")
    assert not target.exists()
    conn.pool_undefine("p1")
    with pytest.raises(NoSuchPool):
        conn.pool_info("p1")
    with pytest.raises(NoSuchPool):
        conn.pool_lookup_by_uuid(info.uuid)


def test_pool_errors_are_the_engines(setup: Setup) -> None:
    conn, _, tmp = setup
    with pytest.raises(NoSuchPool, match="no storage pool with matching name 'nope'"):
        conn.pool_start("nope")
    conn.pool_define_xml(dir_pool_xml("p2", tmp / "p2"))
    with pytest.raises(AlreadyExists):
        conn.pool_define_xml(dir_pool_xml("p3", tmp / "p2"))  # same target path
    with pytest.raises(InvalidArgument):
        conn.pool_define_xml("<pool type='dir'><name>../x</name><target><path>/tmp/x"
                             "</path></target></pool>")
    with pytest.raises(InvalidArgument):
        conn.pool_define_xml("<!DOCTYPE pool [<!ENTITY e 'x'>]><pool type='dir'>"
                             "<name>&e;</name></pool>")


def test_transient_pool(setup: Setup) -> None:
    conn, _, tmp = setup
    name = conn.pool_create_xml(dir_pool_xml("t1", tmp / "t1"), build=True)
    info = conn.pool_info(name)
    assert (info.state, info.persistent) == ("running", False)
    conn.pool_stop("t1")
    with pytest.raises(NoSuchPool):
        conn.pool_info("t1")


@requires_qemu_img
def test_volumes(setup: Setup) -> None:
    conn, _, tmp = setup
    target = tmp / "vols"
    conn.pool_define_xml(dir_pool_xml("v", target))
    conn.pool_start("v", build=True)
    raw = conn.volume_create("v", VolumeCreateArgs("disk.raw", 8 << 20, format="raw"))
    assert raw == "disk.raw"
    st = os.stat(target / "disk.raw")
    assert st.st_size == 8 << 20 and stat.S_IMODE(st.st_mode) == 0o600
    qc = conn.volume_create_xml("v", "<volume><name>disk.qcow2</name>"
                                "<capacity unit='M'>64</capacity><allocation>0</allocation>"
                                "<target><format type='qcow2'/></target></volume>")
    assert qc == "disk.qcow2"
    qi = qemu_info(target / "disk.qcow2")
    assert qi["format"] == "qcow2" and qi["virtual-size"] == 64 << 20
    over = conn.volume_create("v", VolumeCreateArgs("over.qcow2", 64 << 20, format="qcow2",
                                                    backing_vol="disk.qcow2",
                                                    backing_vol_format="qcow2"))
    oi = qemu_info(target / over)
    assert oi["backing-filename"] == str(target / "disk.qcow2")
    vols = conn.list_volumes("v")
    assert [v.name for v in vols] == ["disk.qcow2", "disk.raw", "over.qcow2"]
    info = conn.volume_info("v", "disk.qcow2")
    assert (info.format, info.capacity, info.path) == ("qcow2", 64 << 20,
                                                       str(target / "disk.qcow2"))
    assert conn.volume_lookup_by_key(info.key) == info
    assert conn.volume_lookup_by_path(str(target / "disk.qcow2")) == info
    assert conn.volume_by_path_or_key(str(target / "disk.raw")).name == "disk.raw"
    xml = conn.volume_xml("v", "disk.qcow2")
    assert "<name>disk.qcow2</name>" in xml and "<format type='qcow2'/>" in xml
    with pytest.raises(AlreadyExists):
        conn.volume_create("v", VolumeCreateArgs("disk.raw", 1 << 20))
    for bad in ("../escape.img", "a/b", ".."):
        with pytest.raises(InvalidArgument):
            conn.volume_create("v", VolumeCreateArgs(bad, 1 << 20))
    assert not (tmp / "escape.img").exists()
    conn.volume_delete("v", "over.qcow2")
    assert not (target / "over.qcow2").exists()
    with pytest.raises(NoSuchVolume):
        conn.volume_info("v", "over.qcow2")
    with pytest.raises(NoSuchVolume):
        conn.volume_lookup_by_path(str(target / "over.qcow2"))
    with pytest.raises(NoSuchVolume):
        conn.volume_delete("v", "../disk.raw")


def test_secrets(setup: Setup) -> None:
    conn, _, _ = setup
    uuid = conn.secret_define_xml("<secret ephemeral='no' private='no'><description>ceph key"
                                  "</description><usage type='ceph'><name>client.admin</name>"
                                  "</usage></secret>")
    info = conn.secret_info(uuid)
    assert (info.usage_type, info.usage_id, info.private) == ("ceph", "client.admin", False)
    assert [s.uuid for s in conn.list_secrets()] == [uuid]
    assert conn.secret_lookup_by_usage("ceph", "client.admin") == uuid
    assert f"<uuid>{uuid}</uuid>" in conn.secret_xml(uuid)
    value = bytes(range(256))
    conn.secret_set_value(uuid, value)
    assert conn.secret_get_value(uuid) == value
    conn.secret_undefine(uuid)
    with pytest.raises(NoSuchSecret):
        conn.secret_info(uuid)
    assert conn.list_secrets() == []


def test_capabilities(setup: Setup) -> None:
    xml = setup.conn.pool_capabilities_xml()
    assert xml.lstrip().startswith("<storagepoolCapabilities")
    assert "<pool type='dir' supported='yes'>" in xml


def test_host_features_devices_and_sources(setup: Setup) -> None:
    """What the host can do and has, the same through either transport."""
    features = {f["type"]: f for f in setup.conn.pool_type_features()}
    assert features["dir"]["supported"] and features["dir"]["clone"]
    devices = setup.conn.host_devices()
    assert isinstance(devices, list)
    assert all("path" in d for d in devices)
    sources = setup.conn.find_pool_sources("logical")
    assert sources.lstrip().startswith("<sources")


def test_volume_features(setup: Setup) -> None:
    """A volume's features, the same through the engine and through virtstored."""
    conn, _, tmp = setup
    conn.pool_define_xml(dir_pool_xml("f", tmp / "f"))
    conn.pool_start("f", build=True)
    conn.volume_create("f", VolumeCreateArgs("q.qcow2", 8 << 20, format="qcow2"))
    conn.volume_create("f", VolumeCreateArgs("v.vmdk", 8 << 20, format="vmdk"))
    q = conn.volume_features("f", "q.qcow2")
    assert q["snapshot"] and q["snapshot-external"] and q["resize-shrink"] and q["export"]
    v = conn.volume_features("f", "v.vmdk")
    assert not v["resize-grow"] and not v["snapshot"] and v["clone-full"] and v["download"]
    with pytest.raises(NoSuchVolume):
        conn.volume_features("f", "nosuch")


def test_guest_filesystems(setup: Setup) -> None:
    """vol-df and vol-inspect of a volume holding an ext4 filesystem, the same through
    the engine and through virtstored."""
    import subprocess

    conn, _, tmp = setup
    conn.pool_define_xml(dir_pool_xml("g", tmp / "g"))
    conn.pool_start("g", build=True)
    conn.volume_create("g", VolumeCreateArgs("disk.raw", 32 << 20, format="raw"))
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "guestroot", str(tmp / "g" / "disk.raw")],
                   check=True)
    conn.pool_refresh("g")
    df = conn.volume_df("g", "disk.raw")
    (fs,) = df["filesystems"]
    assert fs["type"] == "ext4" and fs["label"] == "guestroot" and 20 << 20 < fs["size"] <= 32 << 20
    assert conn.volume_inspect("g", "disk.raw")["filesystems"][0]["label"] == "guestroot"
    assert conn.pool_df("g")[0]["volume"] == "disk.raw"


def test_backup_and_restore(setup: Setup) -> None:
    """vol-backup, backup-verify and vol-restore, the same through the engine and through
    virtstored's local socket: the restored volume holds the backed-up bytes."""
    conn, _, tmp = setup
    conn.pool_define_xml(dir_pool_xml("b", tmp / "b"))
    conn.pool_start("b", build=True)
    conn.volume_create("b", VolumeCreateArgs("v.raw", 8 << 20, format="raw"))
    payload = os.urandom(1 << 20)
    with open(tmp / "b" / "v.raw", "r+b") as fh:
        fh.seek(3 << 20)
        fh.write(payload)
    done = conn.job_wait(conn.volume_backup("b", "v.raw", str(tmp / "bk")).id)
    assert done.state == "done", done.error
    assert len(conn.backup_list(str(tmp / "bk"))) == 1
    assert conn.job_wait(conn.backup_verify(str(tmp / "bk")).id).state == "done"
    done = conn.job_wait(conn.volume_restore(str(tmp / "bk"), "b", "r.raw").id)
    assert done.state == "done", done.error
    assert (tmp / "b" / "r.raw").read_bytes() == (tmp / "b" / "v.raw").read_bytes()


def test_cluster_views_of_a_lone_engine(setup: Setup) -> None:
    """An engine outside a cluster says so, through the engine and through virtstored;
    asking it for leases is refused with the same one-line reason."""
    from virtstore.errors import Unsupported

    conn, _, _ = setup
    assert conn.cluster_status()["clustered"] is False
    with pytest.raises(Unsupported, match="not a member of a cluster"):
        conn.volume_lease_list()


def test_listing_follows_every_change(setup: Setup) -> None:
    """A listing answered again shows what changed since, whether the change came
    through this connection or through another engine on the same state."""
    import virtstore

    conn, root, tmp = setup
    conn.pool_create_xml(dir_pool_xml("fol", tmp / "fol"), build=True)
    conn.volume_create("fol", VolumeCreateArgs("a.img", 1 << 20))
    assert [(v.name, v.capacity) for v in conn.list_volumes("fol")] == [("a.img", 1 << 20)]
    assert [v.name for v in conn.list_volumes("fol")] == ["a.img"]
    conn.volume_create("fol", VolumeCreateArgs("b.img", 1 << 20))
    assert [v.name for v in conn.list_volumes("fol")] == ["a.img", "b.img"]
    other = virtstore.connect(root=str(root))
    try:
        assert other.job_wait(other.volume_resize("fol", "a.img", 3 << 20).id).state == "done"
        assert [(v.name, v.capacity) for v in conn.list_volumes("fol")] == [
            ("a.img", 3 << 20), ("b.img", 1 << 20)]
        other.volume_delete("fol", "b.img")
        assert [v.name for v in conn.list_volumes("fol")] == ["a.img"]
    finally:
        other.close()


def test_listing_matches_each_volumes_info(setup: Setup) -> None:
    """A listing holds, in name order, exactly what each volume's lookup answers, for
    names a JSON encoder must escape and for volumes of every format."""
    conn, _, tmp = setup
    target = tmp / "lst"
    conn.pool_create_xml(dir_pool_xml("lst", target), build=True)
    names = ["zeta.img", 'quo"te\\.img', "ünï-çødé.img", "sp ace.img", "a.qcow2", "0.img"]
    for n in names:
        fmt = "qcow2" if n.endswith("qcow2") else "raw"
        conn.volume_create("lst", VolumeCreateArgs(n, 3 << 20, format=fmt))
    (target / "dropped.img").write_bytes(b"x" * 8192)
    conn.pool_refresh("lst")
    vols = conn.list_volumes("lst")
    assert [v.name for v in vols] == sorted([*names, "dropped.img"])
    assert vols == [conn.volume_info("lst", v.name) for v in vols]
    dropped = next(v for v in vols if v.name == "dropped.img")
    assert (dropped.capacity, dropped.format, dropped.path) == (
        8192, "raw", str(target / "dropped.img"))
    assert all(v.pool == "lst" and v.key == v.path for v in vols)
