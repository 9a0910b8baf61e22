"""A logical pool on a shared volume group: lvmlockd with sanlock, and a second host.

Two hosts share one disk (a loop device). Host 1 is this test process: its lvmlockd
and sanlock use the usual /run paths, its LVM configuration (``use_lvmlockd = 1``,
``host_id = 1``) comes through ``LVM_SYSTEM_DIR``. Host 2 runs every command in a
mount namespace of its own (``unshare -m``) with private /run/lvm, /run/sanlock and
/run/lock bound over the usual ones, its own sanlock and lvmlockd daemons and
``host_id = 2``: the two lvmlockd instances only meet through the leases sanlock
keeps on the shared disk, as two machines would.

What one kernel cannot separate: device-mapper. Both hosts see the same dm devices,
so host 2 sees host 1's active LVs as active, and the VG's internal ``lvmlock`` LV is
one device for both (host 2's ``--lockstop`` cannot deactivate it while host 1's
sanlock has it open: LVM says so and goes on). The locks are what the test checks,
and those are each host's own.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from block_fixtures import LVM_ENV, BlockLab
from conftest import virtstore_cli
from virtstore.api import VolumeCreateArgs
from virtstore.api.embedded import EmbeddedConnection
from virtstore.errors import OperationInvalid

MiB = 1 << 20
# The lvmlock LV alone takes 256 MiB.
DISK = 400 * MiB
# sanlock's I/O timeout for the lockspaces lvmlockd makes: joining one takes a few
# times this (the default, 10 s, makes each start wait 20-60 s).
SANLOCK_TIMEOUT = "2"
# Host 2's namespace: its own lvmlockd and sanlock sockets and LVM file locks.
HOST2_WRAP = ('for d in lvm sanlock lock; do mount --bind "$HOST2_RUN/$d" "/run/$d" '
              '|| exit 97; done; exec "$@"')


def _missing() -> str | None:
    for tool, pkg in (("sanlock", "sanlock"), ("lvmlockd", "lvm2-lockd"),
                      ("lvmlockctl", "lvm2-lockd"), ("unshare", "util-linux")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian {pkg})"
    if os.path.exists("/run/sanlock/sanlock.sock") or os.path.exists("/run/lvmlockd.pid"):
        return "a sanlock or lvmlockd daemon already runs in this VM"
    return None


def lvm_config(etc: Path, host_id: int) -> Path:
    etc.mkdir(parents=True)
    # No retries of a failed deactivation: on one kernel, host 2's lockstop cannot
    # deactivate the lvmlock LV host 1's sanlock holds open (see the module's notes).
    (etc / "lvm.conf").write_text("global { use_lvmlockd = 1 }\n"
                                  "activation { retry_deactivation = 0 }\n")
    (etc / "lvmlocal.conf").write_text(f"local {{ host_id = {host_id} }}\n")
    return etc


def wait_until(what: str, ready: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not come up in {timeout:g} s")
        time.sleep(0.5)


@dataclass
class Hosts:
    h1_etc: Path
    h2_etc: Path
    h2_run: Path
    daemons: list[subprocess.Popen[bytes]]

    def h2_env(self) -> dict[str, str]:
        return {**LVM_ENV, "LVM_SYSTEM_DIR": str(self.h2_etc), "HOST2_RUN": str(self.h2_run)}

    def h1_env(self) -> dict[str, str]:
        return {**LVM_ENV, "LVM_SYSTEM_DIR": str(self.h1_etc)}

    def h2_argv(self, *argv: str) -> list[str]:
        return ["unshare", "-m", "sh", "-c", HOST2_WRAP, "host2", *argv]

    def h2(self, *argv: str, check: bool = True,
           timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """A command run as host 2."""
        res = subprocess.run(self.h2_argv(*argv), capture_output=True, text=True,
                             env=self.h2_env(), timeout=timeout, check=False)
        if check and res.returncode != 0:
            raise AssertionError(f"host 2: {argv} failed ({res.returncode}): {res.stderr}")
        return res

    def h1(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A command run as host 1."""
        return subprocess.run(list(argv), capture_output=True, text=True, check=check,
                              env=self.h1_env(), timeout=300)


@pytest.fixture
def hosts(lab: BlockLab, tmp_path: Path) -> Iterator[Hosts]:
    why = _missing()
    if why:
        pytest.skip(why)
    h2_run = tmp_path / "host2-run"
    for d in ("lvm", "sanlock", "lock"):
        (h2_run / d).mkdir(parents=True)
    for d in ("/run/lvm", "/run/sanlock"):
        os.makedirs(d, exist_ok=True)
    h = Hosts(h1_etc=lvm_config(tmp_path / "host1-etc", 1),
              h2_etc=lvm_config(tmp_path / "host2-etc", 2), h2_run=h2_run, daemons=[])
    # sanlock without a watchdog (none in the VM: -w 0), as root, no memory locking.
    sanlock = ["sanlock", "daemon", "-w", "0", "-U", "root", "-G", "root", "-l", "0",
               "-L", "-1"]
    lockd = ["lvmlockd", "--foreground", "--sanlock-timeout", SANLOCK_TIMEOUT]
    logs = tmp_path / "daemons.log"
    try:
        with open(logs, "ab") as log:
            h.h1(*sanlock)
            h.h2(*sanlock)
            # Foreground: lvmlockd 2.03.16 dies of a bad free() when it forks itself.
            h.daemons.append(subprocess.Popen([*lockd, "--host-id", "1"], env=h.h1_env(),
                                              stdout=log, stderr=log))
            h.daemons.append(subprocess.Popen(
                h.h2_argv(*lockd, "--host-id", "2", "--pid-file",
                          str(h2_run / "lvmlockd.pid")),
                env=h.h2_env(), stdout=log, stderr=log))
        wait_until("lvmlockd (host 1)", lambda: h.h1("lvmlockctl", "-i",
                                                     check=False).returncode == 0)
        wait_until("lvmlockd (host 2)",
                   lambda: h.h2("lvmlockctl", "-i", check=False).returncode == 0)
        yield h
    finally:
        for vg in lab.vgs:
            # vgremove of a shared VG needs its lockspace started on the host removing it.
            h.h1("vgchange", "--lockstart", vg, check=False)
            h.h1("vgremove", "-f", vg, check=False)
        h.h1("lvmlockctl", "--stop-lockspaces", check=False)
        h.h2("lvmlockctl", "--stop-lockspaces", check=False)
        for proc in h.daemons:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)
            proc.kill()  # nothing to do once it has exited
            proc.wait()
        h.h1("sanlock", "client", "shutdown", "-f", "1", check=False)
        h.h2("sanlock", "client", "shutdown", "-f", "1", check=False)


