"""Faults from below: a full disk at each stage of create, clone and upload, a
read-only filesystem, qemu-img missing, a pool directory removed behind our back, a
corrupt qcow2 header, a truncated definition file. Each gives one clear line (a
VirtstoreError) and loses nothing else.

At the end, the engine bugs these tests found, each now a regression test.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import requires_qemu_img as needs_qemu_img
from data_fixtures import loop_fs, needs_root
from reliability import summary
from reliability.harness import (
    STAGING_PREFIX,
    MiB,
    child_env,
    file_sha,
    one_line,
    pattern,
    qcow2_header,
)
from virtstore.api import VolumeCreateArgs
from virtstore.api.embedded import EmbeddedConnection
from virtstore.errors import NoSuchVolume, VirtstoreError


def dir_pool(conn: EmbeddedConnection, name: str, path: Path) -> str:
    path.mkdir(parents=True, exist_ok=True)
    conn.pool_define_xml(f"<pool type='dir'><name>{name}</name><target><path>{path}"
                         "</path></target></pool>")
    conn.pool_start(name)
    return name


def put(conn: EmbeddedConnection, pool: str, path: Path, data: bytes) -> str:
    path.write_bytes(data)
    conn.pool_refresh(pool)
    return file_sha(path)


@pytest.fixture
def conn(area: Path) -> Iterator[EmbeddedConnection]:
    c = EmbeddedConnection(str(area / "state"))
    yield c
    c.close()


def attempt(fn: Callable[[], object], conn: EmbeddedConnection | None = None) -> str | None:
    """Run an operation (waiting for its job); None if it worked, else its error line,
    which must be one line of a VirtstoreError."""
    summary.add("faults")
    try:
        res = fn()
        if conn is not None and hasattr(res, "id"):
            info = conn.job_wait(res.id, timeout=60)
            if info.state != "done":
                assert info.error and one_line(info.error), info
                return f"{info.error_code}: {info.error}"
        return None
    except VirtstoreError as exc:
        assert one_line(str(exc)), repr(str(exc))
        return f"{exc.code}: {exc}"


def no_staging(*dirs: Path) -> None:
    for d in dirs:
        if d.is_dir():
            left = [n for n in os.listdir(d) if n.startswith(STAGING_PREFIX)]
            assert not left, f"staging files left in {d}: {left}"


# -- a full disk --------------------------------------------------------------------------


def fill(mnt: Path, free: int) -> None:
    """Leave about ``free`` bytes free on the filesystem at ``mnt`` (a filler file)."""
    filler = mnt / "filler"
    filler.unlink(missing_ok=True)
    subprocess.run(["sync", "-f", str(mnt)], check=True)
    st = os.statvfs(mnt)
    avail = st.f_bavail * st.f_frsize
    if avail > free:
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, avail - free)
        except OSError:
            pass
        finally:
            os.close(fd)


@needs_root
@needs_qemu_img
def test_full_disk_at_every_stage(conn: EmbeddedConnection, area: Path) -> None:
    """Free space from none to nearly enough, for create (raw allocated, qcow2), clone
    (same format, to qcow2) and upload: every failure is one no-space line, leaves no
    staging file and no volume, and the other volumes keep their bytes."""
    src = dir_pool(conn, "src", area / "src")
    data = pattern(1, 6 * MiB)
    src_sha = put(conn, src, area / "src" / "data", data)
    upload_file = area / "upload"
    upload_file.write_bytes(pattern(2, 3 * MiB))
    with loop_fs(area, "ext4", "32M") as mnt:
        pool = dir_pool(conn, "small", mnt / "pool")
        keep_sha = put(conn, pool, mnt / "pool" / "keep", pattern(3, MiB))
        up_sha = put(conn, pool, mnt / "pool" / "up", pattern(4, 3 * MiB))
        ops: dict[str, Callable[[], object]] = {
            "raw": lambda: conn.volume_create(pool, VolumeCreateArgs("new", 4 * MiB)),
            "qcow2": lambda: conn.volume_create(pool, VolumeCreateArgs("new", 64 * MiB,
                                                                       format="qcow2")),
            "clone": lambda: conn.volume_clone(src, "data", "new", target_pool=pool),
            "convert": lambda: conn.volume_clone(src, "data", "new", target_pool=pool,
                                                 format="qcow2"),
            "upload": lambda: conn.volume_upload(pool, "up", open(upload_file, "rb")),
        }
        failures = 0
        for free in (0, 4096, 64 * 1024, 512 * 1024, 2 * MiB, 3 * MiB, 5 * MiB):
            for what, op in ops.items():
                fill(mnt, free)
                err = attempt(op, conn)
                no_staging(mnt / "pool")
                if err is not None:
                    failures += 1
                    assert err.startswith("no-space") or "space" in err.lower(), \
                        f"{what} with {free} bytes free: {err}"
                    if what != "upload":
                        assert not (mnt / "pool" / "new").exists(), f"{what}: {err}"
                        with pytest.raises(NoSuchVolume):
                            conn.volume_info(pool, "new")
                elif what != "upload":
                    conn.volume_delete(pool, "new")
                assert file_sha(mnt / "pool" / "keep") == keep_sha
                assert file_sha(area / "src" / "data") == src_sha
                now = file_sha(mnt / "pool" / "up")
                assert now in (up_sha, file_sha(upload_file)), f"upload {what} broke 'up'"
                if now != up_sha:  # the upload went through: put the old bytes back
                    up_sha = put(conn, pool, mnt / "pool" / "up", pattern(4, 3 * MiB))
        assert failures >= 10, "the filesystem never filled up"
        # With room again, each works.
        (mnt / "filler").unlink()
        for what in ("raw", "clone", "convert"):
            assert attempt(ops[what], conn) is None, what
            conn.volume_delete(pool, "new")
        conn.pool_stop(pool)


# -- a read-only filesystem ----------------------------------------------------------------


@pytest.fixture
def ro_pool(conn: EmbeddedConnection, area: Path) -> Iterator[tuple[str, Path, str]]:
    """A dir pool on a read-only bind mount, holding one volume 'v'."""
    data, ro = area / "data", area / "ro"
    data.mkdir()
    ro.mkdir()
    (data / "v").write_bytes(pattern(5, 2 * MiB))
    (data / "q").write_bytes(b"")
    (data / "q").unlink()
    for argv in (["mount", "--bind", str(data), str(ro)],
                 ["mount", "-o", "remount,bind,ro", str(ro)]):
        r = subprocess.run(argv, capture_output=True, text=True)
        if r.returncode != 0:
            subprocess.run(["umount", str(ro)], capture_output=True)
            pytest.skip(f"cannot make a read-only bind mount: {r.stderr.strip()}")
    try:
        pool = dir_pool(conn, "ro", ro)
        yield pool, ro, file_sha(ro / "v")
        conn.pool_stop(pool)
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)


@needs_root
def test_read_only_filesystem(conn: EmbeddedConnection, area: Path,
                              ro_pool: tuple[str, Path, str]) -> None:
    pool, ro, v_sha = ro_pool
    other = dir_pool(conn, "rw", area / "rw")
    conn.pool_refresh(pool)
    assert [v.name for v in conn.list_volumes(pool)] == ["v"]
    # Making a new volume there is pinned below (test_new_volume_on_read_only_fs).
    failing = {
        "upload": lambda: conn.volume_upload(pool, "v", open(area / "rw" / "w", "rb")),
        "wipe": lambda: conn.volume_wipe(pool, "v"),
        "resize": lambda: conn.volume_resize(pool, "v", 4 * MiB),
        "delete": lambda: conn.volume_delete(pool, "v"),
    }
    put(conn, other, area / "rw" / "w", pattern(6, 2 * MiB))
    for what, op in failing.items():
        err = attempt(op, conn)
        assert err is not None, f"{what} worked on a read-only filesystem"
        assert file_sha(ro / "v") == v_sha, f"{what} changed the volume"
        assert sorted(os.listdir(ro)) == ["v"]
        conn.pool_refresh(pool)
        assert [v.name for v in conn.list_volumes(pool)] == ["v"]
    # Reading still works: a clone out of the read-only pool.
    assert attempt(lambda: conn.volume_clone(pool, "v", "copy", target_pool=other),
                   conn) is None
    assert file_sha(area / "rw" / "copy") == v_sha


# -- qemu-img missing ----------------------------------------------------------------------

NO_QEMU_CHILD = r"""
import json, sys
from virtstore.api import VolumeCreateArgs
from virtstore.api.embedded import EmbeddedConnection
from virtstore.errors import VirtstoreError
c = EmbeddedConnection(sys.argv[1])
pool = sys.argv[2]
ops = {
    "create-prealloc": lambda: c.volume_create(pool, VolumeCreateArgs(
        "pre", 1 << 20, format="qcow2", prealloc_metadata=True)),
    "convert": lambda: c.volume_clone(pool, "raw", "conv", format="qcow2"),
    "resize-qcow2": lambda: c.volume_resize(pool, "img", 8 << 20),
    "wipe-qcow2": lambda: c.volume_wipe(pool, "img"),
    "create-qcow2": lambda: c.volume_create(pool, VolumeCreateArgs("plain", 1 << 20,
                                                                   format="qcow2")),
}
out = {}
for what, op in ops.items():
    try:
        res = op()
        if hasattr(res, "id"):
            info = c.job_wait(res.id)
            out[what] = None if info.state == "done" else [info.error_code, info.error]
        else:
            out[what] = None
    except VirtstoreError as exc:
        out[what] = [exc.code, str(exc)]
