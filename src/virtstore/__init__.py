"""virtstore: storage pools and volumes for virtualization hosts, libvirt-compatible."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from virtstore.api import Connection


def connect(uri: str | None = None, *, root: str | None = None, token: str | None = None,
            ca: str | None = None) -> Connection:
    """Open a connection: no URI (or ``embedded://``) gives the in-process engine;
    ``unix:///path/to/socket`` or ``https://host:port`` (with ``token`` and ``ca``) a
    client of virtstored."""
    from virtstore.api import open_connection

    return open_connection(uri, root=root, token=token, ca=ca)
