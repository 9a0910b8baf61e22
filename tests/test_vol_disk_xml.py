"""volume_disk_xml and vol-disk-xml: a guest's <disk> element for a volume, embedded and
through virtstored, valid for libvirt's domain schema."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from lxml import etree

from conftest import dir_pool_xml
from server_fixtures import Setup, setup_fixture  # noqa: F401
from virtstore.api import VolumeCreateArgs, VolumeInfo
from virtstore.cli.main import main
from virtstore.errors import InvalidArgument, NoSuchVolume
from virtstore.xml.disk import disk_xml, driver_type

SCHEMA = Path("/usr/share/libvirt/schemas/domain.rng")
MiB = 1024 * 1024
requires_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None,
                                       reason="qemu-img (Debian qemu-utils) is not installed")


@pytest.fixture(scope="module")
def rng() -> etree.RelaxNG:
    return etree.RelaxNG(etree.parse(str(SCHEMA)))


def in_domain(disk: str) -> etree._Element:
    dom = etree.fromstring("<domain type='qemu'><name>t</name><memory>65536</memory><os>"
                           "<type arch='x86_64' machine='pc'>hvm</type></os><devices/>"
                           "</domain>")
    dom.find("devices").append(etree.fromstring(disk))  # type: ignore[union-attr]
    return dom


def check_valid(rng: etree.RelaxNG, disk: str) -> etree._Element:
    dom = in_domain(disk)
    assert rng.validate(dom), (disk, rng.error_log)
    found = dom.find("devices/disk")
    assert found is not None
    return found


def vol_xml(name: str, fmt: str, extra: str = "") -> str:
    return (f"<volume><name>{name}</name><capacity unit='M'>16</capacity><target>"
            f"<format type='{fmt}'/>{extra}</target></volume>")


@pytest.fixture(name="pool")
def pool_fixture(setup: Setup) -> str:
    setup.conn.pool_define_xml(dir_pool_xml("p", setup.tmp / "pool"))
    setup.conn.pool_start("p", build=True)
    return "p"


@requires_qemu_img
def test_file_volumes_and_a_linked_clone(setup: Setup, pool: str, rng: etree.RelaxNG) -> None:
    conn = setup.conn
    conn.volume_create(pool, VolumeCreateArgs("base.img", MiB, format="raw"))
    job = conn.volume_clone(pool, "base.img", "clone.qcow2", linked=True)
    assert conn.job_wait(job.id, 60).state == "done"
    base, clone = conn.volume_info(pool, "base.img"), conn.volume_info(pool, "clone.qcow2")

    disk = check_valid(rng, conn.volume_disk_xml(pool, "clone.qcow2"))
    assert (disk.get("type"), disk.get("device")) == ("file", "disk")
    assert [c.tag for c in disk] == ["driver", "source", "target"]
    assert disk.find("driver").attrib == {"name": "qemu", "type": "qcow2"}  # type: ignore[union-attr]
    assert disk.find("source").attrib == {"file": clone.path}  # type: ignore[union-attr]
    assert disk.find("target").attrib == {"dev": "vda", "bus": "virtio"}  # type: ignore[union-attr]

    disk = check_valid(rng, conn.volume_disk_xml(pool, "base.img", target_dev="sdb",
                                                 bus="scsi"))
    assert disk.find("driver").get("type") == "raw"  # type: ignore[union-attr]
    assert disk.find("source").attrib == {"file": base.path}  # type: ignore[union-attr]
    assert disk.find("target").attrib == {"dev": "sdb", "bus": "scsi"}  # type: ignore[union-attr]

    disk = check_valid(rng, conn.volume_disk_xml(pool, "clone.qcow2", source="volume"))
    assert disk.get("type") == "volume"
    assert disk.find("source").attrib == {"pool": pool, "volume": "clone.qcow2"}  # type: ignore[union-attr]
    assert disk.find("driver").get("type") == "qcow2"  # type: ignore[union-attr]


@requires_qemu_img
def test_luks_volume_names_its_secret(setup: Setup, pool: str, rng: etree.RelaxNG) -> None:
    conn = setup.conn
    path = setup.tmp / "pool" / "enc.img"
    uuid = conn.secret_define_xml(f"<secret><usage type='volume'><volume>{path}</volume>"
                                  "</usage></secret>")
    conn.secret_set_value(uuid, b"correct horse")
    conn.volume_create_xml(pool, vol_xml("enc.img", "raw", "<encryption format='luks'><secret "
                                         f"type='passphrase' uuid='{uuid}'/></encryption>"))
    disk = check_valid(rng, conn.volume_disk_xml(pool, "enc.img"))
    # qemu opens a LUKS image through the raw driver, the encryption named in <source>.
    assert disk.find("driver").get("type") == "raw"  # type: ignore[union-attr]
    enc = disk.find("source/encryption")
    assert enc is not None and enc.get("format") == "luks"
    assert enc.find("secret").attrib == {"type": "passphrase", "uuid": uuid}  # type: ignore[union-attr]
    # Without its secret it still says it is encrypted.
    conn.secret_undefine(uuid)
    disk = check_valid(rng, conn.volume_disk_xml(pool, "enc.img"))
    enc = disk.find("source/encryption")
    assert enc is not None and enc.get("format") == "luks" and len(enc.attrib) == 1
    assert len(enc) == 0


def test_encryption_from_the_volume_xml(rng: etree.RelaxNG) -> None:
    """An encrypted qcow2 whose volume XML names its secret; a secret looked up by path
    only when the XML names none."""
    uuid = "0a81f5b2-8403-7b23-c8d6-21ccc2f80d6f"
    info = _info("file", "qcow2", "/var/lib/enc.qcow2")
    named = vol_xml("v", "qcow2", "<encryption format='luks'><secret type='passphrase' "
                    f"uuid='{uuid}'/></encryption>")
    calls: list[str] = []

    def lookup(path: str) -> str | None:
        calls.append(path)
        return "ffffffff-8403-7b23-c8d6-21ccc2f80d6f"

    disk = check_valid(rng, disk_xml(info, named, secret_for=lookup))
    assert disk.find("driver").get("type") == "qcow2"  # type: ignore[union-attr]
    assert disk.find("source/encryption/secret").get("uuid") == uuid  # type: ignore[union-attr]
    assert calls == []
    bare = vol_xml("v", "qcow2", "<encryption format='luks'/>")
    disk = check_valid(rng, disk_xml(info, bare, secret_for=lookup))
    assert disk.find("source/encryption/secret").get("uuid").startswith("ffffffff")  # type: ignore[union-attr]
    assert calls == ["/var/lib/enc.qcow2"]
    # Not encrypted, or "default" (nothing a guest can use): no <encryption>.
    for xml in (vol_xml("v", "qcow2"), vol_xml("v", "qcow2", "<encryption/>")):
        disk = check_valid(rng, disk_xml(info, xml, secret_for=lookup))
        assert disk.find("source/encryption") is None


def test_bad_arguments(setup: Setup, pool: str) -> None:
    conn = setup.conn
    conn.volume_create(pool, VolumeCreateArgs("a.img", MiB, format="raw"))
    with pytest.raises(InvalidArgument, match="unknown disk bus 'pci'"):
        conn.volume_disk_xml(pool, "a.img", bus="pci")
    with pytest.raises(InvalidArgument, match="invalid target device name"):
        conn.volume_disk_xml(pool, "a.img", target_dev="vda'/><x")
    with pytest.raises(InvalidArgument, match="unknown disk source 'url'"):
        conn.volume_disk_xml(pool, "a.img", source="url")
    with pytest.raises(NoSuchVolume):
        conn.volume_disk_xml(pool, "nope.img")


def _info(vol_type: str, fmt: str | None, path: str = "/dev/vg/lv") -> VolumeInfo:
    return VolumeInfo(pool="p", name="v", key=path, path=path, type=vol_type, format=fmt,
                      capacity=MiB, allocation=MiB, physical=MiB)


@pytest.mark.parametrize(("vol_type", "fmt", "disk_type", "attr", "driver"), [
    ("block", None, "block", "dev", "raw"),       # logical, zfs
    ("block", "none", "block", "dev", "raw"),     # a disk pool's partition
    ("block", "linux", "block", "dev", "raw"),
    ("block", "qcow2", "block", "dev", "qcow2"),  # qcow2 on an LV
    ("file", "iso", "file", "file", "raw"),
    ("file", "vhd", "file", "file", "vpc"),
    ("file", "vmdk", "file", "file", "vmdk"),
    ("dir", "dir", "dir", "dir", "fat"),
    ("network", "raw", "volume", "volume", "raw"),  # no local path: by pool and name
])
def test_types_and_formats(rng: etree.RelaxNG, vol_type: str, fmt: str | None,
                           disk_type: str, attr: str, driver: str) -> None:
    info = _info(vol_type, fmt)
    disk = check_valid(rng, disk_xml(info, vol_xml("v", fmt or "raw")))
    assert disk.get("type") == disk_type
    assert attr in disk.find("source").attrib  # type: ignore[union-attr]
    assert disk.find("driver").get("type") == driver  # type: ignore[union-attr]
    assert driver_type(fmt, vol_type) == driver


def test_hostile_volume_xml_is_refused() -> None:
    """The volume XML may come from a remote server: parsed as any outside document."""
    hostile = ("<!DOCTYPE v [<!ENTITY x SYSTEM 'file:///etc/shadow'>]>"
               "<volume><target><encryption format='luks'><secret uuid='&x;'/></encryption>"
               "</target></volume>")
    with pytest.raises(InvalidArgument):
        disk_xml(_info("file", "raw", "/var/lib/a.img"), hostile)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], rng: etree.RelaxNG) -> None:
    root = str(tmp_path / "state")

    def run(*args: str) -> tuple[int, str, str]:
        rc = main(["--root", root, *args])
        out = capsys.readouterr()
        return rc, out.out, out.err

    assert run("pool-create-as", "p", "dir", "--target", str(tmp_path / "pool"),
               "--build")[0] == 0
    assert run("vol-create-as", "p", "a.qcow2", "1M", "--format", "qcow2")[0] == 0
    rc, out, err = run("vol-disk-xml", "a.qcow2", "--pool", "p")
    assert (rc, err) == (0, "")
    assert out.endswith("</disk>\n\n")  # virsh's empty line after the output
    disk = check_valid(rng, out)
    assert disk.find("source").get("file") == str(tmp_path / "pool" / "a.qcow2")  # type: ignore[union-attr]
    # By path, with the target, bus and source options; -q drops the empty line.
    rc, out, err = run("-q", "vol-disk-xml", str(tmp_path / "pool" / "a.qcow2"), "--target",
                       "sdc", "--bus", "sata", "--source", "volume")
    assert (rc, err) == (0, "") and out.endswith("</disk>\n")
    disk = check_valid(rng, out)
    assert disk.find("target").attrib == {"dev": "sdc", "bus": "sata"}  # type: ignore[union-attr]
    assert disk.find("source").attrib == {"pool": "p", "volume": "a.qcow2"}  # type: ignore[union-attr]
    rc, out, err = run("vol-disk-xml", "a.qcow2", "p", "--bus", "pci")
    assert rc == 1 and err.startswith("error: unknown disk bus 'pci'")
    rc, out, _ = run("help", "vol-disk-xml")
    assert rc == 0 and "--target" in out and "--bus" in out
