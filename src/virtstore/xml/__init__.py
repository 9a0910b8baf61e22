"""libvirt 9.0 storage XML: pools, volumes, secrets, pool sources and capabilities.

Parsing is hardened (see ``safe``) and follows libvirt's parser, defaults and error
messages; formatting prints libvirt's exact layout. Both are pure functions.
"""

from __future__ import annotations

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
    pool_type_info,
)
from virtstore.xml.pooltypes import POOL_TYPES, PoolType
from virtstore.xml.schema import validate
from virtstore.xml.secret import format_secret_xml, parse_secret_xml
from virtstore.xml.units import format_size_human, parse_size
from virtstore.xml.volume import default_vol_type, format_volume_xml, parse_volume_xml

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
