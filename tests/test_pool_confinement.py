"""What the engine and virtstored refuse to touch: symbolic links in pools, backing files
outside every pool, pools on system directories, names of the backends' own files."""

from __future__ import annotations

import io
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import virtstore
from conftest import dir_pool_xml, requires_qemu_img
from server_fixtures import (
    RW_TOKEN,
    Certs,
    Daemon,
    certs_fixture,  # noqa: F401
    daemon_fixture,  # noqa: F401
    start_daemon,
    write_tokens,
)
from virtstore.api import Connection, VolumeCreateArgs
from virtstore.api.embedded import EmbeddedConnection
from virtstore.engine.confine import Confinement
from virtstore.errors import Forbidden, InvalidArgument, NoSuchVolume, OperationInvalid
from virtstore.server.config import load

MiB = 1024 * 1024
SECRET = b"root:$6$not-for-your-eyes:19000:0:99999:7:::\n" * 100


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A file no pool holds, standing for /etc/shadow."""
    f = tmp_path / "outside" / "shadow"
    f.parent.mkdir()
    f.write_bytes(SECRET)
    return f


def _unchanged(f: Path) -> bool:
    return f.read_bytes() == SECRET and f.stat().st_size == len(SECRET)


def _dir_pool(conn: Connection, name: str, target: Path) -> Path:
    conn.pool_define_xml(dir_pool_xml(name, target))
    conn.pool_start(name, build=True)
    return target


def _download(conn: Connection, pool: str, name: str) -> bytes:
    buf = io.BytesIO()
    job = conn.volume_download(pool, name, buf)
    done = conn.job_wait(job.id)
    assert done.state == "done", done.error
    return buf.getvalue()


def _swap_in_symlink(conn: Connection, target: Path, outside: Path) -> None:
    """A listed volume 'v' whose file is then replaced by a link out of the pool (as
    between a refresh and a data operation)."""
    conn.volume_create("p", VolumeCreateArgs("v", MiB, format="raw"))
    assert [v.name for v in conn.list_volumes("p")] == ["v"]
    (target / "v").unlink()
    (target / "v").symlink_to(outside)


def _check_symlink_refused(conn: Connection, target: Path, outside: Path) -> None:
    for op in (lambda: conn.volume_download("p", "v", io.BytesIO()),
               lambda: conn.volume_resize("p", "v", 4 * MiB),
               lambda: conn.volume_wipe("p", "v"),
               lambda: conn.volume_clone("p", "v", "copy")):
        with pytest.raises(OperationInvalid, match="is a symbolic link"):
            op()
    assert _unchanged(outside)
    assert sorted(p.name for p in target.iterdir()) == ["v"]  # no clone, no staging file


# -- 1. symbolic links in a pool ----------------------------------------------------


def test_refresh_does_not_list_symlinks(tmp_path: Path, outside: Path) -> None:
    conn = virtstore.connect(root=str(tmp_path / "state"))
    try:
        target = _dir_pool(conn, "p", tmp_path / "pool")
        (target / "real.img").write_bytes(b"r" * 4096)
        (target / "v").symlink_to(outside)
        (target / "inside").symlink_to(target / "real.img")  # not even one inside the pool
        conn.pool_refresh("p")
        assert [v.name for v in conn.list_volumes("p")] == ["real.img"]
        with pytest.raises(NoSuchVolume):
            conn.volume_download("p", "v", io.BytesIO())
        with pytest.raises(NoSuchVolume):
            conn.volume_lookup_by_path(str(target / "v"))
    finally:
        conn.close()
    assert _unchanged(outside)


def test_symlink_swapped_in_is_never_followed(tmp_path: Path, outside: Path) -> None:
    conn = virtstore.connect(root=str(tmp_path / "state"))
    try:
        target = _dir_pool(conn, "p", tmp_path / "pool")
        _swap_in_symlink(conn, target, outside)
        _check_symlink_refused(conn, target, outside)
        with pytest.raises(OperationInvalid, match="is a symbolic link"):
            conn.volume_snapshot_create("p", "v", "s1")
        with pytest.raises(OperationInvalid, match="is a symbolic link"):
            conn.volume_export_nbd("p", "v", socket_path=str(tmp_path / "nbd.sock"))
    finally:
        conn.close()


def test_data_helpers_refuse_a_symlink(tmp_path: Path, outside: Path) -> None:
    """The opens inside a job, for a link swapped in after the engine's look."""
    from virtstore.data.copy import copy_file
    from virtstore.data.monitor import Monitor
    from virtstore.data.wipe import wipe

    link = tmp_path / "v"
    link.symlink_to(outside)
    with pytest.raises(OperationInvalid, match="is a symbolic link"):
        wipe(str(link), "zero", monitor=Monitor())
    with pytest.raises(OperationInvalid, match="is a symbolic link"):
        copy_file(str(link), str(tmp_path / "copy"), monitor=Monitor())
    # nor written through one as a target
    src = tmp_path / "src"
    src.write_bytes(b"x" * 4096)
    with pytest.raises(OperationInvalid, match="is a symbolic link"):
        copy_file(str(src), str(link), monitor=Monitor())
    assert _unchanged(outside)
    assert not (tmp_path / "copy").exists()


