"""libvirt's vol-xml2argv cases, held by effect: the image we make is the one libvirt's
qemu-img command line would make (format, compat, cluster size, features, backing file
and format, preallocation, encryption, capacity)."""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from conftest import CONFORMANCE, dir_pool_xml, qemu_info, requires_qemu_img
from virtstore.api.embedded import EmbeddedConnection
from virtstore.errors import VirtstoreError
from virtstore.xml import parse_pool_xml, parse_size

pytestmark = requires_qemu_img

SECRET_VALUE = b"conformance passphrase"
# The corpus asks for 5 GiB and 1 TiB images. Encrypting or preallocating those for real
# writes every byte, so capacities above this are scaled down to it; format, compat,
# features, backing, encryption and preallocation are what the cases are about.
CAP = 64 * 1024 * 1024


def _scaled(xml: str) -> str:
    doc = etree.fromstring(xml.encode())
    for tag in ("capacity", "allocation"):
        node = doc.find(tag)
        if node is not None and parse_size(node.text or "0", node.get("unit")) > CAP:
            node.text, node.attrib["unit"] = str(CAP), "bytes"
    return etree.tostring(doc, encoding="unicode")


def _cases() -> list[Any]:
    rows = []
    with open(CONFORMANCE / "cases.tsv", newline="") as fh:
        for row in csv.reader(fh, delimiter="\t"):
            if not row or row[0].startswith("#") or row[0] != "vol-xml2argv":
                continue
            _, pool, vol, in_pool, in_vol, expected, flags, outcome = row
            marks = []
            if "pool-logical" in (pool, in_pool):
                marks.append(pytest.mark.skip(
                    reason="needs a logical pool: LVM volumes cannot be activated without "
                           "the kernel's device-mapper, so they hold no data to convert"))
            rows.append(pytest.param(pool, vol, in_pool, in_vol, expected, flags, outcome,
                                     id=f"{vol}<-{in_vol}" if in_vol != "-" else vol,
                                     marks=marks))
    return rows


def _argv_options(expected: str) -> dict[str, str]:
    text = (CONFORMANCE / expected).read_text().replace("\\\n", " ")
    words = text.split()
    opts: dict[str, str] = {}
    for i, w in enumerate(words):
        if w == "-o":
            for kv in words[i + 1].split(","):
                k, eq, v = kv.partition("=")
                opts[k] = v if eq else "on"  # a bare boolean option means on
        if w == "-f" and "-f" not in opts:
            opts["-f"] = words[i + 1]
        if w == "-O":  # convert: -f is the input's format, -O the new image's
            opts["-f"] = words[i + 1]
        if w == "-b":
            opts["-b"] = words[i + 1]
    return opts


def _define_secrets(conn: EmbeddedConnection, xml: str, usage_dir: Path, name: str) -> None:
    """Each secret the XML names, with its value; its usage is this volume's path."""
    for sec in etree.fromstring(xml.encode()).iterfind(".//encryption/secret"):
        uuid = str(sec.get("uuid"))
        if any(s.uuid == uuid for s in conn.list_secrets()):
            continue
        conn.secret_define_xml(f"<secret><uuid>{uuid}</uuid><usage type='volume'>"
                               f"<volume>{usage_dir / name}</volume></usage></secret>")
        conn.secret_set_value(uuid, SECRET_VALUE)


@pytest.mark.parametrize(("pool_case", "vol_case", "in_pool", "in_vol", "expected", "flags",
                          "outcome"), _cases())
