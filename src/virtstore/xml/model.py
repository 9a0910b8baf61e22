"""Plain dataclasses for libvirt's storage pool, volume and secret definitions.

Parsing fills these in (with libvirt's defaults applied); formatting prints them back.
Sizes are in bytes. ``None`` means "not given" wherever libvirt distinguishes that.
"""

from __future__ import annotations

from virtstore.types import field, record


@record
class Permissions:
    mode: int | None = None
    owner: int | None = None
    group: int | None = None
    label: str | None = None


@record
class Timestamps:
    """libvirt's "sec.nsec" strings, as the engine reads them from stat()."""

    atime: str | None = None
    mtime: str | None = None
    ctime: str | None = None
    btime: str | None = None


@record
class SourceHost:
    name: str
    port: int | None = None


@record
class FreeExtent:
    start: int
    end: int


@record
class SourceDevice:
    path: str
    part_separator: bool | None = None
    free_extents: list[FreeExtent] = field(default_factory=list)


@record
class Adapter:
    type: str | None = None
    name: str | None = None
    parent: str | None = None
    managed: bool | None = None
    wwnn: str | None = None
    wwpn: str | None = None
    parent_wwnn: str | None = None
    parent_wwpn: str | None = None
    parent_fabric_wwn: str | None = None
    parent_addr_unique_id: int | None = None
    parent_addr: tuple[int, int, int, int] | None = None  # (domain, bus, slot, function)


@record
class AuthSecret:
    uuid: str | None = None
    usage: str | None = None
    type: str | None = None  # the optional <secret type=...> libvirt keeps verbatim


@record
class Auth:
    type: str
    username: str
    secret: AuthSecret


@record
class PoolSource:
    hosts: list[SourceHost] = field(default_factory=list)
    devices: list[SourceDevice] = field(default_factory=list)
    dir: str | None = None
    adapter: Adapter | None = None
    name: str | None = None
    format: str | None = None
    protocol_ver: str | None = None
    initiator_iqn: str | None = None
    auth: Auth | None = None
    vendor: str | None = None
    product: str | None = None


@record
class PoolTarget:
    path: str | None = None
    permissions: Permissions = field(default_factory=Permissions)


@record
class PoolDef:
    type: str
    name: str
    uuid: str | None = None
    capacity: int = 0
    allocation: int = 0
    available: int = 0
    source: PoolSource = field(default_factory=PoolSource)
    target: PoolTarget = field(default_factory=PoolTarget)
    cow: bool | None = None
    mount_opts: list[str] = field(default_factory=list)
    rbd_config_opts: list[tuple[str, str]] = field(default_factory=list)
    # logical: <lvm:thin_pool name= size=/> (ours): new volumes are thin LVs in it
    thin_pool: str | None = None
    thin_pool_size: int | None = None  # bytes at build; None: the VG's free space
    refresh_volume_allocation: str | None = None  # <refresh><volume allocation=.../>


@record
class EncryptionSecret:
    type: str
    uuid: str | None = None
    usage: str | None = None


@record
class Encryption:
    format: str
    secrets: list[EncryptionSecret] = field(default_factory=list)
    cipher: dict[str, str] | None = None  # name, size, and optionally mode, hash
    ivgen: dict[str, str] | None = None  # name, and optionally hash
    engine: str | None = None


@record
class VolTarget:
    path: str | None = None
    format: str | None = None
    permissions: Permissions = field(default_factory=Permissions)
    timestamps: Timestamps | None = None
    compat: str | None = None
    cluster_size: int | None = None
    lazy_refcounts: bool = False
    nocow: bool = False
    encryption: Encryption | None = None
    extended_l2: bool = False
    has_features: bool = False  # a <features> element was given, even an empty one


@record
class BackingStore:
    path: str
    format: str | None = None
    permissions: Permissions = field(default_factory=Permissions)
    timestamps: Timestamps | None = None


@record
class Extent:
    start: int
    end: int


@record
class VolSource:
    device_path: str | None = None
    extents: list[Extent] = field(default_factory=list)


@record
class VolDef:
    name: str
    type: str | None = None
    key: str | None = None
    capacity: int | None = None
    allocation: int | None = None
    physical: int | None = None
    target: VolTarget = field(default_factory=VolTarget)
    backing_store: BackingStore | None = None
    source: VolSource | None = None
    capacity_given: bool = True
    allocation_given: bool = False


@record
class SecretDef:
    uuid: str | None = None
    ephemeral: bool = False
    private: bool = False
    description: str | None = None
    usage_type: str | None = None
    usage_id: str | None = None