def test_symlink_refused_by_the_daemon(daemon: Daemon, tmp_path: Path, outside: Path) -> None:
    conn = virtstore.connect(daemon.rw_uri)
    try:
        target = _dir_pool(conn, "p", tmp_path / "pool")
        _swap_in_symlink(conn, target, outside)
        _check_symlink_refused(conn, target, outside)
    finally:
        conn.close()


# -- 2. backing files ------------------------------------------------------------------


@pytest.fixture
def confined(tmp_path: Path) -> Iterator[EmbeddedConnection]:
    """The engine as virtstored runs it."""
    conn = EmbeddedConnection(str(tmp_path / "state"), confinement=Confinement.daemon(
        [str(tmp_path / "allowed")]))
    yield conn
    conn.close()


def _overlay_xml(name: str, backing: Path | str) -> str:
    return (f"<volume><name>{name}</name><capacity>1048576</capacity><target>"
            f"<format type='qcow2'/></target><backingStore><path>{backing}</path>"
            f"<format type='raw'/></backingStore></volume>")


def test_backing_file_outside_every_pool_is_refused(confined: EmbeddedConnection,
                                                    tmp_path: Path, outside: Path) -> None:
    target = _dir_pool(confined, "p", tmp_path / "pool")
    with pytest.raises(Forbidden, match=f"backing file '{outside}' is refused: it is not a "
                                        "volume of a defined pool"):
        confined.volume_create_xml("p", _overlay_xml("ov.qcow2", outside))
    with pytest.raises(Forbidden, match="is refused"):
        confined.volume_create("p", VolumeCreateArgs("ov2.qcow2", MiB, format="qcow2",
                                                     backing_vol=str(outside)))
    # a path that climbs out of a pool is the same path
    with pytest.raises(Forbidden, match="is refused"):
        confined.volume_create_xml("p", _overlay_xml("ov.qcow2",
                                                     f"{target}/../outside/shadow"))
    assert list(target.iterdir()) == []
    assert confined.list_volumes("p") == []
    # a volume of a pool, or a file under a configured backing root, is fine
    (target / "base.img").write_bytes(b"b" * 4096)
    confined.pool_refresh("p")
    confined.volume_create_xml("p", _overlay_xml("ov.qcow2", target / "base.img"))
    allowed = tmp_path / "allowed" / "golden.img"
    allowed.parent.mkdir()
    allowed.write_bytes(b"g" * 4096)
    confined.volume_create_xml("p", _overlay_xml("ov3.qcow2", allowed))
    assert {v.name for v in confined.list_volumes("p")} == {"base.img", "ov.qcow2",
                                                             "ov3.qcow2"}


