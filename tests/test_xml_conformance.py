"""libvirt 9.0's own storage XML test cases, driven by the corpus's cases.tsv."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from lxml import etree

from virtstore.errors import XMLError
from virtstore.xml import (
    PoolSource,
    SourceDevice,
    SourceHost,
    default_pool_type_caps,
    format_pool_sources_xml,
    format_pool_xml,
    format_volume_xml,
    parse_pool_source_xml,
    parse_pool_sources,
    parse_pool_xml,
    parse_volume_xml,
    pool_capabilities_xml,
    validate,
)

CORPUS = Path(os.environ.get(
    "VIRTSTORE_CONFORMANCE",
    Path(__file__).resolve().parent.parent.parent / "shared" / "conformance" / "libvirt"))

pytestmark = pytest.mark.skipif(not (CORPUS / "cases.tsv").is_file(),
                                reason=f"libvirt conformance corpus not found at {CORPUS}")


@dataclass(frozen=True)
class Case:
    suite: str
    pool: str
    volume: str
    input_volume: str
    expected: str
    flags: str
    outcome: str

    @property
    def id(self) -> str:
        return self.pool if self.volume == "-" else f"{self.pool}+{self.volume}"


def _cases(suite: str) -> list[Case]:
    path = CORPUS / "cases.tsv"
    if not path.is_file():
        return []
    cases = []
    for line in path.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        f = line.split("\t")
        if f[0] == suite:
            cases.append(Case(f[0], f[1], f[2], f[4], f[5], f[6], f[7]))
    return cases


def canonical(text: str | bytes) -> bytes:
    """C14N of a document after dropping whitespace-only text between elements."""
    data = text.encode() if isinstance(text, str) else text
    root = etree.fromstring(data, etree.XMLParser(remove_blank_text=True))
    for node in root.iter():
        if node.text is not None and not node.text.strip():
            node.text = None
        if node.tail is not None and not node.tail.strip():
            node.tail = None
    return etree.tostring(root, method="c14n")


def _read(rel: str) -> str:
    return (CORPUS / rel).read_text()


POOL_CASES = _cases("pool-xml2xml")
VOL_CASES = _cases("vol-xml2xml")


def test_corpus_case_counts() -> None:
    assert len(POOL_CASES) == 38
    assert len(VOL_CASES) == 20


@pytest.mark.parametrize("case", POOL_CASES, ids=lambda c: c.id)
def test_pool_xml2xml(case: Case) -> None:
    pool = parse_pool_xml(_read(f"storagepoolxml2xmlin/{case.pool}.xml"))
    out = format_pool_xml(pool)
    expected = _read(case.expected)
    assert canonical(out) == canonical(expected)
    assert out == expected  # libvirt's own test compares the exact text
    validate(out, "pool")
    # A parsed definition is an inactive one: both spellings print the same.
    assert format_pool_xml(pool, inactive=True) == out
    # And it is a fixed point.
    assert format_pool_xml(parse_pool_xml(out)) == out


@pytest.mark.parametrize("case", VOL_CASES, ids=lambda c: c.id)
def test_vol_xml2xml(case: Case) -> None:
    pool = parse_pool_xml(_read(f"storagepoolxml2xmlin/{case.pool}.xml"))
    vol = parse_volume_xml(_read(f"storagevolxml2xmlin/{case.volume}.xml"), pool,
                           capacity_optional="parse:no-capacity" in case.flags)
    out = format_volume_xml(vol, pool)
    expected = _read(case.expected)
    assert canonical(out) == canonical(expected)
    assert out == expected
    validate(out, "volume")
    again = parse_volume_xml(out, pool, capacity_optional=True)
    assert format_volume_xml(again, pool) == out


def test_vol_without_capacity_is_refused_unless_allowed() -> None:
    pool = parse_pool_xml(_read("storagepoolxml2xmlin/pool-dir.xml"))
    text = _read("storagevolxml2xmlin/vol-qcow2-nocapacity.xml")
    with pytest.raises(XMLError, match=r"^missing capacity element$"):
        parse_volume_xml(text, pool)
    vol = parse_volume_xml(text, pool, capacity_optional=True)
    assert vol.capacity_given is False and vol.capacity is None


def test_vol_capacity_from_backing_store() -> None:
    pool = parse_pool_xml(_read("storagepoolxml2xmlin/pool-dir.xml"))
    with_backing = _read("storagevolxml2xmlin/vol-qcow2-nocapacity-backing.xml")
    vol = parse_volume_xml(with_backing, pool, capacity_from_backing=True)
    assert vol.backing_store is not None and vol.backing_store.format == "raw"
    without = _read("storagevolxml2xmlin/vol-qcow2-nocapacity.xml")
    with pytest.raises(XMLError, match="missing capacity"):
        parse_volume_xml(without, pool, capacity_from_backing=True)


def test_xml2argv_volumes_parse() -> None:
    # Creation semantics live in the engine; here every volume they use must parse.
    for case in _cases("vol-xml2argv"):
        pool = parse_pool_xml(_read(f"storagepoolxml2xmlin/{case.pool}.xml"))
        # Cloning from an input volume lets capacity come from it, as in libvirt's test.
        vol = parse_volume_xml(_read(f"storagevolxml2xmlin/{case.volume}.xml"), pool,
                               capacity_optional=case.input_volume != "-",
                               capacity_from_backing="opt-capacity" in case.flags)
        validate(format_volume_xml(vol, pool), "volume")


def test_parsed_volume_fields() -> None:
    pool = parse_pool_xml(_read("storagepoolxml2xmlin/pool-dir.xml"))
    vol = parse_volume_xml(_read("storagevolxml2xmlin/vol-qcow2-lazy.xml"), pool)
    assert vol.type == "file"
    assert vol.capacity == 5 * 1024**3 and vol.allocation == 294912
    assert vol.allocation_given is True
    assert vol.target.format == "qcow2" and vol.target.compat == "1.1"
    assert vol.target.lazy_refcounts is True
    assert vol.target.permissions.mode == 0o644 and vol.target.permissions.owner == 0
    nocow = parse_volume_xml(_read("storagevolxml2xmlin/vol-qcow2-nocow.xml"), pool)
    assert nocow.target.nocow is True
    luks = parse_volume_xml(_read("storagevolxml2xmlin/vol-luks-cipher.xml"), pool)
    assert luks.target.encryption is not None
    assert luks.target.encryption.cipher == {"name": "serpent", "size": "256",
                                             "mode": "cbc", "hash": "sha256"}
    assert luks.target.encryption.secrets[0].uuid == "f52a81b2-424e-490c-823d-6bd4235bc572"


def test_parsed_pool_fields() -> None:
    pool = parse_pool_xml(_read("storagepoolxml2xmlin/pool-logical-create.xml"))
    assert pool.source.name == "HostVG" and pool.source.format == "lvm2"
    assert pool.target.path == "/dev/HostVG"
    assert [d.path for d in pool.source.devices] == ["/dev/sdb1", "/dev/sdb2", "/dev/sdb3"]
    # Runtime sizes are not read from a definition, as in libvirt.
    assert pool.capacity == pool.allocation == pool.available == 0
    ns = parse_pool_xml(_read("storagepoolxml2xmlin/pool-netfs-ns-mountopts.xml"))
    assert ns.mount_opts == ["sync", "lazytime"]
    rbd = parse_pool_xml(_read("storagepoolxml2xmlin/pool-rbd-ns-configopts.xml"))
    assert rbd.rbd_config_opts[0] == ("client_mount_timeout", "45")
    scsi = parse_pool_xml(_read("storagepoolxml2xmlin/pool-scsi-type-scsi-host-stable.xml"))
    assert scsi.source.adapter is not None
    assert scsi.source.adapter.parent_addr == (0, 0, 0x1F, 2)
    assert scsi.source.adapter.parent_addr_unique_id == 5


def test_active_pool_prints_sizes_and_extents() -> None:
    pool = parse_pool_xml(_read("storagepoolxml2xmlin/pool-disk.xml"))
    pool.capacity, pool.allocation, pool.available = 100, 60, 40
    from virtstore.xml import FreeExtent

    pool.source.devices[0].free_extents = [FreeExtent(370137600, 567544320)]
    live = format_pool_xml(pool)
    assert "<capacity unit='bytes'>100</capacity>" in live
    assert "<freeExtent start='370137600' end='567544320'/>" in live
    validate(live, "pool")
    inactive = format_pool_xml(pool, inactive=True)
    assert inactive == _read("storagepoolxml2xmlout/pool-disk.xml")


def test_netfs_gluster_relative_dir() -> None:
    pool = parse_pool_xml(_read("storagepoolxml2xmlin/pool-netfs-gluster-without-slash.xml"))
    assert pool.source.dir == "volume" and pool.source.format == "glusterfs"
    validate(format_pool_xml(pool), "pool")


# -- schema self-check ------------------------------------------------------------

def _schema_samples() -> list[tuple[str, Path]]:
    kinds = {"storagepoolschemadata": "pool", "storagevolschemadata": "volume",
             "storagepoolcapsschemadata": "poolcaps", "storagepoolxml2xmlin": "pool",
             "storagepoolxml2xmlout": "pool", "storagevolxml2xmlin": "volume",
             "storagevolxml2xmlout": "volume"}
    samples = []
    for folder, kind in kinds.items():
        for path in sorted((CORPUS / folder).glob("*.xml")):
            samples.append((kind, path))
    return samples


@pytest.mark.parametrize("kind,path", _schema_samples(),
                         ids=lambda v: v.name if isinstance(v, Path) else v)
def test_schema_samples(kind: str, path: Path) -> None:
    text = path.read_text()
    if "-invalid." in path.name:
        with pytest.raises(XMLError, match="failed to validate"):
            validate(text, kind)
        return
    validate(text, kind)
    if path.parent.name in ("storagepoolschemadata", "storagevolschemadata"):
        if kind == "pool":
            validate(format_pool_xml(parse_pool_xml(text)), "pool")
        elif kind == "volume":
            pool = parse_pool_xml(_read("storagepoolxml2xmlin/pool-dir.xml"))
            validate(format_volume_xml(parse_volume_xml(text, pool), pool), "volume")


def test_invalid_sample_is_also_refused_by_parser() -> None:
    text = _read("storagepoolschemadata/dir-missing-target-path-invalid.xml")
    with pytest.raises(XMLError, match=r"^missing storage pool target path$"):
        parse_pool_xml(text)


def test_validate_reports_first_error_on_one_line() -> None:
    with pytest.raises(XMLError) as info:
        validate("<pool type='dir'><name>x</name><bogus/></pool>", "pool")
    assert "\n" not in str(info.value)
    assert str(info.value).startswith("XML document failed to validate against schema: line")


# -- capabilities and sources ------------------------------------------------------

def _without_sheepdog(text: str) -> str:
    root = etree.fromstring(text.encode())
    for pool in root.findall("pool"):
        if pool.get("type") == "sheepdog":
            root.remove(pool)
    return etree.tostring(root).decode()


def test_pool_capabilities_match_libvirt() -> None:
    # libvirt 9.0's test data still lists sheepdog, whose backend it no longer has; btrfs
    # is ours, not libvirt's.
    caps = [c for c in default_pool_type_caps() if c.type != "btrfs"]
    for entry in caps:
        entry.supported = True
    out = pool_capabilities_xml(caps)
    validate(out, "poolcaps")
    expected = _without_sheepdog(_read("storagepoolcapsschemadata/poolcaps-full.xml"))
    assert canonical(out) == canonical(expected)
    for entry in caps:
        entry.supported = entry.type == "fs"
    expected = _without_sheepdog(_read("storagepoolcapsschemadata/poolcaps-fs.xml"))
    assert canonical(pool_capabilities_xml(caps)) == canonical(expected)


def test_pool_sources_round_trip() -> None:
    sources = [
        PoolSource(hosts=[SourceHost("nfs.example.com")], dir="/export/a", format="nfs"),
        PoolSource(hosts=[SourceHost("nfs.example.com")], dir="/export/b", format="nfs"),
    ]
    text = format_pool_sources_xml(sources, "netfs")
    assert text == (
        "<sources>\n"
        "  <source>\n"
        "    <host name='nfs.example.com'/>\n"
        "    <dir path='/export/a'/>\n"
        "    <format type='nfs'/>\n"
        "  </source>\n"
        "  <source>\n"
        "    <host name='nfs.example.com'/>\n"
        "    <dir path='/export/b'/>\n"
        "    <format type='nfs'/>\n"
        "  </source>\n"
        "</sources>\n")
    assert parse_pool_sources(text, "netfs") == sources
    logical = [PoolSource(devices=[SourceDevice("/dev/sdb1")], name="vg0", format="lvm2")]
    text = format_pool_sources_xml(logical, "logical")
    assert "<name>vg0</name>" in text and "<format type='lvm2'/>" in text
    assert parse_pool_sources(text, "logical") == logical


def test_pool_source_spec() -> None:
    spec = parse_pool_source_xml("<source><host name='10.0.0.1' port='3260'/></source>",
                                 "iscsi")
    assert spec.hosts == [SourceHost("10.0.0.1", 3260)]
    with pytest.raises(XMLError, match="expecting <source>"):
        parse_pool_source_xml("<pool/>", "iscsi")
