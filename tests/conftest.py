"""Shared fixtures: a fresh state root per test, real directories, real tools."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from virtstore.api.embedded import EmbeddedConnection

REPO = Path(__file__).resolve().parent.parent

# tests/kernel runs inside the kernel lab VM only (scripts/test boots it and sets this).
collect_ignore = [] if os.environ.get("VIRTSTORE_KERNEL_LAB") == "1" else ["kernel"]


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The kernel lab's check last: it waits for the VM that runs beside the suite."""
    items.sort(key=lambda item: item.nodeid.startswith("tests/test_kernel_lab.py::"
                                                       "test_kernel_lab_passed"))


CONFORMANCE = Path(os.environ.get("VIRTSTORE_CONFORMANCE",
                                  REPO.parent / "shared" / "conformance" / "libvirt"))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "state"
    r.mkdir()
    return r


@pytest.fixture
def conn(root: Path) -> Iterator[EmbeddedConnection]:
    c = EmbeddedConnection(str(root))
    yield c
    c.close()


@pytest.fixture
def pooldir(tmp_path: Path) -> Path:
    d = tmp_path / "pool"
    d.mkdir()
    return d


def dir_pool_xml(name: str, path: Path | str, uuid: str | None = None) -> str:
    u = f"<uuid>{uuid}</uuid>" if uuid else ""
    return (f"<pool type='dir'><name>{name}</name>{u}<target><path>{path}</path>"
            f"</target></pool>")


@pytest.fixture
def pool(conn: EmbeddedConnection, pooldir: Path) -> str:
    conn.pool_define_xml(dir_pool_xml("p", pooldir))
    conn.pool_start("p")
    return "p"


def qemu_info(path: Path | str) -> dict[str, Any]:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)],
                         check=True, capture_output=True, text=True).stdout
    info: dict[str, Any] = json.loads(out)
    return info


def same_image(a: Path, fmt_a: str, b: Path, fmt_b: str) -> bool:
    """Whether two images hold the same guest-visible bytes (qemu-img compare)."""
    return subprocess.run(["qemu-img", "compare", "-q", "-U", "-f", fmt_a, "-F", fmt_b,
                           str(a), str(b)], check=False).returncode == 0


requires_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None,
                                       reason="qemu-img (Debian qemu-utils) is not installed")


def job_done(conn: EmbeddedConnection, job_id: str) -> None:
    info = conn.job_wait(job_id, 60)
    assert info.state == "done", info.error


def clone_resize_wipe(conn: EmbeddedConnection, pool: str, files: Path, size: int) -> None:
    """Clone volume a.raw to c.raw, grow c.raw to ``size`` and wipe it, each checked on
    the files under ``files``."""
    job_done(conn, conn.volume_clone(pool, "a.raw", "c.raw").id)
    assert (files / "c.raw").read_bytes() == (files / "a.raw").read_bytes()
    job_done(conn, conn.volume_resize(pool, "c.raw", size).id)
    assert conn.volume_info(pool, "c.raw").capacity == size
    job_done(conn, conn.volume_wipe(pool, "c.raw").id)
    assert (files / "c.raw").read_bytes() == bytes(size)
