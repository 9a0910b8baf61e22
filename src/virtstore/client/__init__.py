"""The remote client: the Connection interface over virtstored's REST API."""

from __future__ import annotations

from virtstore.client.connection import RemoteConnection

__all__ = ["RemoteConnection"]
