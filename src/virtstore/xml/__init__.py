"""libvirt 9.0 storage XML: pools, volumes, secrets, pool sources and capabilities.

Parsing is hardened (see ``safe``) and follows libvirt's parser, defaults and error
messages; formatting prints libvirt's exact layout. Both are pure functions.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from virtstore.xml.caps import PoolTypeCaps, default_pool_type_caps, pool_capabilities_xml
    from virtstore.xml.model import (
        Adapter,
        Auth,
        AuthSecret,
        BackingStore,
        Encryption,
        EncryptionSecret,
        Extent,
        FreeExtent,
        Permissions,
        PoolDef,
        PoolSource,
        PoolTarget,
        SecretDef,
        SourceDevice,
        SourceHost,
        Timestamps,
        VolDef,
        VolSource,
        VolTarget,
    )
    from virtstore.xml.pool import (
        format_pool_sources_xml,
        format_pool_xml,
        parse_pool_source_xml,
        parse_pool_sources,
        parse_pool_xml,
    )
    from virtstore.xml.pooltypes import POOL_TYPES, PoolType, pool_type_info
    from virtstore.xml.schema import validate
    from virtstore.xml.secret import format_secret_xml, parse_secret_xml
    from virtstore.xml.units import format_size_human, parse_size
    from virtstore.xml.volformat import format_volume_xml
    from virtstore.xml.volume import default_vol_type, parse_volume_xml

# Each name is imported from its module on first use (PEP 562), so that a command
# needing only ``units`` or the records does not load lxml and every parser.
_WHERE = {
    "PoolTypeCaps": "virtstore.xml.caps",
    "default_pool_type_caps": "virtstore.xml.caps",
    "pool_capabilities_xml": "virtstore.xml.caps",
    "Adapter": "virtstore.xml.model",
    "Auth": "virtstore.xml.model",
    "AuthSecret": "virtstore.xml.model",
    "BackingStore": "virtstore.xml.model",
    "Encryption": "virtstore.xml.model",
    "EncryptionSecret": "virtstore.xml.model",
    "Extent": "virtstore.xml.model",
    "FreeExtent": "virtstore.xml.model",
    "Permissions": "virtstore.xml.model",
    "PoolDef": "virtstore.xml.model",
    "PoolSource": "virtstore.xml.model",
    "PoolTarget": "virtstore.xml.model",
    "SecretDef": "virtstore.xml.model",
    "SourceDevice": "virtstore.xml.model",
    "SourceHost": "virtstore.xml.model",
    "Timestamps": "virtstore.xml.model",
    "VolDef": "virtstore.xml.model",
    "VolSource": "virtstore.xml.model",
    "VolTarget": "virtstore.xml.model",
    "format_pool_sources_xml": "virtstore.xml.pool",
    "format_pool_xml": "virtstore.xml.pool",
    "parse_pool_source_xml": "virtstore.xml.pool",
    "parse_pool_sources": "virtstore.xml.pool",
    "parse_pool_xml": "virtstore.xml.pool",
    "pool_type_info": "virtstore.xml.pooltypes",
    "POOL_TYPES": "virtstore.xml.pooltypes",
    "PoolType": "virtstore.xml.pooltypes",
    "validate": "virtstore.xml.schema",
    "format_secret_xml": "virtstore.xml.secret",
    "parse_secret_xml": "virtstore.xml.secret",
    "format_size_human": "virtstore.xml.units",
    "parse_size": "virtstore.xml.units",
    "default_vol_type": "virtstore.xml.volume",
    "format_volume_xml": "virtstore.xml.volformat",
    "parse_volume_xml": "virtstore.xml.volume",
}


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'virtstore.xml' has no attribute '{name}'")
    import importlib

    value = getattr(importlib.import_module(where), name)
    globals()[name] = value
    return value


__all__ = [
    "POOL_TYPES",
    "Adapter",
    "Auth",
    "AuthSecret",
    "BackingStore",
    "Encryption",
    "EncryptionSecret",
    "Extent",
    "FreeExtent",
    "Permissions",
    "PoolDef",
    "PoolSource",
    "PoolTarget",
    "PoolType",
    "PoolTypeCaps",
    "SecretDef",
    "SourceDevice",
    "SourceHost",
    "Timestamps",
    "VolDef",
    "VolSource",
    "VolTarget",
    "default_pool_type_caps",
    "default_vol_type",
    "format_pool_sources_xml",
    "format_pool_xml",
    "format_secret_xml",
    "format_size_human",
    "format_volume_xml",
    "parse_pool_source_xml",
    "parse_pool_sources",
    "parse_pool_xml",
    "parse_secret_xml",
    "parse_size",
    "parse_volume_xml",
    "pool_capabilities_xml",
    "pool_type_info",
    "validate",
]
