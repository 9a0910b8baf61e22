"""The pool types, their volume formats and operations, as backends/ defines them: the
one list that docs/pool-types.md is made from (``python -m virtstore.backends.table``)
and that the XML layer's table is checked against (tests/test_backend_contract.py)."""

from __future__ import annotations

from virtstore.backends import POOL_TYPES, backend_for
from virtstore.backends.base import FEATURES

POOL_OPS = (("build", "build"), ("delete", "delete"), ("create", "create_volume"),
            ("delete volumes", "delete_volume"))


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
