"""A three-member etcd cluster on 127.0.0.1, started once per test session.

Each member has its own free client and peer ports and data directory; ``etcd_kill``
and ``etcd_restart`` stop one member (SIGKILL, as a crash) and bring it back on its
data, for the tests of a cluster that loses a member.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import urllib.request

import pytest

from net_fixtures import Server, _session_server, _stop_all, free_port, spawn, wait_for

ETCD_TOOLS = ("etcd",)
MEMBERS = 3


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=1) as resp:
            return bool(json.loads(resp.read()).get("health") == "true")
    except (OSError, ValueError):
        return False


def _argv(srv: Server, i: int) -> list[str]:
    m = srv.info["members"][i]
    initial = ",".join(f"{x['name']}=http://127.0.0.1:{x['peer']}" for x in srv.info["members"])
    return ["etcd", "--name", m["name"], "--data-dir", str(srv.dir / m["name"]),
            "--listen-client-urls", f"http://127.0.0.1:{m['client']}",
            "--advertise-client-urls", f"http://127.0.0.1:{m['client']}",
            "--listen-peer-urls", f"http://127.0.0.1:{m['peer']}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{m['peer']}",
            "--initial-cluster", initial, "--initial-cluster-token", srv.dir.name,
            "--initial-cluster-state", "new",
            # Small and quick, as a test cluster on a shared machine should be.
            "--heartbeat-interval", "100", "--election-timeout", "1000",
            "--quota-backend-bytes", str(256 << 20), "--logger", "zap",
            "--log-outputs", "stderr"]


def _start_etcd(srv: Server) -> None:
    (srv.dir / "log").mkdir()
    srv.info["members"] = [{"name": f"e{i}", "client": free_port(), "peer": free_port()}
                           for i in range(MEMBERS)]
    for i in range(MEMBERS):
        _spawn_member(srv, i)
    urls = [f"http://127.0.0.1:{m['client']}" for m in srv.info["members"]]
    srv.info["endpoints"] = urls
    for url in urls:
        wait_for(f"etcd {url}", lambda u=url: _healthy(u), 60, 0.2)  # type: ignore[misc]


def _spawn_member(srv: Server, i: int) -> None:
    m = srv.info["members"][i]
    proc = spawn(_argv(srv, i), srv.dir / "log" / f"{m['name']}.out")
    m["pid"] = proc.pid
    m["proc"] = proc
    srv.pids.append(proc.pid)


def etcd_kill(srv: Server, i: int) -> None:
    """SIGKILL member ``i`` (a process this fixture started, by its PID)."""
    m = srv.info["members"][i]
    proc: subprocess.Popen[bytes] = m["proc"]
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    srv.pids.remove(proc.pid)


def etcd_restart(srv: Server, i: int) -> None:
    _spawn_member(srv, i)
    url = srv.info["endpoints"][i]
    wait_for(f"etcd {url}", lambda: _healthy(url), 60, 0.2)


@pytest.fixture(scope="session")
def etcd_cluster(request: pytest.FixtureRequest) -> Server:
    """Three etcd members: ``info['endpoints']`` lists their client URLs."""
    request.addfinalizer(_stop_all)
    return _session_server("etcd", _start_etcd, needs=ETCD_TOOLS)