print(json.dumps(out))
c.close()
"""


@needs_qemu_img
def test_qemu_img_missing(conn: EmbeddedConnection, area: Path) -> None:
    pool = dir_pool(conn, "p", area / "pool")
    raw_sha = put(conn, pool, area / "pool" / "raw", pattern(8, 2 * MiB))
    conn.volume_create(pool, VolumeCreateArgs("img", 4 * MiB, format="qcow2"))
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M",
                    str(area / "pool" / "img")], check=True, capture_output=True)
    conn.pool_refresh(pool)
    img_sha = file_sha(area / "pool" / "img")
    empty = area / "empty-bin"
    empty.mkdir()
    proc = subprocess.run([sys.executable, "-c", NO_QEMU_CHILD, str(area / "state"), pool],
                          capture_output=True, text=True, env=child_env(path=str(empty)),
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    summary.add("faults", len(res))
    # The plain qcow2 is written in process: it needs no qemu-img.
    assert res.pop("create-qcow2") is None
    for what, err in res.items():
        assert err is not None, f"{what} worked without qemu-img"
        _code, message = err
        assert one_line(message) and "qemu-img" in message, f"{what}: {message}"
    no_staging(area / "pool")
    assert file_sha(area / "pool" / "raw") == raw_sha
    assert file_sha(area / "pool" / "img") == img_sha, "the qcow2 changed"
    conn.pool_refresh(pool)
    assert sorted(v.name for v in conn.list_volumes(pool)) == ["img", "plain", "raw"]


# -- a pool directory removed behind our back -----------------------------------------------


def test_pool_directory_removed(conn: EmbeddedConnection, area: Path) -> None:
    pool = dir_pool(conn, "gone", area / "gone")
    other = dir_pool(conn, "other", area / "other")
    conn.volume_create(pool, VolumeCreateArgs("v", MiB))
    keep_sha = put(conn, other, area / "other" / "keep", pattern(9, MiB))
    shutil.rmtree(area / "gone")
    errors = [attempt(fn, conn) for fn in (
        lambda: conn.pool_refresh(pool),
        lambda: conn.volume_create(pool, VolumeCreateArgs("w", MiB)),
        lambda: conn.volume_clone(other, "keep", "k2", target_pool=pool),
        lambda: conn.volume_upload(pool, "v", open(area / "other" / "keep", "rb")),
    )]
    assert all(e is not None for e in errors[1:]), errors
    assert not (area / "gone").exists(), "an operation made the removed directory again"
    # Listings, other pools, a new process and the pool's own lifecycle still work.
    conn.list_pools()
    conn.list_volumes(other)
    conn.volume_create(other, VolumeCreateArgs("fresh", MiB))
    with EmbeddedConnection(str(area / "state")) as again:
        again.list_pools()
        again.pool_info(pool)
    conn.pool_stop(pool)
    err = attempt(lambda: conn.pool_start(pool))
    assert err is not None and "gone" in err
    assert file_sha(area / "other" / "keep") == keep_sha


# -- corrupt qcow2 headers ------------------------------------------------------------------


def _corrupt_headers(good: bytes) -> dict[str, bytes]:
    def patch(off: int, value: bytes) -> bytes:
        return good[:off] + value + good[off + len(value):]

    return {
        "magic-only": b"QFI\xfb",
        "short": good[:40],
        "version-99": patch(4, (99).to_bytes(4, "big")),
        "cluster-bits-200": patch(20, (200).to_bytes(4, "big")),
        "size-2^62": patch(24, (2**62).to_bytes(8, "big")),
        "l1-size-huge": patch(36, (2**31).to_bytes(4, "big")),
        "backing-beyond-eof": patch(8, (2**40).to_bytes(8, "big")) [:16]
        + (4000).to_bytes(4, "big") + good[20:],
        "header-length-huge": patch(100, (2**31).to_bytes(4, "big")),
        "garbage": b"QFI\xfb" + pattern(3, 4096)[4:],
    }


def test_corrupt_qcow2_headers(conn: EmbeddedConnection, area: Path,
                               caplog: pytest.LogCaptureFixture) -> None:
    pool = dir_pool(conn, "p", area / "pool")
    conn.volume_create(pool, VolumeCreateArgs("good", 4 * MiB, format="qcow2"))
    good = (area / "pool" / "good").read_bytes()
    bad = _corrupt_headers(good)
    for name, data in bad.items():
        (area / "pool" / name).write_bytes(data)
    summary.add("faults", len(bad))
    with caplog.at_level(logging.DEBUG, logger="virtstore"):
        conn.pool_refresh(pool)
        listed = {v.name: v for v in conn.list_volumes(pool)}
    assert listed["good"].format == "qcow2" and listed["good"].capacity == 4 * MiB
    logged = " ".join(r.getMessage() for r in caplog.records)
    for name in bad:
        if name not in listed:
            assert name in logged, f"'{name}' skipped without a log line"
            continue
        for fn in (lambda n=name: conn.volume_info(pool, n),
                   lambda n=name: conn.volume_xml(pool, n)):
            try:
                fn()
            except VirtstoreError as exc:
                assert one_line(str(exc))
    # A new process on the root copes too, and the good volume is untouched.
    with EmbeddedConnection(str(area / "state")) as again:
        again.pool_refresh(pool)
        again.list_volumes(pool)
    assert qcow2_header(area / "pool" / "good") == (2, 4 * MiB)


def test_refresh_survives_qcow2_size_beyond_int64(conn: EmbeddedConnection,
                                                  area: Path) -> None:
    pool = dir_pool(conn, "p", area / "pool")
    conn.volume_create(pool, VolumeCreateArgs("good", 4 * MiB, format="qcow2"))
    good = (area / "pool" / "good").read_bytes()
    (area / "pool" / "huge").write_bytes(good[:24] + (2**64 - 1).to_bytes(8, "big")
                                         + good[32:])
    conn.pool_refresh(pool)
    assert "good" in [v.name for v in conn.list_volumes(pool)]


# -- a truncated pool definition -------------------------------------------------------------

NEXT_PROCESS = r"""
import json, logging, sys
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
from virtstore.api import VolumeCreateArgs
from virtstore.api.embedded import EmbeddedConnection
from virtstore.errors import VirtstoreError
c = EmbeddedConnection(sys.argv[1])
out = {"pools": sorted(p.name for p in c.list_pools())}
if c.pool_info("keep").state != "running":
    c.pool_start("keep")
