"""The pool types, their volume formats and operations, as backends/ defines them: the
one list that docs/pool-types.md is made from (``python -m virtstore.backends.table``)
and that the XML layer's table is checked against (tests/test_backend_contract.py)."""

from __future__ import annotations

from typing import Any

from virtstore.backends import POOL_TYPES, backend_for
from virtstore.backends.base import FEATURES

POOL_OPS = (("build", "build"), ("delete", "delete"), ("create", "create_volume"),
            ("delete volumes", "delete_volume"))


def capabilities_xml() -> str:
    """libvirt's storage pool capabilities document, ``supported`` as this host can."""
    from virtstore.xml import default_pool_type_caps, pool_capabilities_xml

    entries = []
    for caps in default_pool_type_caps():
        if caps.type in POOL_TYPES:
            caps.supported = backend_for(caps.type).host_problem() is None
        entries.append(caps)
    return pool_capabilities_xml(entries)


def type_features() -> list[dict[str, Any]]:
    """Per pool type: whether this host runs it (and why not), and what it can do."""
    from virtstore.xml import POOL_TYPES as XML_POOL_TYPES

    out = []
    for ptype in XML_POOL_TYPES:
        backend = backend_for(ptype)
        caps = backend.caps
        problem = backend.host_problem()
        has = backend.features()
        out.append({
            "type": ptype, "supported": problem is None, "reason": problem,
            "shared": caps.shared, "file_based": caps.file_based,
            "build": backend.supports("build"), "delete": backend.supports("delete"),
            "volume_create": backend.supports("create_volume"),
            "volume_delete": backend.supports("delete_volume"),
            "volume_formats": list(caps.vol_formats),
            "resize": has["resize-grow"], "clone": has["clone-full"],
            "create_from": has["copy"], "wipe": has["wipe"], "upload": has["upload"],
            "download": has["download"], "features": has,
            "snapshots": {fmt: list(kinds) for fmt, kinds in
                          backend.snapshot_kinds.items()} if has["snapshot"] else {},
        })
    return out


def markdown() -> str:
    """A table per pool type: formats, volume type, what it can do (host-independent)."""
    lines = [
        "# Pool types",
        "",
        "Generated from the backends (`python -m virtstore.backends.table >"
        " docs/pool-types.md`);",
        "a test checks that this file is current. What a type can do is what its backend",
        "implements (docs/architecture.md); whether this host can run it is",
        "`virtstore pool-capabilities --features`.",
        "",
        "| type | volume type | volume formats | pool and volume operations | "
        "volume features | snapshots |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for ptype in POOL_TYPES:
        be = backend_for(ptype)
        has = be.features()
        ops = [label for label, op in POOL_OPS if be.supports(op)]
        feats = [f for f in FEATURES if has[f]]
        snaps = "; ".join(f"{fmt}: {', '.join(kinds)}"
                          for fmt, kinds in be.snapshot_kinds.items()) if has["snapshot"] else ""
        lines.append(f"| {ptype} | {be.caps.volume_type} | "
                     f"{', '.join(be.caps.vol_formats) or '-'} | {', '.join(ops) or '-'} | "
                     f"{', '.join(feats) or '-'} | {snaps or '-'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
