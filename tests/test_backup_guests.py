"""guest-clone and guest-backup of a domain's disks, and the backup commands through
the real CLI, on dir pools in temporary directories."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from lxml import etree

from cli_fixtures import Cli, cli_fixture  # noqa: F401
from conftest import qemu_info
from virtstore.api import VolumeCreateArgs
from virtstore.api.embedded import EmbeddedConnection
from virtstore.api.guests import guest_backup, guest_clone
from virtstore.errors import AlreadyExists

MiB = 1024 * 1024


def domain(pooldir: Path, *, third_readonly: bool) -> str:
    third = ("<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
             f"<source file='{pooldir}/web-data.img'/><target dev='vdc' bus='virtio'/>"
             + ("<readonly/>" if third_readonly else "") + "</disk>")
    return f"""<domain type='kvm'>
  <name>web</name>
  <uuid>3e3fce45-4f53-4fa7-bb32-11f34168b82b</uuid>
  <memory unit='MiB'>512</memory>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{pooldir}/web.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='volume' device='disk'>
      <driver name='qemu' type='raw'/>
      <source pool='p' volume='logs.img'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    {third}
    <interface type='network'>
      <mac address='52:54:00:aa:bb:cc'/>
      <source network='default'/>
    </interface>
  </devices>
</domain>
"""


@pytest.fixture
def guest(conn: EmbeddedConnection, pool: str, pooldir: Path) -> Path:
    conn.volume_create_xml(pool, "<volume><name>web.qcow2</name><capacity unit='M'>32</capacity>"
                           "<target><format type='qcow2'/><compat>1.1</compat></target>"
                           "</volume>")
    conn.volume_create(pool, VolumeCreateArgs("logs.img", 16 * MiB))
    conn.volume_create(pool, VolumeCreateArgs("web-data.img", 8 * MiB))
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 7 0 4M",
                    str(pooldir / "web.qcow2")], check=True, capture_output=True)
    with open(pooldir / "logs.img", "r+b") as fh:
        fh.write(b"log line\n" * 1000)
    return pooldir


def names(conn: EmbeddedConnection, pool: str) -> set[str]:
    return {v.name for v in conn.list_volumes(pool)}


def test_guest_clone_skips_readonly_disks_and_rewrites_the_xml(
        conn: EmbeddedConnection, pool: str, guest: Path) -> None:
    xml = domain(guest, third_readonly=True)
    new_xml, made = guest_clone(conn, xml, "web2")
    # The old guest's name in a volume's name becomes the new one's, else NAME-TARGET.
    assert sorted(v.name for v in made) == ["web2-vdb.img", "web2.qcow2"]
    assert names(conn, pool) == {"web.qcow2", "logs.img", "web-data.img", "web2.qcow2",
                                 "web2-vdb.img"}
    root = etree.fromstring(new_xml.encode())
    assert root.findtext("name") == "web2"
    assert root.findtext("uuid") not in (None, "3e3fce45-4f53-4fa7-bb32-11f34168b82b")
    assert root.find("devices/interface/mac") is None
    disks = root.findall("devices/disk")
    assert disks[0].find("source").get("file") == str(guest / "web2.qcow2")
    assert disks[1].find("source").attrib == {"pool": "p", "volume": "web2-vdb.img"}
    assert disks[2].find("source").get("file") == str(guest / "web-data.img")  # shared
    for old, new in (("web.qcow2", "web2.qcow2"), ("logs.img", "web2-vdb.img")):
        r = subprocess.run(["qemu-img", "compare", str(guest / old), str(guest / new)],
                           capture_output=True)
        assert r.returncode == 0, r


def test_guest_clone_linked_makes_overlays(conn: EmbeddedConnection, pool: str,
                                           guest: Path) -> None:
    new_xml, made = guest_clone(conn, domain(guest, third_readonly=True), "web2",
                                linked=True)
    assert {v.format for v in made} == {"qcow2"}
    assert {qemu_info(v.path).get("backing-filename") for v in made} == {
        str(guest / "web.qcow2"), str(guest / "logs.img")}
    drivers = [d.get("type") for d in etree.fromstring(new_xml.encode())
               .iterfind("devices/disk/driver")]
    assert drivers == ["qcow2", "qcow2", "raw"]


def test_guest_clone_failing_on_the_third_disk_removes_the_first_two(
        conn: EmbeddedConnection, pool: str, guest: Path) -> None:
    # The third clone's name is taken: its clone fails after two were made.
    conn.volume_create(pool, VolumeCreateArgs("web2-data.img", MiB))
    before = names(conn, pool)
    with pytest.raises(AlreadyExists):
        guest_clone(conn, domain(guest, third_readonly=False), "web2")
    assert names(conn, pool) == before
    assert not (guest / "web2.qcow2").exists() and not (guest / "web2-vdb.img").exists()


def test_guest_clone_refuses_a_writable_disk_outside_pools(
        conn: EmbeddedConnection, pool: str, guest: Path, tmp_path: Path) -> None:
    stray = tmp_path / "stray.img"
    stray.write_bytes(b"\0" * 4096)
    xml = domain(guest, third_readonly=False).replace(f"{guest}/web-data.img", str(stray))
    before = names(conn, pool)
    with pytest.raises(Exception, match="not a volume of any pool"):
        guest_clone(conn, xml, "web2")
    assert names(conn, pool) == before


def test_guest_backup_backs_up_each_disk_and_restores(
        conn: EmbeddedConnection, pool: str, guest: Path, tmp_path: Path) -> None:
    xml = domain(guest, third_readonly=True)
    bdir = tmp_path / "web-backup"
    first = guest_backup(conn, xml, str(bdir))
    assert [d.target for d in first] == ["vda", "vdb"]
    assert (bdir / "domain.xml").read_text() == xml
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 9 8M 4M",
                    str(guest / "web.qcow2")], check=True, capture_output=True)
    guest_backup(conn, xml, str(bdir), incremental=True)
    vda = conn.backup_list(str(bdir / "vda"))
    assert [m["kind"] for m in vda] == ["full", "incremental"]
    assert vda[1]["stats"]["chunks_read"] == 1
    vdb = conn.backup_list(str(bdir / "vdb"))
    assert [m["tracking"] for m in vdb] == ["block-hash", "block-hash"]
    assert vdb[1]["stats"]["chunks_written"] == 0
    job = conn.volume_restore(str(bdir / "vda"), pool, "web-restored.qcow2")
    assert conn.job_wait(job.id).state == "done"
    r = subprocess.run(["qemu-img", "compare", str(guest / "web.qcow2"),
                        str(guest / "web-restored.qcow2")], capture_output=True)
    assert r.returncode == 0, r


def test_backup_commands_through_the_cli(cli: Cli, tmp_path: Path) -> None:
    d = tmp_path / "images"
    d.mkdir()
    cli("pool-define-as", "images", "dir", "--target", str(d))
    cli("pool-start", "images")
    cli("vol-create-as", "images", "v.img", "16M")
    with open(d / "v.img", "r+b") as fh:
        fh.write(b"x" * (5 * MiB))
    bdir = tmp_path / "bk"
    out = cli("vol-backup", "v.img", str(bdir), "--pool", "images").out
    # (The filesystem may report a zero chunk past the data as data: it is read, not kept.)
    assert re.search(r"full \(block-hash\), \d+ chunks read, 2 written", out), out
    with open(d / "v.img", "r+b") as fh:
        fh.seek(4 * MiB)
        fh.write(b"y" * MiB)
    out = cli("vol-backup", "v.img", str(bdir), "--pool", "images", "--incremental").out
    assert re.search(r"incremental \(block-hash\), \d+ chunks read, 1 written", out), out
    listing = cli("backup-list", str(bdir)).out
    assert listing.count("block-hash") == 2
    out = cli("backup-verify", str(bdir)).out
    assert "2 backup(s), every chunk matches its hash" in out
    cli("vol-restore", str(bdir), "r.qcow2", "--pool", "images", "--format", "qcow2")
    r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(d / "v.img"),
                        str(d / "r.qcow2")], capture_output=True)
    assert r.returncode == 0, r

    xml = tmp_path / "g.xml"
    xml.write_text(f"<domain><name>g</name><devices><disk type='file' device='disk'>"
                   f"<source file='{d}/v.img'/><target dev='vda'/></disk></devices></domain>")
    out = cli("guest-clone", str(xml), "g2").out
    assert "<name>g2</name>" in out and f"{d}/g2-vda.img" in out
    assert (d / "g2-vda.img").exists()