c.volume_create("keep", VolumeCreateArgs("after", 1 << 20))
out["keep"] = [v.name for v in c.list_volumes("keep")]
try:
    c.pool_start("trunc")
    out["start"] = None
except VirtstoreError as exc:
    out["start"] = str(exc)
print(json.dumps(out))
c.close()
"""


@pytest.mark.parametrize("known", [True, False], ids=["pool-known", "fresh-root"])
def test_truncated_definition(area: Path, known: bool) -> None:
    """The next process skips (or refuses to start) the broken pool, with a warning
    when it cannot take it in, and everything else works."""
    root = area / "state"
    with EmbeddedConnection(str(root)) as c:
        dir_pool(c, "keep", area / "keep")
        c.volume_create("keep", VolumeCreateArgs("before", MiB))
        (area / "trunc").mkdir()
        c.pool_define_xml(f"<pool type='dir'><name>trunc</name><target><path>"
                          f"{area / 'trunc'}</path></target></pool>")
    if not known:  # a root that never saw the pool: only the files are carried over
        (root / "state.db").unlink()
        for extra in ("state.db-wal", "state.db-shm"):
            (root / extra).unlink(missing_ok=True)
    f = root / "pools" / "trunc.xml"
    text = f.read_text()
    f.write_text(text[:len(text) // 2])
    keep_def = (root / "pools" / "keep.xml").read_text()
    summary.add("faults")
    proc = subprocess.run([sys.executable, "-c", NEXT_PROCESS, str(root)],
                          capture_output=True, text=True, env=child_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if known:
        assert "trunc" in out["pools"]
        assert out["start"] and one_line(out["start"])
    else:
        assert "trunc" not in out["pools"]
        assert "trunc.xml" in proc.stderr, proc.stderr
    assert "keep" in out["pools"]
    assert (root / "pools" / "keep.xml").read_text() == keep_def
    if known:
        assert out["keep"] == ["after", "before"]


# -- engine bugs found here, pinned until fixed ------------------------------------------------


@pytest.mark.parametrize("op", ["resize", "clone"])
def test_volume_deleted_between_lookup_and_lock(conn: EmbeddedConnection, area: Path,
                                                op: str) -> None:
    pool = dir_pool(conn, "p", area / "pool")
    conn.volume_create(pool, VolumeCreateArgs("v", MiB, allocation=0))
    other = EmbeddedConnection(str(area / "state"))  # another process, in effect
    real_get = conn.index.get

    def get_then_deleted(self: object, pool_name: str, name: str) -> object:
        rec = real_get(pool_name, name)
        if name == "v":
            other.volume_delete(pool_name, name)  # deleted right after the lookup
        return rec

    conn.index.get = types.MethodType(get_then_deleted, conn.index)  # type: ignore[method-assign]
    try:
        try:
            job = (conn.volume_resize(pool, "v", 2 * MiB) if op == "resize"
                   else conn.volume_clone(pool, "v", "copy"))
        except NoSuchVolume:
            return
        info = conn.job_wait(job.id, timeout=30)
        assert info.error_code == "no-such-volume", f"{info.error_code}: {info.error}"
    finally:
        other.close()


SITE_DELETES_AFTER_CREATE = r"""
from virtstore.api.embedded import EmbeddedConnection
_real = EmbeddedConnection.volume_create
def volume_create(self, pool, args):
    name = _real(self, pool, args)
    if name == "raced":
        # Another client deletes the new volume before this request answers.
        self.volume_delete(pool, name)
    return name