@requires_qemu_img
def test_found_image_backed_outside_is_listed_but_not_read_through(
        confined: EmbeddedConnection, tmp_path: Path, outside: Path) -> None:
    target = _dir_pool(confined, "p", tmp_path / "pool")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(outside), "-F", "raw",
                    str(target / "found.qcow2")], check=True)
    confined.pool_refresh("p")
    assert [v.name for v in confined.list_volumes("p")] == ["found.qcow2"]
    for fmt in ("raw", "qcow2"):
        with pytest.raises(Forbidden, match=f"backing file '{outside}' of "
                                            f"'{target / 'found.qcow2'}' is refused"):
            confined.volume_clone("p", "found.qcow2", f"copy.{fmt}", format=fmt)
    assert sorted(p.name for p in target.iterdir()) == ["found.qcow2"]
    # Its own bytes (the qcow2 file) may be read: they hold nothing of the backing file.
    assert SECRET[:32] not in _download(confined, "p", "found.qcow2")


def test_backing_file_refused_by_the_daemon(daemon: Daemon, tmp_path: Path,
                                            outside: Path) -> None:
    conn = virtstore.connect(daemon.rw_uri)
    try:
        target = _dir_pool(conn, "p", tmp_path / "pool")
        with pytest.raises(Forbidden, match="is refused"):
            conn.volume_create_xml("p", _overlay_xml("ov.qcow2", outside))
        with pytest.raises(Forbidden, match="is refused"):
            conn.volume_create_xml("p", _overlay_xml("ov.qcow2", "/etc/shadow"))
        assert list(target.iterdir()) == []
    finally:
        conn.close()


# -- 3. pool targets --------------------------------------------------------------------


def test_embedded_engine_keeps_pools_off_its_state_root(tmp_path: Path) -> None:
    root = tmp_path / "state"
    conn = virtstore.connect(root=str(root))
    try:
        for target in (root, root / "secrets", root / "pools"):
            with pytest.raises(Forbidden, match="is inside the state root"):
                conn.pool_define_xml(dir_pool_xml("x", target))
        link = tmp_path / "link"
        link.symlink_to(root)
        with pytest.raises(Forbidden, match="is inside the state root"):
            conn.pool_define_xml(dir_pool_xml("x", link))
        assert conn.list_pools() == []
        # its own pool directory may hold another pool's directory
        assert conn.pool_define_xml(dir_pool_xml("sub", root / "images" / "sub")) == "sub"
    finally:
        conn.close()


def test_daemon_refuses_system_directories(daemon: Daemon, tmp_path: Path) -> None:
    conn = virtstore.connect(daemon.rw_uri)
    link = tmp_path / "etc-link"
    link.symlink_to("/etc")
    try:
        for target in ("/", "/etc", "/etc/ssh", "/proc", "/sys", "/dev", "/boot", "/usr/lib",
                       str(link)):
            with pytest.raises(Forbidden, match="is a system directory"):
                conn.pool_define_xml(dir_pool_xml("sys", target))
            with pytest.raises(Forbidden, match="is a system directory"):
                conn.pool_create_xml(dir_pool_xml("sys", target))
        with pytest.raises(Forbidden, match="inside the state root"):
            conn.pool_define_xml(dir_pool_xml("st", daemon.root / "secrets"))
        assert [p.name for p in conn.list_pools()] == ["default"]
        # a pool's directory elsewhere is fine
        assert conn.pool_define_xml(dir_pool_xml("ok", tmp_path / "ok")) == "ok"
    finally:
        conn.close()


