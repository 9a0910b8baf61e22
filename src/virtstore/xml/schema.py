"""RelaxNG validation against libvirt's own schemas (shipped in ``schemas/``)."""

from __future__ import annotations

import threading
from functools import cache
from importlib.resources import as_file, files

from lxml import etree

from virtstore.errors import XMLError
from virtstore.xml.safe import parse_document

# kind -> (schema file, root element, libvirt's document label)
KINDS: dict[str, tuple[str | None, str, str]] = {
    "pool": ("storagepool.rng", "pool", "(storage_pool_definition)"),
    "volume": ("storagevol.rng", "volume", "(storage_volume_definition)"),
    "poolcaps": ("storagepoolcaps.rng", "storagepoolCapabilities",
                 "(storagepool_capabilities)"),
    "secret": (None, "secret", "(definition_of_secret)"),  # libvirt 9.0 ships none here
}

# lxml validators keep their error log on the object: one validation at a time.
_LOCK = threading.Lock()


@cache
def _schema(filename: str) -> etree.RelaxNG:
    resource = files("virtstore.xml").joinpath("schemas", filename)
    with as_file(resource) as path:
        # The schemas are our own trusted files; includes resolve next to them.
        return etree.RelaxNG(etree.parse(str(path)))


def validate(doc_text: str | bytes, kind: str) -> None:
    """Raise XMLError with the first schema error when ``doc_text`` is not a valid
    ``kind`` document (pool, volume, poolcaps; secret is only checked for shape)."""
    if kind not in KINDS:
        raise ValueError(f"unknown document kind {kind!r}")
    filename, root_name, label = KINDS[kind]
    root = parse_document(doc_text, root_name, label)
    if filename is None:
        return
    schema = _schema(filename)
    with _LOCK:
        if schema.validate(root.getroottree()):
            return
        errors = list(schema.error_log)
    first = errors[0] if errors else None
    detail = f"line {first.line}: {first.message}" if first else "document is not valid"
    raise XMLError(f"XML document failed to validate against schema: {detail}")