EmbeddedConnection.volume_create = volume_create
"""


def test_daemon_create_answered_after_concurrent_delete(area: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import virtstore
    from server_fixtures import start_daemon

    site = area / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITE_DELETES_AFTER_CREATE)
    src = str(Path(__file__).resolve().parents[2] / "src")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), src]))
    daemon = start_daemon(area / "state")
    try:
        c = virtstore.connect(daemon.rw_uri)
        try:
            dir_pool(c, "p", area / "pool")  # type: ignore[arg-type]
            assert c.volume_create("p", VolumeCreateArgs("raced", MiB)) == "raced"
        finally:
            c.close()
    finally:
        daemon.stop()


@needs_qemu_img
def test_cancelled_qcow2_wipe_leaves_a_valid_volume(conn: EmbeddedConnection,
                                                    area: Path) -> None:
    """A wipe of an image swaps a fresh empty image in first: once it has started, the
    volume is that empty image, never a half-overwritten one."""
    pool = dir_pool(conn, "p", area / "pool")
    path = area / "pool" / "img"
    conn.volume_create(pool, VolumeCreateArgs("img", 8 * MiB, format="qcow2"))
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xab 0 4M", str(path)],
                   check=True, capture_output=True)
    conn.pool_refresh(pool)
    before = file_sha(path)
    job = conn.volume_wipe(pool, "img", "random", bandwidth=MiB)
    while conn.job_info(job.id).bytes_done == 0:
        pass
    conn.job_cancel(job.id)
    info = conn.job_wait(job.id, timeout=30)
    assert info.state == "cancelled"
    conn.pool_refresh(pool)
    assert conn.volume_info(pool, "img").format == "qcow2"
    assert conn.volume_info(pool, "img").capacity == 8 * MiB
    if file_sha(path) != before:  # past the swap: the fresh image reads as zeros
        out = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0 0 4M", str(path)],
                             capture_output=True, text=True).stdout
        assert "Pattern verification failed" not in out
    assert not [n for n in os.listdir(area / "pool") if n.startswith(".virtstore-")]


@needs_root
@pytest.mark.parametrize("op", ["create", "clone"])
def test_new_volume_on_read_only_fs(conn: EmbeddedConnection, area: Path,
                                    ro_pool: tuple[str, Path, str], op: str) -> None:
    pool, ro, v_sha = ro_pool
    other = dir_pool(conn, "rw", area / "rw")
    put(conn, other, area / "rw" / "w", pattern(6, MiB))
    fn = ((lambda: conn.volume_create(pool, VolumeCreateArgs("n", MiB))) if op == "create"
          else (lambda: conn.volume_clone(other, "w", "n", target_pool=pool)))
    err = attempt(fn, conn)
    assert err is not None and not err.startswith("internal-error"), err
    assert sorted(os.listdir(ro)) == ["v"] and file_sha(ro / "v") == v_sha


def test_relative_pool_target_path_is_refused(conn: EmbeddedConnection, area: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    cwd = area / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    try:
        conn.pool_define_xml("<pool type='dir'><name>rel</name><target><path>relative/dir"
                             "</path></target></pool>")
        conn.pool_start("rel", build=True)
        conn.volume_create("rel", VolumeCreateArgs("v", MiB))
    except VirtstoreError:
        pass
    assert os.listdir(cwd) == [], "files were made relative to the working directory"


def test_stale_refresh_keeps_a_reserved_name(conn: EmbeddedConnection, area: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from virtstore.backends.dir import DirBackend

    pool = dir_pool(conn, "p", area / "pool")
    put(conn, pool, area / "pool" / "src", pattern(12, 4 * MiB))
    conn.volume_create(pool, VolumeCreateArgs("v", MiB, allocation=0))
    other = EmbeddedConnection(str(area / "state"))  # another process, in effect
    real_scan = DirBackend.scan
    jobs: list[str] = []

    def scan_then_others_act(self: DirBackend, *args: object, **kw: object) -> object:
        result = real_scan(self, *args, **kw)  # type: ignore[arg-type]
        if not jobs:  # meanwhile: 'v' is deleted and a slow clone starts making it again
            other.volume_delete(pool, "v")
            jobs.append(other.volume_clone(pool, "src", "v", bandwidth=MiB).id)
        return result

    monkeypatch.setattr(DirBackend, "scan", scan_then_others_act)
    try:
        os.truncate(area / "pool" / "v", 2 * MiB)  # changed: the scan reads it again
        conn.pool_refresh(pool)  # applies the scan taken before the delete
        monkeypatch.setattr(DirBackend, "scan", real_scan)
        conn.pool_refresh(pool)
        from virtstore.errors import AlreadyExists

        with pytest.raises(AlreadyExists):  # the running clone holds the name
            conn.volume_create(pool, VolumeCreateArgs("v", MiB, allocation=0))
    finally:
        if jobs:
            with contextlib.suppress(VirtstoreError):
                other.job_cancel(jobs[0])
            other.job_wait(jobs[0], timeout=30)
        other.close()
