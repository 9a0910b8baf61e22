"""State across processes: restarts, crashes, concurrent writers, libvirt import, secrets."""

from __future__ import annotations

import base64
import os
import stat
import subprocess
import sys
import textwrap
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from conftest import dir_pool_xml
from virtstore.api import VolumeCreateArgs
from virtstore.api.embedded import EmbeddedConnection
from virtstore.errors import AlreadyExists, Forbidden, NoSuchSecret

MiB = 1024 * 1024


def test_restart_keeps_definitions_and_starts_autostart_pools(
        root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIRTSTORE_BOOT_ID", "boot-1")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    with EmbeddedConnection(str(root), default_pool=True) as c:
        c.pool_define_xml(dir_pool_xml("auto", a))
        c.pool_set_autostart("auto", True)
        c.pool_define_xml(dir_pool_xml("manual", b))
        c.pool_start("manual")
        c.pool_create_xml(dir_pool_xml("transient", tmp_path / "t"), build=True)
        c.pool_stop("default")
    # Same boot: a new process sees exactly the state the last one left.
    with EmbeddedConnection(str(root)) as c:
        states = {p.name: p.state for p in c.list_pools()}
        assert states == {"auto": "inactive", "default": "inactive", "manual": "running",
                          "transient": "running"}
    # After a host restart: persistent pools stay defined, autostart ones run, others don't,
    # transient ones are gone.
    monkeypatch.setenv("VIRTSTORE_BOOT_ID", "boot-2")
    with EmbeddedConnection(str(root)) as c:
        states = {p.name: p.state for p in c.list_pools()}
        assert states == {"auto": "running", "default": "running", "manual": "inactive"}


def test_definition_files_are_libvirt_xml(conn: EmbeddedConnection, pooldir: Path,
                                          root: Path) -> None:
    from virtstore.xml import validate

    conn.pool_define_xml(dir_pool_xml("f", pooldir))
    text = (root / "pools" / "f.xml").read_text()
    validate(text, "pool")
    assert stat.S_IMODE((root / "pools" / "f.xml").stat().st_mode) == 0o600


def test_definition_added_by_hand_is_picked_up(conn: EmbeddedConnection, pooldir: Path,
                                               root: Path) -> None:
    (root / "pools" / "hand.xml").write_text(
        dir_pool_xml("hand", pooldir, "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"))
    with EmbeddedConnection(str(root)) as c:
        assert c.pool_info("hand").uuid == "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"


def test_import_from_libvirt_config(conn: EmbeddedConnection, tmp_path: Path) -> None:
    cfg = tmp_path / "etc-libvirt-storage"
    (cfg / "autostart").mkdir(parents=True)
    for n in ("lv1", "lv2"):
        (tmp_path / n).mkdir()
        (cfg / f"{n}.xml").write_text(
            "<!--\nWARNING: THIS IS AN AUTO-GENERATED FILE.\n-->\n" + dir_pool_xml(n, tmp_path / n))
    os.symlink(cfg / "lv1.xml", cfg / "autostart" / "lv1.xml")
    (cfg / "broken.xml").write_text("<pool type='dir'>")
    assert conn.import_libvirt_pools(str(cfg)) == ["lv1", "lv2"]
    assert conn.pool_info("lv1").autostart and not conn.pool_info("lv2").autostart


def _create_many(args: tuple[str, str, list[str]]) -> list[str]:
    root, pool, names = args
    outcomes = []
    with EmbeddedConnection(root) as c:
        for n in names:
            try:
                c.volume_create(pool, VolumeCreateArgs(n, MiB, allocation=0))
                outcomes.append("created")
            except AlreadyExists:
                outcomes.append("exists")
            c.list_volumes(pool)
    return outcomes


def test_concurrent_processes_create_each_name_once(conn: EmbeddedConnection, pool: str,
                                                    root: Path, pooldir: Path) -> None:
    names = [f"v{i:03d}" for i in range(60)]
    jobs = [(str(root), pool, names if k % 2 == 0 else names[::-1]) for k in range(4)]
    with ProcessPoolExecutor(4) as ex:
        results = [o for r in ex.map(_create_many, jobs) for o in r]
    assert results.count("created") == len(names)
    assert results.count("exists") == 3 * len(names)
    assert sorted(os.listdir(pooldir)) == names
    assert [v.name for v in conn.list_volumes(pool)] == names


KILL_CHILD = textwrap.dedent("""
    import os, signal, sys
    from virtstore.backends.dir import DirBackend
    from virtstore.api.embedded import EmbeddedConnection
    from virtstore.api import VolumeCreateArgs

    real = DirBackend.create_volume
    def dying(self, pool, staging, req):
        real(self, pool, staging, req)
        os.kill(os.getpid(), signal.SIGKILL)
    DirBackend.create_volume = dying
    c = EmbeddedConnection(sys.argv[1])
    c.volume_create(sys.argv[2], VolumeCreateArgs("victim", 1 << 20, format=sys.argv[3]))
""")


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_killed_create_leaves_nothing_and_is_cleaned(conn: EmbeddedConnection, pool: str,
                                                     root: Path, pooldir: Path, fmt: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    proc = subprocess.run([sys.executable, "-c", KILL_CHILD, str(root), pool, fmt],
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    leftovers = os.listdir(pooldir)
    assert "victim" not in leftovers and len(leftovers) == 1  # the staging file
    conn.pool_refresh(pool)
    assert [v.name for v in conn.list_volumes(pool)] == []
    with caplog.at_level("WARNING", logger="virtstore"):
        with EmbeddedConnection(str(root)) as c2:
            assert os.listdir(pooldir) == []
            c2.volume_create(pool, VolumeCreateArgs("victim", MiB))
    assert any("victim" in r.getMessage() for r in caplog.records)


def test_secrets_lifecycle(conn: EmbeddedConnection, root: Path) -> None:
    uuid = conn.secret_define_xml(
        "<secret ephemeral='no' private='no'><description>ceph key</description>"
        "<usage type='ceph'><name>client.admin</name></usage></secret>")
    conn.secret_set_value(uuid, b"AQBs3cret==")
    assert conn.secret_get_value(uuid) == b"AQBs3cret=="
    assert conn.secret_lookup_by_usage("ceph", "client.admin") == uuid
    stored = root / "secrets" / f"{uuid}.base64"
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    assert stat.S_IMODE((root / "secrets").stat().st_mode) == 0o700
    assert base64.b64decode(stored.read_bytes()) == b"AQBs3cret=="
    assert b"AQBs3cret" not in conn.secret_xml(uuid).encode()
    with pytest.raises(AlreadyExists):
        conn.secret_define_xml("<secret><usage type='ceph'><name>client.admin</name></usage>"
                               "</secret>")
    conn.secret_undefine(uuid)
    with pytest.raises(NoSuchSecret):
        conn.secret_get_value(uuid)
    assert not stored.exists()


def test_private_secret_value_is_not_readable(conn: EmbeddedConnection) -> None:
    uuid = conn.secret_define_xml("<secret private='yes'><usage type='volume'>"
                                  "<volume>/x/y.img</volume></usage></secret>")
    conn.secret_set_value(uuid, b"pw")
    with pytest.raises(Forbidden):
        conn.secret_get_value(uuid)
