"""vol-import from an NBD export (qemu-nbd on 127.0.0.1 or a unix socket), and an import
killed half-way that goes on from its checkpoint instead of reading the export again."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from test_backup_volumes import CHUNK, MiB, done, fill_chunks, qcow2
from virtstore.api.embedded import EmbeddedConnection
from virtstore.host.nbd import NbdServer


def test_import_from_an_nbd_export(conn: EmbeddedConnection, pool: str, pooldir: Path,
                                   tmp_path: Path) -> None:
    qcow2(conn, pool, "src.qcow2", 32 * MiB)
    fill_chunks(pooldir / "src.qcow2", 3, 2, 21)
    raw = tmp_path / "want.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw",
                    str(pooldir / "src.qcow2"), str(raw)], check=True)
    with NbdServer(str(pooldir / "src.qcow2"), fmt="qcow2", host="127.0.0.1",
                   export="disk", read_only=True) as srv:
        url = f"nbd://127.0.0.1:{srv.address.port}/disk"
        done(conn, conn.volume_import(url, pool, "imp.img").id)
        with pytest.raises(Exception, match="cannot connect to NBD export"):
            conn.volume_import(f"nbd://127.0.0.1:{srv.address.port + 1}/disk", pool, "x")
    assert (pooldir / "imp.img").read_bytes() == raw.read_bytes()
    assert conn.volume_info(pool, "imp.img").capacity == 32 * MiB
    # Only the data the export reports was written: the rest stays a hole.
    assert os.stat(pooldir / "imp.img").st_blocks * 512 <= 2 * CHUNK + MiB


KILLED_IMPORT = textwrap.dedent("""
    import sys, time
    from virtstore.api.embedded import EmbeddedConnection
    root, pool, src = sys.argv[1:4]
    conn = EmbeddedConnection(root)
    print(conn.volume_import(src, pool, "imp.img", bandwidth=16 * 1024 * 1024).id,
          flush=True)
    time.sleep(120)
""")


def test_killed_import_goes_on_from_its_checkpoint(conn: EmbeddedConnection, pool: str,
                                                   pooldir: Path, root: Path,
                                                   tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    src = tmp_path / "disk.bin"
    data = os.urandom(96 * MiB)
    src.write_bytes(data)
    srv = NbdServer(str(src), read_only=True, export="p2v").start()
    url = srv.address.url
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    child = subprocess.Popen([sys.executable, "-c", KILLED_IMPORT, str(root), pool,
                              url], stdout=subprocess.PIPE, text=True, env=env)
    assert child.stdout is not None and child.stdout.readline().strip()

    def done_through() -> int:
        for m in (root / "imports").glob("*/manifests/import.json"):
            return int(json.loads(m.read_text())["stats"]["done_through"])
        return -1

    deadline = time.monotonic() + 60
    while done_through() < 8 and time.monotonic() < deadline:
        time.sleep(0.1)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    kept = done_through()
    assert 8 <= kept < 23, "the import was killed before its checkpoint or after its end"
    try:
        with EmbeddedConnection(str(root)) as fresh:
            assert "imp.img" not in [v.name for v in fresh.list_volumes(pool)]
            with caplog.at_level(logging.INFO, logger="virtstore"):
                done(fresh, fresh.volume_import(url, pool, "imp.img").id)
    finally:
        srv.stop()
    assert (pooldir / "imp.img").read_bytes() == data
    assert f"{(kept + 1) * CHUNK} bytes taken from the checkpoint" in caplog.text
    assert not list((root / "imports").iterdir())
