"""What each pool type's XML holds: libvirt's poolTypeInfo table, as data."""

from __future__ import annotations

from virtstore.errors import XMLError
from virtstore.types import record
from virtstore.xml.values import shown


class Src:
    """Source elements a pool type uses (required ones are checked by the parser): bits
    of an int (an enum.Flag would load enum, and re with it, for every pool XML)."""

    NONE = 0
    HOST = 1
    DEVICE = 2
    DIR = 4
    ADAPTER = 8
    NAME = 16
    INITIATOR_IQN = 32
    NETWORK = 64  # no local target: rbd, gluster, iscsi-direct


FS_FORMATS = ("auto", "ext2", "ext3", "ext4", "ufs", "iso9660", "udf", "gfs", "gfs2",
              "vfat", "hfs+", "xfs", "ocfs2", "vmfs")
NETFS_FORMATS = ("auto", "nfs", "glusterfs", "cifs")
DISK_FORMATS = ("unknown", "dos", "dvh", "gpt", "mac", "bsd", "pc98", "sun", "lvm2")
LOGICAL_FORMATS = ("unknown", "lvm2")

# virStorageFileFormat in enum order; "none" is listed but never accepted as input.
FILE_VOL_FORMATS = ("none", "raw", "dir", "bochs", "cloop", "dmg", "iso", "vpc", "vdi",
                    "fat", "vhd", "ploop", "cow", "qcow", "qcow2", "qed", "vmdk")
DISK_VOL_FORMATS = ("none", "linux", "fat16", "fat32", "linux-swap", "linux-lvm",
                    "linux-raid", "extended")

FS_NS = "http://libvirt.org/schemas/storagepool/fs/1.0"
RBD_NS = "http://libvirt.org/schemas/storagepool/rbd/1.0"
# Ours, in libvirt's pattern: a logical pool's thin pool (libvirt has no such option).
LVM_NS = "http://virtstore.org/schemas/storagepool/logical/1.0"


@record(frozen=True)
class PoolType:
    name: str
    flags: int  # Src bits
    pool_formats: tuple[str, ...] = ()
    default_pool_format: str | None = None
    vol_formats: tuple[str, ...] = ()
    # libvirt lists rbd's volume formats as empty yet parses any file format there.
    vol_formats_listed: bool = True
    default_vol_format: str | None = None
    default_vol_type: str = "file"
    namespace: tuple[str, str] | None = None  # (prefix, href) of the backend options
    device_optional: bool = False

    @property
    def has_target(self) -> bool:
        return not self.flags & Src.NETWORK

    def accepts_vol_format(self, fmt: str) -> bool:
        if self.vol_formats is FILE_VOL_FORMATS and fmt == "none":
            return False
        return fmt in self.vol_formats


POOL_TYPES: dict[str, PoolType] = {t.name: t for t in (
    PoolType("dir", Src.NONE, vol_formats=FILE_VOL_FORMATS, default_vol_format="raw"),
    PoolType("fs", Src.DEVICE, FS_FORMATS, "auto", FILE_VOL_FORMATS,
             default_vol_format="raw", namespace=("fs", FS_NS)),
    PoolType("netfs", Src.HOST | Src.DIR, NETFS_FORMATS, "auto", FILE_VOL_FORMATS,
             default_vol_format="raw", namespace=("fs", FS_NS)),
    PoolType("logical", Src.NAME | Src.DEVICE, LOGICAL_FORMATS, "lvm2",
             default_vol_type="block", namespace=("lvm", LVM_NS)),
    PoolType("disk", Src.DEVICE, DISK_FORMATS, "unknown", DISK_VOL_FORMATS,
             default_vol_format="none", default_vol_type="block"),
    PoolType("iscsi", Src.HOST | Src.DEVICE | Src.INITIATOR_IQN, default_vol_type="block"),
    PoolType("iscsi-direct", Src.HOST | Src.DEVICE | Src.NETWORK | Src.INITIATOR_IQN,
             default_vol_type="network"),
    PoolType("scsi", Src.ADAPTER, default_vol_type="block"),
    PoolType("mpath", Src.NONE, default_vol_type="block"),
    PoolType("rbd", Src.HOST | Src.NETWORK | Src.NAME, vol_formats=FILE_VOL_FORMATS,
             vol_formats_listed=False, default_vol_format="raw",
             default_vol_type="network", namespace=("rbd", RBD_NS)),
    PoolType("gluster", Src.HOST | Src.NETWORK | Src.NAME | Src.DIR,
             vol_formats=FILE_VOL_FORMATS, default_vol_format="raw",
             default_vol_type="network"),
    PoolType("zfs", Src.NAME | Src.DEVICE, default_vol_type="block"),
    PoolType("vstorage", Src.NAME, vol_formats=FILE_VOL_FORMATS, default_vol_format="raw"),
    # Ours, not libvirt's: files on btrfs, with an optional source device to mount.
    PoolType("btrfs", Src.DEVICE, vol_formats=FILE_VOL_FORMATS, default_vol_format="raw",
             device_optional=True),
)}

VOL_TYPES = ("file", "block", "dir", "network", "netdir", "ploop")

REMOVED_POOL_TYPES = {"sheepdog": "removed in libvirt 8.8"}


def pool_type_info(name: str | None) -> PoolType:
    """The table entry of a pool type, or libvirt's error for an unknown one."""
    if name is None:
        raise XMLError("Missing required attribute 'type' in element 'pool'")
    ptype = POOL_TYPES.get(name)
    if ptype is None:
        if name in REMOVED_POOL_TYPES:
            raise XMLError(f"unknown storage pool type '{name}' "
                           f"(support was {REMOVED_POOL_TYPES[name]})")
        raise XMLError(f"unknown storage pool type '{shown(name)}'")
    return ptype
