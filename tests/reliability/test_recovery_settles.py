"""A process killed at the exact step that makes a change visible on disk: the next
process to open the root must settle the change one way or the other, so that what it
lists before any refresh is what a refresh would list.

Each case runs the operation in a child that SIGKILLs itself at one point (a patched
backend or engine step), then opens the root in this process (a new process to it) and
checks the volume as a user would: listed or not, looked up or not, a create of the
name refused or accepted, and the listing equal to the listing after ``pool-refresh``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from reliability import summary
from reliability.harness import STAGING_PREFIX, MiB, Trial, child_env, pattern
from virtstore.api import VolumeCreateArgs
from virtstore.errors import AlreadyExists, NoSuchVolume

KILLED_CHILD = r"""
import json, os, signal, sys
from virtstore.api import VolumeCreateArgs
from virtstore.backends.dir import DirBackend
from virtstore.api.embedded import EmbeddedConnection
from virtstore.engine.dataops import DataOps

spec = json.loads(sys.argv[1])
point = spec["point"]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

real_commit = DirBackend.commit_volume
real_delete = DirBackend.delete_volume
real_replace = os.replace

def commit(self, pool, staging, final):
    if point == "before-commit":
        die()
    if point == "linked":  # the final name is made, the staging name not yet removed
        os.link(staging, final)
        die()
    real_commit(self, pool, staging, final)
    if point == "committed":
        die()

def delete(self, pool, rec):
    if point == "before-delete":
        die()
    real_delete(self, pool, rec)
    if point == "deleted":
        die()

def replace(src, dst, **kw):
    real_replace(src, dst, **kw)
    if point == "replaced" and dst == spec["path"]:
        die()

def reread(self, *args):
    if point == "changed":  # the volume changed on disk, its row not yet re-read
        die()

DirBackend.commit_volume = commit
DirBackend.delete_volume = delete
os.replace = replace
DataOps._reread = reread

c = EmbeddedConnection(spec["root"])
pool, op, name = spec["pool"], spec["op"], spec["name"]
if op == "create":
    c.volume_create(pool, VolumeCreateArgs(name, spec["capacity"], format=spec["format"]))
elif op == "clone":
    c.job_wait(c.volume_clone(pool, spec["src"], name).id)
elif op == "delete":
    c.volume_delete(pool, name)
elif op == "upload":
    with open(spec["file"], "rb") as f:
        c.job_wait(c.volume_upload(pool, name, f).id)
elif op == "resize":
    c.job_wait(c.volume_resize(pool, name, spec["capacity"]).id)
elif op == "wipe":
    c.job_wait(c.volume_wipe(pool, name, "random").id)
sys.exit(3)  # the patched step was never reached
"""


def run_killed(trial: Trial, op: str, point: str, name: str, **kw: object) -> None:
    spec = trial.spec(op, point=point, name=name, path=str(trial.path(name)), **kw)
    proc = subprocess.run([sys.executable, "-c", KILLED_CHILD, json.dumps(spec)],
                          capture_output=True, text=True, env=child_env(), timeout=60)
    assert proc.returncode == -signal.SIGKILL, (
        f"the child was to die at '{point}' but ended with {proc.returncode}: "
        f"{proc.stderr.strip()}")
    summary.add("kills")
    summary.add("kills_mid_op")


def assert_settled(trial: Trial, name: str) -> bool:
    """What the next process shows of ``name`` agrees with the disk and with a refresh;
    True if the volume is there."""
    with trial.fresh() as c:
        before = c.list_volumes(trial.pool)
        listed = name in {v.name for v in before}
        on_disk = trial.path(name).exists()
        assert listed == on_disk, (f"'{name}' is {'' if on_disk else 'not '}on disk but "
                                   f"{'' if listed else 'not '}listed")
        if on_disk:
            assert c.volume_info(trial.pool, name) in before
            with pytest.raises(AlreadyExists):
                c.volume_create(trial.pool, VolumeCreateArgs(name, MiB))
        else:
            with pytest.raises(NoSuchVolume):
                c.volume_info(trial.pool, name)
        leftovers = [n for n in os.listdir(trial.pooldir) if n.startswith(STAGING_PREFIX)]
        assert not leftovers, f"staging files left: {leftovers}"
        c.pool_refresh(trial.pool)
        after = c.list_volumes(trial.pool)
        assert before == after, f"listing before a refresh {before} differs from after {after}"
        if not on_disk:  # the name is free again
            c.volume_create(trial.pool, VolumeCreateArgs(name, MiB))
        return on_disk


@pytest.fixture
def trial(area: Path) -> Trial:
    return Trial.make(area)


@pytest.mark.parametrize(("point", "fmt", "there"), [
    ("before-commit", "raw", False),
    ("linked", "raw", True),
    ("committed", "raw", True),
    ("committed", "qcow2", True),
])
def test_create_killed_around_its_commit(trial: Trial, point: str, fmt: str,
                                         there: bool) -> None:
    """A complete volume that reached its final name is published; one that did not is
    gone and its name free."""
    run_killed(trial, "create", point, "v", capacity=3 * MiB, format=fmt)
    assert assert_settled(trial, "v") is there
    if there:
        with trial.fresh() as c:
            info = c.volume_info(trial.pool, "v")
        assert (info.capacity, info.format) == (3 * MiB, fmt)


@pytest.mark.parametrize("point", ["linked", "committed"])
def test_clone_killed_after_its_commit(trial: Trial, point: str) -> None:
    data = pattern(5, 2 * MiB)
    trial.path("src").write_bytes(data)
    with trial.fresh() as c:
        c.pool_refresh(trial.pool)
    run_killed(trial, "clone", point, "copy", src="src")
    assert assert_settled(trial, "copy")
    assert trial.path("copy").read_bytes() == data


@pytest.mark.parametrize(("point", "there"), [("before-delete", True), ("deleted", False)])
def test_delete_killed_around_the_removal(trial: Trial, point: str, there: bool) -> None:
    with trial.fresh() as c:
        c.volume_create(trial.pool, VolumeCreateArgs("gone", MiB))
    run_killed(trial, "delete", point, "gone")
    assert assert_settled(trial, "gone") is there


def test_upload_killed_after_the_swap(trial: Trial, area: Path) -> None:
    """The new bytes took the name: the listing shows the new size at once."""
    with trial.fresh() as c:
        c.volume_create(trial.pool, VolumeCreateArgs("up", MiB))
    src = area / "upload"
    src.write_bytes(pattern(9, 3 * MiB))
    run_killed(trial, "upload", "replaced", "up", file=str(src))
    assert assert_settled(trial, "up")
    with trial.fresh() as c:
        assert c.volume_info(trial.pool, "up").capacity == 3 * MiB


@pytest.mark.parametrize("op", ["resize", "wipe"])
def test_job_killed_before_its_volume_is_reread(trial: Trial, op: str) -> None:
    """A resize or an in-place wipe changed the file; the next start re-reads it."""
    with trial.fresh() as c:
        c.volume_create(trial.pool, VolumeCreateArgs("j", 2 * MiB, allocation=0))
        before = c.volume_info(trial.pool, "j")
    run_killed(trial, op, "changed", "j", capacity=5 * MiB)
    assert assert_settled(trial, "j")
    with trial.fresh() as c:
        now = c.volume_info(trial.pool, "j")
    if op == "resize":
        assert now.capacity == 5 * MiB
    else:  # random bytes written over a sparse file allocate it
        assert now.allocation > before.allocation
