"""Walk one volume through every operation of the backend contract: each feature the
volume advertises must work, each other one must fail with the "unsupported" error."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

from virtstore.api import Connection
from virtstore.backends.base import FEATURES
from virtstore.errors import Unsupported, VirtstoreError

MiB = 1 << 20


def attempts(conn: Connection, pool: str, vol: str,
              tmp: Path) -> dict[str, Callable[[], object]]:
    """One call per feature; each returns when the operation worked and raises when not
    (a job that fails raises its error)."""
    cap = conn.volume_info(pool, vol).capacity

    def job(info: object) -> None:
        done = conn.job_wait(info.id)  # type: ignore[attr-defined]
        if done.state != "done":
            raise (Unsupported if done.error_code == "unsupported" else VirtstoreError)(
                done.error or "")

    def export() -> None:
        with conn.volume_export_nbd(pool, vol, socket_path=str(tmp / f"{vol}.sock"),
                                    read_only=True):
            pass

    return {
        "snapshot": lambda: conn.volume_snapshot_create(pool, vol, "s1"),
        "snapshot-external": lambda: conn.volume_snapshot_create(pool, vol, "s2",
                                                                 external=True),
        "clone-full": lambda: job(conn.volume_clone(pool, vol, vol + "-full")),
        "clone-linked": lambda: job(conn.volume_clone(pool, vol, vol + "-linked",
                                                      linked=True)),
        "copy": lambda: job(conn.volume_create_from(
            pool, f"<volume><name>{vol}-copy</name><capacity>{cap}</capacity></volume>",
            pool, vol)),
        "resize-grow": lambda: job(conn.volume_resize(pool, vol, cap + 4 * MiB)),
        "resize-shrink": lambda: job(conn.volume_resize(pool, vol, cap, shrink=True)),
        "upload": lambda: job(conn.volume_upload(pool, vol, io.BytesIO(b"u" * 4096))),
        "download": lambda: job(conn.volume_download(pool, vol, io.BytesIO())),
        "wipe": lambda: job(conn.volume_wipe(pool, vol)),
        "export": export,
    }


def walk(conn: Connection, pool: str, vol: str, tmp: Path) -> dict[str, bool]:
    features = conn.volume_features(pool, vol)
    assert set(features) == set(FEATURES)
    seen = {}
    for feature, attempt in attempts(conn, pool, vol, tmp).items():
        # Asked afresh: a volume's features follow its state (a snapshot may change it).
        advertised = conn.volume_features(pool, vol)[feature]
        try:
            attempt()
        except Unsupported as exc:
            assert not advertised, f"{pool}/{vol}: {feature} advertised but: {exc}"
            seen[feature] = False
            continue
        assert advertised, f"{pool}/{vol}: {feature} works but is not advertised"
        seen[feature] = True
    return seen
