"""What the engine refuses to touch for its callers: pool targets and backing files.

The embedded engine runs with its caller's own rights, so it is permissive: it only
keeps pools off its own state root. virtstored acts for other callers with root's
rights, so its engine is confined (``Confinement.daemon``): no file pool on ``/`` or a
system directory, and backing files only among the volumes of defined pools or under
the configured backing roots. Remote callers are confined further by the server, to
the pool roots of its configuration (``check_remote_target``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from virtstore.backends import backend_for
from virtstore.errors import Forbidden
from virtstore.xml import PoolDef

# Refused as file pool targets by the daemon, with everything under them ("/" itself only).
SYSTEM_DIRS = ("/etc", "/proc", "/sys", "/dev", "/boot", "/usr")


@dataclass(frozen=True)
class Confinement:
    system_dirs: bool = False  # refuse file pools on "/" and under SYSTEM_DIRS
    backing_in_pools: bool = False  # backing files must be pool volumes or under roots
    backing_roots: tuple[str, ...] = ()

    @classmethod
    def daemon(cls, backing_roots: Sequence[str] = ()) -> Confinement:
        return cls(system_dirs=True, backing_in_pools=True,
                   backing_roots=tuple(os.path.realpath(r) for r in backing_roots))


def under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _forms(path: str) -> set[str]:
    """The path as written and as it resolves: a symlink must not get around a rule."""
    clean = os.path.normpath(path)
    return {clean, os.path.realpath(clean)}


def _refused(path: str, why: str) -> Forbidden:
    return Forbidden(f"storage pool target path '{path}' is refused: {why}")


def check_pool_target(pool: PoolDef, conf: Confinement, state_root: str) -> None:
    """Refuse a file pool (its directory's files become volumes) on the state root or,
    when confined, on a system directory."""
    path = pool.target.path
    if not path or not backend_for(pool.type).caps.file_based:
        return
    root = os.path.realpath(state_root)
    images = os.path.join(root, "images")
    for p in _forms(path):
        if under(p, root) and not under(p, images):
            raise _refused(path, f"it is inside the state root '{state_root}'")
        if conf.system_dirs and (p == "/" or any(under(p, d) for d in SYSTEM_DIRS)):
            raise _refused(path, "it is a system directory")


def check_remote_target(pool: PoolDef, roots: Sequence[str]) -> None:
    """A remote caller's file pool must lie under one of ``roots``."""
    path = pool.target.path
    if not path or not backend_for(pool.type).caps.file_based:
        return
    # Where the files really are is what counts: the target and the roots resolved.
    real = os.path.realpath(os.path.normpath(path))
    if any(under(real, os.path.realpath(r)) for r in roots):
        return
    where = ", ".join(f"'{r}'" for r in roots) if roots else "none are configured"
    raise _refused(path, f"remote callers may define file pools only under the "
                         f"remote_pool_roots of virtstored ({where})")


def check_backing(path: str, conf: Confinement, is_volume: Callable[[str], bool],
                  *, of: str | None = None) -> None:
    """When confined, a backing file must be a volume of a defined pool (``is_volume``)
    or lie under a backing root; ``of`` names the image whose header names it."""
    if not conf.backing_in_pools:
        return
    if "://" not in path and os.path.isabs(path):
        clean = os.path.normpath(path)
        if is_volume(clean):
            return
        if any(under(os.path.realpath(clean), r) for r in conf.backing_roots):
            return
    elif is_volume(path):
        return
    whose = f" of '{of}'" if of else ""
    raise Forbidden(f"backing file '{path}'{whose} is refused: it is not a volume of a "
                    "defined pool, nor under the backing_roots of virtstored")
