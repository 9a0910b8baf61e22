"""Real network storage servers on loopback, started once per test session.

Each server (a one-node Ceph cluster, tgtd, nfs-ganesha, glusterd) is started the first
time a test asks for it and stopped when the session ends; a server that cannot start
makes its tests skip with the reason. Test modules import the fixtures they use; the
servers are cached here, at module level, so importing a fixture into several modules
still starts its server once. Ports are picked free, so runs side by side do not clash;
servers that must own a host-wide resource (rpcbind registrations, glusterd's socket)
take a lock for the session instead.

Start-up times are printed with ``-s`` and kept in ``STARTUP`` (seconds per server).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

STARTUP: dict[str, float] = {}
_servers: dict[str, Any] = {}
_failed: dict[str, str] = {}
LOCK_DIR = Path("/run/lock") if Path("/run/lock").is_dir() else Path(tempfile.gettempdir())


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def sh(*argv: str, check: bool = True, env: dict[str, str] | None = None,
       input: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=check,
                          env={**os.environ, "LC_ALL": "C", **(env or {})}, input=input,
                          timeout=timeout)


def wait_for(what: str, ok: Callable[[], bool], timeout: float, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ok():
            return
        time.sleep(interval)
    raise RuntimeError(f"{what} did not come up within {timeout:g}s")


def stop_pid(pid: int, grace: float = 10.0) -> None:
    """SIGTERM one process we started, SIGKILL it after ``grace`` seconds."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid if not Path(f"/proc/{pid}").exists() else 0
        if done:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def spawn(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a server process in the foreground of its own session; it gets SIGKILL when
    this test process dies (setpriv --pdeathsig), so a killed run leaves no server."""
    if shutil.which("setpriv"):
        argv = ["setpriv", "--pdeathsig", "KILL", "--", *argv]
    fh = open(log, "wb")
    try:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                env={**os.environ, "LC_ALL": "C", **(env or {})})
    finally:
        fh.close()
    home = next((p for p in log.parents if p.name.startswith("virtstore-")), log.parent)
    with open(home / "pids", "a", encoding="ascii") as rec:  # for _reap_stale
        rec.write(f"{proc.pid} {_start_time(proc.pid)}\n")
    return proc


@dataclass
class Server:
    name: str
    dir: Path
    pids: list[int] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    cleanups: list[Callable[[], None]] = field(default_factory=list)
    lock_fd: int | None = None

    def stop(self) -> None:
        for fn in reversed(self.cleanups):
            with contextlib.suppress(Exception):
                fn()
        for pid in reversed(self.pids):
            stop_pid(pid)
        if self.lock_fd is not None:
            os.close(self.lock_fd)
        shutil.rmtree(self.dir, ignore_errors=True)


def _session_server(name: str, start: Callable[[Server], None], *,
                    needs: tuple[str, ...] = (), lock: str | None = None,
                    lock_wait: float = 600) -> Server:
    """The running server ``name``, started by ``start`` at its first use; skips the
    calling test with the reason when it cannot start."""
    if name in _servers:
        return _servers[name]  # type: ignore[no-any-return]
    if name in _failed:
        pytest.skip(_failed[name])
    missing = [p for p in needs if shutil.which(p) is None and not Path(p).exists()]
    if missing:
        _failed[name] = f"{name} server cannot start: {', '.join(missing)} not installed"
        pytest.skip(_failed[name])
    if os.geteuid() != 0:
        _failed[name] = f"{name} server needs root"
        pytest.skip(_failed[name])
    try:
        srv = start_server(name, start, lock=lock, lock_wait=lock_wait)
    except Exception as exc:
        _failed[name] = f"{name} server could not start on this host: {exc}"
        pytest.skip(_failed[name])
    print(f"\n[{name} server up in {STARTUP[name]:.1f}s]", flush=True)
    _servers[name] = srv
    return srv


def start_server(name: str, start: Callable[[Server], None], *, lock: str | None = None,
                 lock_wait: float = 600) -> Server:
    """Server ``name`` started by ``start`` in a private directory (what a killed earlier
    run left of it is stopped first); on failure nothing is left and the error raised.
    The benchmarks start their servers here too."""
    srv = Server(name=name, dir=Path(tempfile.mkdtemp(prefix=f"virtstore-{name}-")))
    (srv.dir / "owner").write_text(f"{os.getpid()} {_start_time(os.getpid())}\n")
    try:
        if lock is not None:
            fd = os.open(LOCK_DIR / f"virtstore-test-{lock}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            srv.lock_fd = fd
            deadline = time.monotonic() + lock_wait
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"another test run holds the {lock} lock") from None
                    time.sleep(1)
        _reap_stale(name)  # under the lock: a live run's servers are never touched
        t0 = time.monotonic()
        start(srv)
        STARTUP[name] = time.monotonic() - t0
    except BaseException:
        srv.stop()
        raise
    return srv


def _start_time(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "?"


def _reap_stale(name: str) -> None:
    """Stop what a killed earlier run left of server ``name``: the processes whose command
    line names that run's private server directory (its daemons fork children that
    outlive a SIGKILL of the run), FUSE mounts below it, then the directory."""
    for d in Path(tempfile.gettempdir()).glob(f"virtstore-{name}-*"):
        try:
            pid_s, start = (d / "owner").read_text().split()
        except (OSError, ValueError):
            continue
        if _start_time(int(pid_s)) == start:
            continue  # its run is alive
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if str(d).encode() in cmd or str(d).replace("/", "-").encode() in cmd:
                stop_pid(int(proc.name), grace=5)
        for rec in (d / "pids").read_text().splitlines() if (d / "pids").exists() else []:
            pid, _, started = rec.partition(" ")
            if pid.isdigit() and _start_time(int(pid)) == started:
                stop_pid(int(pid), grace=5)
        for line in Path("/proc/self/mounts").read_text().splitlines():
            mnt = line.split()[1]
            if mnt.startswith(str(d) + "/"):
                sh("umount", "-l", mnt, check=False)
        shutil.rmtree(d, ignore_errors=True)


def _stop_all() -> None:
    for name in list(_servers):
        _servers.pop(name).stop()


# -- Ceph: one monitor, one OSD (memstore), one manager, on 127.0.0.1 (or a given address) --
CEPH_TOOLS = ("ceph-mon", "ceph-osd", "ceph-mgr", "ceph", "ceph-authtool", "monmaptool")


def _start_ceph(srv: Server, memstore_bytes: int = 1 << 30, addr: str = "127.0.0.1") -> None:
    """The OSD keeps its data in memory: ``memstore_bytes`` is its whole capacity. Every
    daemon binds to ``addr`` (an IPv4 address of this host's own namespace)."""
    d = srv.dir
    for sub in ("run", "log", "mon", "osd", "mgr", "crash"):
        (d / sub).mkdir()
    # The standard ports when they are free: over a monitor on another port librados
    # speaks msgr2, where a refused cephx key shows only as a timeout.
    v2, v1 = 3300, 6789
    if port_open(v2, addr) or port_open(v1, addr):
        v2, v1 = free_port(), free_port()
    fsid = str(uuid.uuid4())
    mon_addr = f"[v2:{addr}:{v2},v1:{addr}:{v1}]"
    network = "127.0.0.0/8" if addr == "127.0.0.1" else f"{addr}/32"
    conf = d / "ceph.conf"
    conf.write_text(f"""[global]
fsid = {fsid}
mon initial members = a
mon host = {mon_addr}
public network = {network}
public addr = {addr}
cluster network = {network}
cluster addr = {addr}
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
mon warn on insecure global id reclaim allowed = false
mon warn on pool no redundancy = false
mon allow pool size one = true
mon allow pool delete = true
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
run dir = {d}/run
admin socket = {d}/run/$name.asok
pid file = {d}/run/$name.pid
log file = {d}/log/$name.log
keyring = {d}/$name.keyring
mon data = {d}/mon/$cluster-$id
osd data = {d}/osd/$cluster-$id
mgr data = {d}/mgr/$cluster-$id
crash dir = {d}/crash
[mon]
mon data avail warn = 1
mon data avail crit = 0
[osd]
osd objectstore = memstore
memstore device bytes = {memstore_bytes}
osd memory target = 939524096
osd op num shards = 1
osd op num threads per shard = 2
""")
    env = {"CEPH_CONF": str(conf)}
    # The port pools name: librados speaks msgr1 to 6789 and msgr2 to any other port.
    mon_port = v1 if v1 == 6789 else v2
    srv.info.update(conf=str(conf), env=env, mon_host=f"{addr}:{mon_port}", v2=v2, v1=v1,
                    mon_port=mon_port, addr=addr)

    def ceph(*args: str, input: str | None = None) -> str:
        return sh("ceph", "--connect-timeout", "10", *args, env=env, input=input).stdout

    sh("ceph-authtool", "--create-keyring", str(d / "mon.keyring"), "--gen-key", "-n", "mon.",
       "--cap", "mon", "allow *")
    sh("ceph-authtool", "--create-keyring", str(d / "client.admin.keyring"), "--gen-key", "-n",
       "client.admin", "--cap", "mon", "allow *", "--cap", "osd", "allow *", "--cap", "mgr",
       "allow *", "--cap", "mds", "allow *")
    sh("ceph-authtool", str(d / "mon.keyring"), "--import-keyring",
       str(d / "client.admin.keyring"))
    sh("monmaptool", "--create", "--fsid", fsid, "--addv", "a", mon_addr, str(d / "monmap"))
    sh("ceph-mon", "--mkfs", "-i", "a", "--monmap", str(d / "monmap"), "--keyring",
       str(d / "mon.keyring"), env=env)
    srv.pids.append(spawn(["ceph-mon", "-i", "a", "-f"], d / "log/mon.out", env).pid)
    wait_for("ceph-mon", lambda: sh("ceph", "--connect-timeout", "2", "mon", "stat",
                                     env=env, check=False).returncode == 0, 30, 0.3)
    osd_uuid = str(uuid.uuid4())
    osd_key = sh("ceph-authtool", "--gen-print-key").stdout.strip()
    osd_id = ceph("osd", "new", osd_uuid, "-i", "-",
                  input=f'{{"cephx_secret": "{osd_key}"}}').strip()
    (d / f"osd/ceph-{osd_id}").mkdir()
    sh("ceph-authtool", "--create-keyring", str(d / f"osd.{osd_id}.keyring"), "--name",
       f"osd.{osd_id}", "--add-key", osd_key)
    sh("ceph-osd", "-i", osd_id, "--mkfs", "--osd-uuid", osd_uuid, env=env)
    srv.pids.append(spawn(["ceph-osd", "-i", osd_id, "-f"], d / "log/osd.out", env).pid)
    (d / "mgr/ceph-x").mkdir()
    (d / "mgr.x.keyring").write_text(ceph("auth", "get-or-create", "mgr.x", "mon",
                                          "allow profile mgr", "osd", "allow *", "mds",
                                          "allow *"))
    srv.pids.append(spawn(["ceph-mgr", "-i", "x", "-f"], d / "log/mgr.out", env).pid)
    wait_for("ceph-osd", lambda: " 1 up" in ceph("osd", "stat"), 60, 0.3)
    ceph("osd", "pool", "create", "rbd", "8", "8")
    ceph("osd", "pool", "application", "enable", "rbd", "rbd")
    sh("rbd", "pool", "init", "rbd", env=env)
    key = ""
    for line in (d / "client.admin.keyring").read_text().splitlines():
        if line.strip().startswith("key ="):
            key = line.split("=", 1)[1].strip()
    srv.info["admin_key"] = key


@pytest.fixture(scope="session")
def ceph_fixture(request: pytest.FixtureRequest) -> Server:
    """A one-node Ceph cluster: ``info`` has conf, env, mon_host, admin_key; pool 'rbd'."""
    request.addfinalizer(_stop_all)
    return _session_server("ceph", _start_ceph, needs=CEPH_TOOLS)


def ceph_cmd(srv: Server, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh(*args, env=srv.info["env"], check=check)


# -- NFS: nfs-ganesha (FSAL VFS) exporting a directory over NFSv3/v4, with rpcbind ---------
def _start_nfs(srv: Server) -> None:
    d = srv.dir
    export = d / "export"
    export.mkdir()
    Path("/run/rpcbind").mkdir(exist_ok=True)
    if sh("rpcinfo", "-p", "127.0.0.1", check=False).returncode != 0:
        # rpcbind listens on all addresses (its -h crashes on Debian 12); only local
        # clients talk to it. A running one is shared: there is one per host.
        srv.pids.append(spawn(["/usr/sbin/rpcbind", "-f", "-w"], d / "rpcbind.log").pid)
        wait_for("rpcbind", lambda: sh("rpcinfo", "-p", "127.0.0.1",
                                       check=False).returncode == 0, 10, 0.1)
    nfs_port, mnt_port = free_port(), free_port()
    (d / "ganesha.conf").write_text(f"""NFS_CORE_PARAM {{
    Bind_addr = 127.0.0.1;
    NFS_Port = {nfs_port};
    MNT_Port = {mnt_port};
    Protocols = 3, 4;
    Enable_NLM = false;
    Enable_RQUOTA = false;
    Enable_UDP = false;
}}
NFS_KRB5 {{ Active_krb5 = false; }}
NFSV4 {{ Graceless = true; RecoveryBackend = fs; RecoveryRoot = {d / 'recovery'};
        Lease_Lifetime = 10; }}
EXPORT {{
    Export_Id = 1;
    Path = {export};
    Pseudo = /export;
    Access_Type = RW;
    Squash = No_Root_Squash;
    Protocols = 3, 4;
    Transports = TCP;
    SecType = sys;
    FSAL {{ Name = VFS; }}
}}
LOG {{ Default_Log_Level = EVENT; }}
""")
    srv.pids.append(spawn(["/usr/bin/ganesha.nfsd", "-F", "-f", str(d / "ganesha.conf"), "-L",
                           str(d / "ganesha.log"), "-p", str(d / "ganesha.pid"), "-N",
                           "NIV_EVENT"], d / "ganesha.out").pid)
    url = f"nfs://127.0.0.1{export}"
    try:
        wait_for("nfs-ganesha", lambda: sh("nfs-ls", url, check=False).returncode == 0, 30, 0.2)
    except RuntimeError as exc:  # the skip reason says what ganesha said
        log = d / "ganesha.log"
        bad = [line.rsplit(" :", 1)[-1] for line in
               (log.read_text(errors="replace").splitlines() if log.exists() else [])
               if any(f":{level} :" in line for level in ("CRIT", "MAJ", "FATAL"))]
        raise RuntimeError(f"{exc}: {bad[0]}" if bad else str(exc)) from None
    srv.info.update(export=str(export), url=url, nfs_port=nfs_port)


@pytest.fixture(scope="session")
def nfs_fixture(request: pytest.FixtureRequest) -> Server:
    """nfs-ganesha on 127.0.0.1: ``info`` has export (its local directory) and url."""
    request.addfinalizer(_stop_all)
    return _session_server("nfs", _start_nfs, needs=("/usr/bin/ganesha.nfsd",
                                                     "/usr/sbin/rpcbind", "nfs-ls"),
                           lock="nfs")


# -- GlusterFS: glusterd and a one-brick volume on 127.0.0.1 ---------------------------------
def _start_gluster(srv: Server) -> None:
    d = srv.dir
    for sub in ("lib", "brick", "log"):
        (d / sub).mkdir()
    Path("/var/run/gluster").mkdir(parents=True, exist_ok=True)
    (d / "glusterd.vol").write_text(f"""volume management
    type mgmt/glusterd
    option working-directory {d}/lib
    option transport-type socket
    option transport.address-family inet
    option transport.socket.bind-address 127.0.0.1
    option transport.socket.listen-port 24007
    option transport.socket.read-fail-log off
    option ping-timeout 0
    option event-threads 1
    option max-port 60999
end-volume
""")
    if port_open(24007):
        raise RuntimeError("port 24007 (glusterd) is taken by another glusterd")
    proc = spawn(["/usr/sbin/glusterd", "-N", "-f", str(d / "glusterd.vol"), "-l",
                  str(d / "log/glusterd.log"), "-p", str(d / "glusterd.pidfile")],
                 d / "glusterd.out")
    srv.pids.append(proc.pid)
    wait_for("glusterd", lambda: sh("gluster", "--mode=script", "pool", "list",
                                     check=False).returncode == 0, 20, 0.1)
    vol = "vs" + uuid.uuid4().hex[:6]
    # The CLI refuses 127.0.0.1 as a brick host; the host name (resolving to it) passes.
    sh("gluster", "--mode=script", "volume", "create", vol,
       f"{socket.gethostname()}:{d / 'brick'}", "force")
    srv.cleanups.append(lambda: sh("gluster", "--mode=script", "volume", "delete", vol,
                                   check=False) and None)
    sh("gluster", "--mode=script", "volume", "start", vol)
    srv.cleanups.append(lambda: sh("gluster", "--mode=script", "volume", "stop", vol,
                                   "force", check=False) and None)
    srv.info.update(volume=vol, brick=str(d / "brick"), host="127.0.0.1")


@pytest.fixture(scope="session")
def gluster_fixture(request: pytest.FixtureRequest) -> Server:
    """glusterd with one started volume: ``info`` has volume, brick (its local dir), host."""
    request.addfinalizer(_stop_all)
    return _session_server("gluster", _start_gluster, needs=("/usr/sbin/glusterd", "gluster"),
                           lock="gluster")


# -- iSCSI: tgtd (userspace target) with two targets, one behind CHAP ------------------------
ISCSI_STORAGE = "iqn.2024-01.test.local:storage1"
ISCSI_SECURE = "iqn.2024-01.test.local:secure"
ISCSI_CHAP = ("chapuser", "chapsecret123")


def _start_tgtd(srv: Server) -> None:
    d = srv.dir
    port = free_port()
    ctl = 100 + int.from_bytes(os.urandom(2), "big") % 30000  # tgtd takes up to 32767
    while Path(f"/var/run/tgtd/socket.{ctl}").exists():
        ctl += 1
    for name, size in (("lun1.img", 64), ("lun2.img", 128), ("lun3.img", 32)):
        with open(d / name, "wb") as fh:
            fh.truncate(size << 20)
    proc = spawn(["/usr/sbin/tgtd", "-f", "--control-port", str(ctl), "--iscsi",
                  f"portal=127.0.0.1:{port}"], d / "tgtd.log")
    srv.pids.append(proc.pid)

    def tgtadm(*args: str) -> str:
        return sh("tgtadm", "-C", str(ctl), "--lld", "iscsi", *args).stdout

    def teardown() -> None:
        out = sh("tgtadm", "-C", str(ctl), "--lld", "iscsi", "--op", "show", "--mode",
                 "target", check=False).stdout
        for line in out.splitlines():
            if line.startswith("Target ") and ":" in line:
                tid = line.split()[1].rstrip(":")
                sh("tgtadm", "-C", str(ctl), "--lld", "iscsi", "--op", "delete", "--mode",
                   "target", "--tid", tid, "--force", check=False)
        sh("tgtadm", "-C", str(ctl), "--op", "delete", "--mode", "system", check=False)

    srv.cleanups.append(teardown)
    wait_for("tgtd", lambda: sh("tgtadm", "-C", str(ctl), "--lld", "iscsi", "--op", "show",
                                "--mode", "target", check=False).returncode == 0, 10, 0.1)
    tgtadm("--op", "new", "--mode", "target", "--tid", "1", "-T", ISCSI_STORAGE)
    tgtadm("--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1", "-b",
           str(d / "lun1.img"))
    tgtadm("--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "2", "-b",
           str(d / "lun2.img"))
    tgtadm("--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL")
    tgtadm("--op", "new", "--mode", "target", "--tid", "2", "-T", ISCSI_SECURE)
    tgtadm("--op", "new", "--mode", "logicalunit", "--tid", "2", "--lun", "1", "-b",
           str(d / "lun3.img"))
    tgtadm("--op", "bind", "--mode", "target", "--tid", "2", "-I", "ALL")
    tgtadm("--op", "new", "--mode", "account", "--user", ISCSI_CHAP[0], "--password",
           ISCSI_CHAP[1])
    tgtadm("--op", "bind", "--mode", "account", "--tid", "2", "--user", ISCSI_CHAP[0])
    wait_for("tgtd portal", lambda: port_open(port), 10, 0.1)
    srv.info.update(port=port, control=ctl, luns=[str(d / "lun1.img"), str(d / "lun2.img"),
                                                  str(d / "lun3.img")])


@pytest.fixture(scope="session")
def iscsi_fixture(request: pytest.FixtureRequest) -> Server:
    """tgtd on 127.0.0.1: ``info`` has port and the LUNs' backing files (lun1 64M and lun2
    128M of ISCSI_STORAGE, lun3 32M of ISCSI_SECURE behind ISCSI_CHAP)."""
    request.addfinalizer(_stop_all)
    return _session_server("iscsi", _start_tgtd, needs=("/usr/sbin/tgtd", "tgtadm"))