def wait_job(conn: EmbeddedConnection, job_id: str) -> None:
    info = conn.job_wait(job_id, 300)
    assert info.state == "done", info.error


def lv_uuid(env: dict[str, str], vg: str, lv: str) -> str:
    out = subprocess.run(["lvs", "--noheadings", "-o", "lv_uuid", f"{vg}/{lv}"],
                         capture_output=True, text=True, check=True, env=env).stdout
    return out.strip()


def pool_xml(vg: str, dev: str) -> str:
    return (f"<pool type='logical'><name>{vg}</name><source><device path='{dev}'/>"
            f"<name>{vg}</name></source><target><path>/dev/{vg}</path></target></pool>")


def test_shared_vg_locks_and_a_second_host(hosts: Hosts, lab: BlockLab,
                                           conn: EmbeddedConnection, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    dev = lab.loop(DISK)
    vg = lab.vg("vsshared")
    # The admin makes the VG on host 2 (vgcreate --shared starts its lockspace there)
    # and leaves it: no host has the lockspace when the pool starts.
    hosts.h2("vgcreate", "--shared", vg, dev)
    hosts.h2("vgchange", "--lockstop", vg)
    conn.pool_define_xml(pool_xml(vg, dev))

    # A host whose LVM is not set up for lvmlockd: a one-line error, nothing started.
    with pytest.raises(OperationInvalid, match=f"pool '{vg}' needs lvmlockd: .*lock type "
                                               "sanlock"):
        conn.pool_start(vg)
    assert conn.pool_info(vg).state != "running"

    monkeypatch.setenv("LVM_SYSTEM_DIR", str(hosts.h1_etc))
    conn.pool_start(vg)
    info = hosts.h1("lvmlockctl", "-i").stdout
    assert f"VG {vg} lock_type=sanlock" in info
    assert f"s lvm_{vg}:1:" in hosts.h1("sanlock", "client", "status").stdout
    assert conn.pool_info(vg).shared

    conn.volume_create(vg, VolumeCreateArgs(name="lv1", capacity=16 * MiB))
    payload = os.urandom(3 * MiB)
    wait_job(conn, conn.volume_upload(vg, "lv1", io.BytesIO(payload), offset=MiB).id)
    sink = io.BytesIO()
    wait_job(conn, conn.volume_download(vg, "lv1", sink, offset=MiB, length=len(payload)).id)
    assert sink.getvalue() == payload
    uuid = lv_uuid(hosts.h1_env(), vg, "lv1")
    # Active here, so its lock is held here, exclusively.
    assert f"LK LV ex {uuid}" in hosts.h1("lvmlockctl", "-i").stdout

    # Host 2 starts the same pool through the CLI: refused, and nothing stays behind
    # (no lockspace on host 2, host 1's lock and bytes as they were).
    cli = virtstore_cli()
    root2 = str(tmp_path / "host2-state")
    create = [cli, "--root", root2, "pool-create-as", vg, "logical", "--source-name", vg,
              "--source-dev", dev, "--target", f"/dev/{vg}"]
    res = hosts.h2(*create, check=False)
    assert res.returncode != 0
    err = res.stderr.strip().splitlines()
    assert err and f"volume 'lv1' of pool '{vg}' is locked by another host" in err[-1], \
        res.stderr
    assert f"VG {vg}" not in hosts.h2("lvmlockctl", "-i").stdout
    assert f"LK LV ex {uuid}" in hosts.h1("lvmlockctl", "-i").stdout
    sink = io.BytesIO()
    wait_job(conn, conn.volume_download(vg, "lv1", sink, offset=MiB, length=len(payload)).id)
    assert sink.getvalue() == payload

    # Host 1 stops the pool: LVs inactive, locks and lockspace released.
    conn.pool_stop(vg)
    assert f"VG {vg}" not in hosts.h1("lvmlockctl", "-i").stdout
    assert f"lvm_{vg}" not in hosts.h1("sanlock", "client", "status").stdout

    # Now host 2's start goes through: it holds the LV's lock and reads host 1's bytes.
    out = tmp_path / "from-host2.bin"
    script = (f'"$@" && {cli} --root {root2} vol-download --pool {vg} lv1 {out} '
              f"&& lvmlockctl -i && {cli} --root {root2} pool-destroy {vg}")
    res = hosts.h2("sh", "-c", script, "host2", *create, check=False)
    assert res.returncode == 0, res.stderr
    assert f"LK LV ex {uuid}" in res.stdout
    assert out.read_bytes()[MiB:MiB + len(payload)] == payload
    assert f"VG {vg}" not in hosts.h2("lvmlockctl", "-i").stdout

