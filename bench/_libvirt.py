"""libvirt, the reference: reach libvirtd, start it if none runs, define and clean up pools.

Everything here degrades to a reason string: when python3-libvirt is missing, libvirtd is
not installed, or the daemon cannot be reached, the benchmark prints its virtstore
column and says why the libvirt one is empty.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import ModuleType
from typing import Any

DEFAULT_URI = "qemu:///system"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0


def _import_libvirt() -> ModuleType | None:
    try:
        import libvirt
    except ImportError:
        return None
    # Errors come back as exceptions; keep libvirt from also printing them to stderr.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    module: ModuleType = libvirt
    return module


def libvirtd_pids() -> set[int]:
    """PIDs of the running libvirtd processes, read from /proc."""
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            comm = Path(f"/proc/{entry}/comm").read_text().strip()
        except OSError:
            continue
        if comm == "libvirtd":
            pids.add(int(entry))
    return pids


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not os.path.exists(f"/proc/{pid}"):
            return True
        time.sleep(0.1)
    return False


class Libvirt:
    """A connection to libvirt, the daemon it may have started, and the pools it defined."""

    def __init__(self, module: ModuleType, conn: Any, started_pid: int | None) -> None:
        self.lv = module
        self.conn = conn
        self.started_pid = started_pid
        self._pools: list[Any] = []

    # -- opening ---------------------------------------------------------------
    @classmethod
    def open(cls, uri: str = DEFAULT_URI) -> Libvirt | str:
        """A connection, or the reason there is none."""
        lv = _import_libvirt()
        if lv is None:
            return "python3-libvirt is not installed"
        started: int | None = None
        if not libvirtd_pids():
            if shutil.which("libvirtd") is None:
                return "libvirtd is not installed"
            started = cls._start_daemon()
            if started is None:
                return "libvirtd -d did not start"
        conn = cls._connect(lv, uri, wait=START_TIMEOUT if started else 0.0)
        if isinstance(conn, str):
            if started is not None:
                cls._stop_daemon(started)
            return conn
        return cls(lv, conn, started)

    @staticmethod
    def _start_daemon() -> int | None:
        """Run ``libvirtd -d``; the PID of the daemon it left, or None."""
        before = libvirtd_pids()
        res = subprocess.run(["libvirtd", "-d"], capture_output=True, text=True, check=False)
        if res.returncode != 0:
            return None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            new = libvirtd_pids() - before
            if len(new) == 1:
                return new.pop()
            time.sleep(0.1)
        return None

    @staticmethod
    def _stop_daemon(pid: int) -> None:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        if not _wait_gone(pid, STOP_TIMEOUT):
            os.kill(pid, signal.SIGKILL)
            _wait_gone(pid, STOP_TIMEOUT)

    @staticmethod
    def _connect(lv: ModuleType, uri: str, wait: float) -> Any | str:
        deadline = time.monotonic() + wait
        while True:
            try:
                return lv.open(uri)
            except lv.libvirtError as exc:
                if time.monotonic() >= deadline:
                    return f"cannot connect to {uri}: {exc}"
            time.sleep(0.2)

    # -- use -------------------------------------------------------------------
    def version(self) -> str:
        v = int(self.conn.getLibVersion())
        return f"{v // 1_000_000}.{v // 1000 % 1000}.{v % 1000}"

    def define_started_pool(self, xml: str) -> Any:
        """Define and start a pool (libvirt scans it as it starts); undefined at close."""
        pool = self.conn.storagePoolDefineXML(xml, 0)
        self._pools.append(pool)
        pool.create(0)
        return pool

    # -- cleaning up -----------------------------------------------------------
    def drop_pool(self, pool: Any) -> list[str]:
        """Destroy and undefine one of our pools now (before its storage goes away)."""
        if pool in self._pools:
            self._pools.remove(pool)
        return self._remove_pool(pool)

    def close(self) -> list[str]:
        """Destroy and undefine our pools, close, stop the daemon we started; problems met."""
        problems: list[str] = []
        for pool in reversed(self._pools):
            problems += self._remove_pool(pool)
        self._pools.clear()
        try:
            self.conn.close()
        except self.lv.libvirtError as exc:
            problems.append(f"closing the connection: {exc}")
        if self.started_pid is not None:
            self._stop_daemon(self.started_pid)
            self.started_pid = None
        return problems

    def _remove_pool(self, pool: Any) -> list[str]:
        problems = []
        name = pool.name()
        try:
            if pool.isActive():
                pool.destroy()
        except self.lv.libvirtError as exc:
            problems.append(f"pool {name}: destroy: {exc}")
        try:
            pool.undefine()
        except self.lv.libvirtError as exc:
            problems.append(f"pool {name}: undefine: {exc}")
        return problems
