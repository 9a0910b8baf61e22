"""virtstore: storage pools and volumes for virtualization hosts, libvirt-compatible.

``connect`` picks the transport: the embedded engine (``virtstore.api.embedded``) or a
client of virtstored (``virtstore.client``). It lives here, above both, so that neither
layer imports the other.

The public types (``Connection``, ``Pool``, ``Volume``, ``Secret``, ``Job``, the info
records and the errors) are importable from here; they load on first use, so that
``import virtstore`` (and ``virtstore --help``) stays cheap.
"""

from __future__ import annotations

import os

__version__ = "0.1.0"

TYPE_CHECKING = False
if TYPE_CHECKING:
    from virtstore.api import (
        Connection,
        Event,
        Job,
        JobInfo,
        NbdExport,
        Pool,
        PoolFilter,
        PoolInfo,
        Secret,
        SecretInfo,
        SnapshotInfo,
        Volume,
        VolumeCreateArgs,
        VolumeInfo,
    )
    from virtstore.errors import VirtstoreError

__all__ = [
    "Connection",
    "Event",
    "Job",
    "JobInfo",
    "NbdExport",
    "Pool",
    "PoolFilter",
    "PoolInfo",
    "Secret",
    "SecretInfo",
    "SnapshotInfo",
    "VirtstoreError",
    "Volume",
    "VolumeCreateArgs",
    "VolumeInfo",
    "connect",
    "open_connection",
]
_API_NAMES = frozenset(__all__) - {"VirtstoreError", "connect", "open_connection"}


def __getattr__(name: str) -> object:
    if name in _API_NAMES:
        import virtstore.api

        return getattr(virtstore.api, name)
    if name == "VirtstoreError":
        from virtstore.errors import VirtstoreError

        return VirtstoreError
    raise AttributeError(f"module 'virtstore' has no attribute '{name}'")


def connect(uri: str | None = None, *, root: str | None = None, token: str | None = None,
            ca: str | None = None) -> Connection:
    """Open a connection: no URI (or ``embedded://``) gives the in-process engine;
    ``unix:///path/to/socket`` or ``https://host:port`` (with ``token`` and ``ca``) a
    client of virtstored."""
    return open_connection(uri, root=root, token=token, ca=ca)


def open_connection(uri: str | None = None, *, root: str | None = None,
                    token: str | None = None, ca: str | None = None) -> Connection:
    """No URI (or ``embedded://``): the engine in this process. ``unix:///path`` or
    ``https://host:port``: virtstored, with a bearer ``token`` (default
    ``VIRTSTORE_TOKEN``) and a CA file to check its certificate (default
    ``VIRTSTORE_CA``); ``VIRTSTORE_CLIENT_CERT``/``VIRTSTORE_CLIENT_KEY`` name a client
    certificate for a server that asks for one."""
    uri = uri or os.environ.get("VIRTSTORE_DEFAULT_URI") or None
    if uri in (None, "", "embedded://", "embedded:///"):
        from virtstore.api.embedded import EmbeddedConnection
        from virtstore.types import default_root

        cluster = None
        if os.environ.get("VIRTSTORE_CLUSTER", "").strip():
            # Only then: the etcd client (ssl, http) is heavy for a one-row command.
            from virtstore.engine.cluster import ClusterConfig

            cluster = ClusterConfig.from_env()
        return EmbeddedConnection(root or default_root(), cluster=cluster,
                                  connect=open_connection)
    assert uri is not None
    if uri.startswith(("unix:", "https:")):
        from virtstore.client import RemoteConnection

        env = os.environ.get
        return RemoteConnection(uri, token=token or env("VIRTSTORE_TOKEN") or None,
                                ca=ca or env("VIRTSTORE_CA") or None,
                                cert=env("VIRTSTORE_CLIENT_CERT") or None,
                                key=env("VIRTSTORE_CLIENT_KEY") or None)
    from virtstore.errors import InvalidArgument

    raise InvalidArgument(f"unsupported connection URI '{uri}': use no URI (the embedded "
                          "engine), unix:///PATH/TO/SOCKET or https://HOST:PORT")
