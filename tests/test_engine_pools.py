"""Pool lifecycle through the embedded engine, on real directories."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from lxml import etree

from conftest import dir_pool_xml
from virtstore.api import PoolFilter
from virtstore.api.embedded import EmbeddedConnection
from virtstore.errors import AlreadyExists, InvalidArgument, NoSuchPool, OperationInvalid, XMLError


def test_default_pool_only_when_asked(root: Path) -> None:
    # A plain engine (a command, a script) gets no pool it did not ask for.
    with EmbeddedConnection(str(root)) as plain:
        assert plain.list_pools() == []
    assert not (root / "images").exists()
    # virtstored's first start on this root asks for it: defined, built, running.
    with EmbeddedConnection(str(root), default_pool=True) as daemon:
        info = daemon.pool_info("default")
        assert info.state == "running"
        assert info.autostart and info.persistent
        assert info.target_path == str(root / "images")
        assert (root / "images").is_dir()
        assert info.capacity > 0 and info.available > 0
        daemon.pool_stop("default")
        daemon.pool_undefine("default")
    # Offered once: a default pool the user removed is not made again.
    with EmbeddedConnection(str(root), default_pool=True) as again:
        assert again.list_pools() == []


def test_define_start_stop_undefine(conn: EmbeddedConnection, pooldir: Path, root: Path) -> None:
    name = conn.pool_define_xml(dir_pool_xml("p1", pooldir))
    assert name == "p1"
    assert (root / "pools" / "p1.xml").is_file()
    info = conn.pool_info("p1")
    assert (info.state, info.persistent, info.autostart) == ("inactive", True, False)
    assert info.capacity == 0
    conn.pool_start("p1")
    info = conn.pool_info("p1")
    assert info.state == "running"
    st = os.statvfs(pooldir)
    assert info.capacity == st.f_frsize * st.f_blocks
    with pytest.raises(OperationInvalid, match="already active"):
        conn.pool_start("p1")
    with pytest.raises(OperationInvalid, match="still active"):
        conn.pool_undefine("p1")
    conn.pool_stop("p1")
    with pytest.raises(OperationInvalid, match="is not active"):
        conn.pool_stop("p1")
    conn.pool_undefine("p1")
    assert not (root / "pools" / "p1.xml").exists()
    with pytest.raises(NoSuchPool, match="no storage pool with matching name 'p1'"):
        conn.pool_info("p1")


def test_duplicate_name_uuid_and_target(conn: EmbeddedConnection, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    conn.pool_define_xml(dir_pool_xml("one", a, "11111111-2222-3333-4444-555555555555"))
    with pytest.raises(AlreadyExists, match="already exists with uuid"):
        conn.pool_define_xml(dir_pool_xml("one", b, "11111111-2222-3333-4444-666666666666"))
    with pytest.raises(AlreadyExists, match="already defined with uuid"):
        conn.pool_define_xml(dir_pool_xml("two", b, "11111111-2222-3333-4444-555555555555"))
    with pytest.raises(AlreadyExists, match="Storage source conflict with pool: 'one'"):
        conn.pool_define_xml(dir_pool_xml("three", a))
    # Redefining the same pool (same name and uuid) is allowed and takes the new target.
    conn.pool_define_xml(dir_pool_xml("one", b, "11111111-2222-3333-4444-555555555555"))
    assert conn.pool_info("one").target_path == str(b)


def test_transient_pool_disappears_when_stopped(conn: EmbeddedConnection, pooldir: Path) -> None:
    conn.pool_create_xml(dir_pool_xml("t", pooldir))
    info = conn.pool_info("t")
    assert info.state == "running" and not info.persistent
    with pytest.raises(OperationInvalid, match="transient"):
        conn.pool_set_autostart("t", True)
    conn.pool_stop("t")
    with pytest.raises(NoSuchPool):
        conn.pool_info("t")


def test_build_creates_directory_with_mode_and_delete_removes_it(
        conn: EmbeddedConnection, tmp_path: Path) -> None:
    target = tmp_path / "deep" / "er" / "pool"
    conn.pool_define_xml(f"<pool type='dir'><name>b</name><target><path>{target}</path>"
                         "<permissions><mode>0750</mode></permissions></target></pool>")
    with pytest.raises(OperationInvalid, match="cannot open directory"):
        conn.pool_start("b")
    conn.pool_build("b")
    assert stat.S_IMODE(target.stat().st_mode) == 0o750
    conn.pool_start("b")
    (target / "f").write_bytes(b"x")
    conn.pool_stop("b")
    with pytest.raises(OperationInvalid, match="Directory not empty"):
        conn.pool_delete("b")
    (target / "f").unlink()
    conn.pool_delete("b")
    assert not target.exists()


def test_start_with_build(conn: EmbeddedConnection, tmp_path: Path) -> None:
    target = tmp_path / "new"
    conn.pool_define_xml(dir_pool_xml("nb", target))
    conn.pool_start("nb", build=True)
    assert target.is_dir() and conn.pool_info("nb").state == "running"


def test_autostart_mark(conn: EmbeddedConnection, pooldir: Path, root: Path) -> None:
    conn.pool_define_xml(dir_pool_xml("a", pooldir))
    conn.pool_set_autostart("a", True)
    assert conn.pool_info("a").autostart
    assert os.path.islink(root / "pools" / "autostart" / "a.xml")
    conn.pool_set_autostart("a", False)
    assert not conn.pool_info("a").autostart


def test_lookups(conn: EmbeddedConnection, pooldir: Path) -> None:
    conn.pool_define_xml(dir_pool_xml("l", pooldir, "0f0e0d0c-0b0a-0908-0706-050403020100"))
    assert conn.pool_lookup_by_uuid("0f0e0d0c-0b0a-0908-0706-050403020100") == "l"
    assert conn.pool_lookup_by_uuid("0f0e0d0c0b0a09080706050403020100") == "l"
    assert conn.pool_lookup_by_target_path(str(pooldir) + "//") == "l"
    with pytest.raises(NoSuchPool, match="matching uuid"):
        conn.pool_lookup_by_uuid("00000000-0000-0000-0000-000000000000")


def test_list_filters(conn: EmbeddedConnection, tmp_path: Path) -> None:
    for n in ("x", "y"):
        (tmp_path / n).mkdir()
        conn.pool_define_xml(dir_pool_xml(n, tmp_path / n))
    conn.pool_start("x")
    names = lambda f: sorted(p.name for p in conn.list_pools(f))  # noqa: E731
    conn.pool_set_autostart("y", True)
    assert names(None) == ["x", "y"]
    assert names(PoolFilter(active=True)) == ["x"]
    assert names(PoolFilter(active=False)) == ["y"]
    assert names(PoolFilter(autostart=True)) == ["y"]
    assert names(PoolFilter(types=("logical",))) == []


def test_pool_xml_active_and_inactive(conn: EmbeddedConnection, pooldir: Path) -> None:
    conn.pool_define_xml(dir_pool_xml("x", pooldir))
    os.chmod(pooldir, 0o751)
    sizes = ("capacity", "allocation", "available")
    never_started = etree.fromstring(conn.pool_xml("x", inactive=True).encode())
    assert [never_started.findtext(t) for t in sizes] == ["0", "0", "0"]
    assert never_started.find("target/permissions") is None
    conn.pool_start("x")
    active = etree.fromstring(conn.pool_xml("x").encode())
    assert int(active.findtext("capacity") or 0) > 0
    # As libvirt: the target directory's mode and owner, read from it.
    assert active.findtext("target/permissions/mode") == "0751"
    assert active.findtext("target/permissions/owner") == str(os.getuid())
    # --inactive of a running pool that was not redefined is its live definition.
    inactive = etree.fromstring(conn.pool_xml("x", inactive=True).encode())
    assert inactive.findtext("target/path") == str(pooldir)
    assert int(inactive.findtext("capacity") or 0) > 0
    assert inactive.findtext("target/permissions/mode") == "0751"
    # A stopped pool shows the last values it had, in this process and in the next.
    conn.pool_stop("x")
    stopped = etree.fromstring(conn.pool_xml("x", inactive=True).encode())
    assert int(stopped.findtext("capacity") or 0) > 0
    assert stopped.findtext("target/permissions/mode") == "0751"
    with EmbeddedConnection(conn.state.root) as other:
        assert other.pool_xml("x") == conn.pool_xml("x")
    # The definition file stays what was defined: no runtime values in it.
    on_disk = etree.parse(os.path.join(conn.state.root, "pools", "x.xml")).getroot()
    assert on_disk.findtext("capacity") == "0" and on_disk.find("target/permissions") is None


def test_hostile_pool_xml_changes_nothing(conn: EmbeddedConnection, root: Path) -> None:
    before = sorted(os.listdir(root / "pools"))
    bad = ["<!DOCTYPE pool [<!ENTITY x 'y'>]><pool type='dir'><name>&x;</name>"
           "<target><path>/tmp</path></target></pool>",
           "<pool type='dir'><name>a/b</name><target><path>/tmp/q</path></target></pool>",
           "<pool type='nonsense'><name>n</name></pool>",
           "<pool type='dir'><name>n</name></pool>",
           "<pool"]
    for doc in bad:
        with pytest.raises((XMLError, InvalidArgument)) as ei:
            conn.pool_define_xml(doc)
        assert "\n" not in str(ei.value)
    assert sorted(os.listdir(root / "pools")) == before


def test_pool_type_features_tell_what_works_here(conn: EmbeddedConnection) -> None:
    features = {f["type"]: f for f in conn.pool_type_features()}
    d = features["dir"]
    assert d["supported"] and d["reason"] is None and not d["shared"]
    assert d["clone"] and d["resize"] and d["upload"] and "internal" in d["snapshots"]["qcow2"]
    # A type this host cannot run says why, in words.
    for f in features.values():
        assert f["supported"] == (f["reason"] is None)
    assert features.keys() >= {"dir", "fs", "logical", "disk", "netfs", "rbd", "zfs"}