def test_remote_callers_only_under_the_pool_roots(tmp_path: Path, certs: Certs) -> None:
    tokens = write_tokens(tmp_path / "tokens")
    allowed = tmp_path / "pools"
    d = start_daemon(tmp_path / "state", "--listen", "127.0.0.1:0",
                     "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key),
                     "--tokens", str(tokens), "--remote-pool-root", str(allowed))
    conn = virtstore.connect(d.https_uri, token=RW_TOKEN, ca=str(certs.ca))
    try:
        for target in (tmp_path / "elsewhere", Path("/etc"), allowed / ".." / "elsewhere"):
            with pytest.raises(Forbidden, match="remote callers may define file pools only "
                                                f"under the remote_pool_roots of virtstored "
                                                f"\\('{allowed}'\\)"):
                conn.pool_define_xml(dir_pool_xml("r", target))
        with pytest.raises(Forbidden, match="for local callers only"):
            conn.import_libvirt_pools(str(tmp_path))
        assert [p.name for p in conn.list_pools()] == ["default"]
        assert not (tmp_path / "elsewhere").exists()
        assert conn.pool_define_xml(dir_pool_xml("r", allowed / "r")) == "r"
        conn.pool_start("r", build=True)
        assert (allowed / "r").is_dir()
    finally:
        conn.close()
        d.stop()
    # the same daemon's local socket is not held to the remote roots
    d = start_daemon(tmp_path / "state")
    local = virtstore.connect(d.rw_uri)
    try:
        assert local.pool_define_xml(dir_pool_xml("l", tmp_path / "elsewhere")) == "l"
    finally:
        local.close()
        d.stop()


def test_remote_roots_default_to_none(tmp_path: Path, certs: Certs) -> None:
    tokens = write_tokens(tmp_path / "tokens")
    d = start_daemon(tmp_path / "state", "--listen", "127.0.0.1:0",
                     "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key),
                     "--tokens", str(tokens))
    conn = virtstore.connect(d.https_uri, token=RW_TOKEN, ca=str(certs.ca))
    try:
        with pytest.raises(Forbidden, match="none are configured"):
            conn.pool_define_xml(dir_pool_xml("r", tmp_path / "r"))
        assert [p.name for p in conn.list_pools()] == ["default"]
    finally:
        conn.close()
        d.stop()


def test_config_keys(tmp_path: Path) -> None:
    conf = tmp_path / "virtstored.conf"
    conf.write_text('remote_pool_roots = ["/srv/pools", "/data/pools/"]\n'
                    'backing-roots = "/srv/golden"\n')
    opts = load(["--config", str(conf)])
    assert opts.remote_pool_roots == ["/srv/pools", "/data/pools"]
    assert opts.backing_roots == ["/srv/golden"]
    opts = load(["--config", str(conf), "--remote-pool-root", "/x"])
    assert opts.remote_pool_roots == ["/x"]
    conf.write_text('remote_pool_roots = "relative/dir"\n')
    with pytest.raises(InvalidArgument, match="'relative/dir' is not an absolute path"):
        load(["--config", str(conf)])


# -- 4. private names --------------------------------------------------------------------


@pytest.mark.parametrize("name", [".virtstore-staging-0123456789abcdef", ".virtstore-snap-x",
                                  ".virtstore-snapshots", "virtstore-staging-x",
                                  "virtstore-clone-x"])
def test_private_prefixes_are_refused(tmp_path: Path, name: str) -> None:
    conn = virtstore.connect(root=str(tmp_path / "state"))
    try:
        target = _dir_pool(conn, "p", tmp_path / "pool")
        with pytest.raises(InvalidArgument) as ei:
            conn.volume_create("p", VolumeCreateArgs(name, MiB, format="raw"))
        msg = str(ei.value)
        assert "\n" not in msg and f"'{name}'" in msg and "reserved" in msg
        with pytest.raises(InvalidArgument, match="reserved"):
            conn.volume_create_xml("p", f"<volume><name>{name}</name><capacity>1024"
                                        "</capacity></volume>")
        conn.volume_create("p", VolumeCreateArgs("v", MiB, format="raw"))
        with pytest.raises(InvalidArgument, match="reserved"):
            conn.volume_clone("p", "v", name)
        assert sorted(os.listdir(target)) == ["v"]
        assert [v.name for v in conn.list_volumes("p")] == ["v"]
    finally:
        conn.close()