def test_vol_xml2argv_by_effect(conn: EmbeddedConnection, tmp_path: Path, pool_case: str,
                                vol_case: str, in_pool: str, in_vol: str, expected: str,
                                flags: str, outcome: str) -> None:
    src_pool = parse_pool_xml((CONFORMANCE / "storagepoolxml2xmlin" / f"{pool_case}.xml")
                              .read_bytes())
    assert src_pool.type == "dir"
    target = tmp_path / "images"
    target.mkdir()
    conn.pool_create_xml(dir_pool_xml("conf", target))
    xml = _scaled((CONFORMANCE / "storagevolxml2xmlin" / f"{vol_case}.xml").read_text())
    doc = etree.fromstring(xml.encode())
    source = None
    if in_vol != "-":
        # The input volume, made first in a pool of its own, is what the new one is
        # converted from.
        in_dir = tmp_path / "input"
        in_dir.mkdir()
        conn.pool_create_xml(dir_pool_xml("input", in_dir))
        in_xml = _scaled((CONFORMANCE / "storagevolxml2xmlin" / f"{in_vol}.xml").read_text())
        in_name = str(etree.fromstring(in_xml.encode()).findtext("name"))
        _define_secrets(conn, in_xml, in_dir, in_name)
        source = conn.volume_create_xml("input", in_xml)
    _define_secrets(conn, xml, target, str(doc.findtext("name")))
    prealloc = "prealloc-metadata" in flags
    if outcome == "fail":
        with pytest.raises(VirtstoreError) as ei:
            conn.volume_create_xml("conf", xml, prealloc_metadata=prealloc)
        assert "\n" not in str(ei.value)
        assert list(target.iterdir()) == []
        return
    if source is None:
        name = conn.volume_create_xml("conf", xml, prealloc_metadata=prealloc)
    else:
        job = conn.volume_create_from("conf", xml, "input", source,
                                      prealloc_metadata=prealloc)
        done = conn.job_wait(job.id)
        assert done.state == "done", done.error
        name = str(done.target_volume)
    path = target / name
    opts = _argv_options(expected)
    info = qemu_info(path)
    assert info["format"] == opts["-f"]
    cap_node = doc.find("capacity")
    wanted = parse_size(cap_node.text or "0", cap_node.get("unit")) if cap_node is not None \
        else 0  # none given: the backing store's (/dev/null) or the input volume's
    if source is not None:
        wanted = max(wanted, conn.volume_info("input", source).capacity)
    assert info["virtual-size"] == wanted
    spec: dict[str, Any] = info.get("format-specific", {}).get("data", {})  # type: ignore[union-attr]
    if opts["-f"] == "qcow2":
        assert spec["compat"] == opts["compat"]
        assert spec.get("lazy-refcounts", False) == (opts.get("lazy_refcounts") == "on")
        assert spec.get("extended-l2", False) == (opts.get("extended_l2") == "on")
        assert info["cluster-size"] == int(opts.get("cluster_size", "65536"))
    if "-b" in opts:
        assert info["backing-filename"] == opts["-b"]
        assert info.get("backing-filename-format") == opts.get("backing_fmt")
    else:
        assert "backing-filename" not in info
    if opts.get("preallocation") == "metadata":
        # Metadata preallocation writes every L2 table: 8 bytes per 64 KiB cluster.
        assert int(info["actual-size"]) >= int(info["virtual-size"]) // 65536 * 8  # type: ignore[call-overload]
    if "encrypt.format" in opts or opts["-f"] == "luks":
        enc = spec.get("encrypt", spec)
        assert enc.get("format", "luks") == "luks"
        if "cipher-alg" in opts:
            assert spec["cipher-alg"] == opts["cipher-alg"]
            assert spec["ivgen-alg"] == opts["ivgen-alg"]
            assert spec["hash-alg"] == opts["hash-alg"]
    if "encrypt.format" in opts or opts["-f"] == "luks":
        # Encrypted images open only with the key: read through them with the secret.
        driver, key = (("luks", "key-secret") if opts["-f"] == "luks"
                       else ("qcow2", "encrypt.key-secret"))
        read = subprocess.run(
            ["qemu-io", "--object", f"secret,id=s0,data={SECRET_VALUE.decode()}",
             "--image-opts", f"driver={driver},{key}=s0,file.filename={path}",
             "-c", "read 0 512"], capture_output=True, text=True)
        assert read.returncode == 0, read.stdout + read.stderr
        return
    check = subprocess.run(["qemu-img", "check", "-U", str(path)], capture_output=True, text=True)
    assert check.returncode in (0, 63), check.stdout + check.stderr  # 63: format has no check
