"""Moving and destroying bytes: sparse-aware copies, conversion, wiping, streaming.

Every function takes a ``Monitor`` (progress, bandwidth limit, cancellation) and
raises NoSpace on ENOSPC/EDQUOT and Cancelled when asked to stop. None renames or
removes the caller's files: the caller writes to a staging name and publishes it.
See docs/data.md.

The submodules are imported on first use, so importing this package stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from virtstore.data.convert import convert
    from virtstore.data.copy import copy_file, copy_sparse, reflink
    from virtstore.data.extents import data_extents, is_zero, punch_hole, zero_out
    from virtstore.data.monitor import Monitor
    from virtstore.data.stream import decode_sparse, download, encode_sparse, upload
    from virtstore.data.wipe import ALGORITHMS, wipe

_WHERE = {
    "Monitor": "monitor",
    "data_extents": "extents", "is_zero": "extents", "punch_hole": "extents",
    "zero_out": "extents",
    "copy_file": "copy", "copy_sparse": "copy", "reflink": "copy",
    "ALGORITHMS": "wipe", "wipe": "wipe",
    "convert": "convert",
    "upload": "stream", "download": "stream", "encode_sparse": "stream",
    "decode_sparse": "stream",
}

__all__ = [
    "ALGORITHMS",
    "Monitor",
    "convert",
    "copy_file",
    "copy_sparse",
    "data_extents",
    "decode_sparse",
    "download",
    "encode_sparse",
    "is_zero",
    "punch_hole",
    "reflink",
    "upload",
    "wipe",
    "zero_out",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'virtstore.data' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"virtstore.data.{module}"), name)
    globals()[name] = value
    return value
