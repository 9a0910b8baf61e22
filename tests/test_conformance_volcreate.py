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
from virtstore.engine.connection import EmbeddedConnection
from virtstore.errors import VirtstoreError
from virtstore.xml import parse_pool_xml, parse_size

pytestmark = requires_qemu_img

SECRET_VALUE = b"conformance passphrase"


def _cases() -> list[Any]:
    rows = []
    with open(CONFORMANCE / "cases.tsv", newline="") as fh:
        for row in csv.reader(fh, delimiter="\t"):
            if not row or row[0].startswith("#") or row[0] != "vol-xml2argv":
                continue
            _, pool, vol, _in_pool, in_vol, expected, flags, outcome = row
            marks = []
            if in_vol != "-":
                marks.append(pytest.mark.skip(
                    reason="creating from an input volume is a conversion (vol-create-from), "
                           "part of the data-operation jobs"))
            rows.append(pytest.param(pool, vol, expected, flags, outcome,
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
        if w == "-f":
            opts["-f"] = words[i + 1]
        if w == "-b":
            opts["-b"] = words[i + 1]
    return opts


@pytest.mark.parametrize(("pool_case", "vol_case", "expected", "flags", "outcome"), _cases())
def test_vol_xml2argv_by_effect(conn: EmbeddedConnection, tmp_path: Path, pool_case: str,
                                vol_case: str, expected: str, flags: str, outcome: str) -> None:
    src_pool = parse_pool_xml((CONFORMANCE / "storagepoolxml2xmlin" / f"{pool_case}.xml")
                              .read_bytes())
    assert src_pool.type == "dir"
    target = tmp_path / "images"
    target.mkdir()
    conn.pool_create_xml(dir_pool_xml("conf", target))
    xml = (CONFORMANCE / "storagevolxml2xmlin" / f"{vol_case}.xml").read_text()
    doc = etree.fromstring(xml.encode())
    for sec in doc.iterfind(".//encryption/secret"):
        uuid = sec.get("uuid")
        conn.secret_define_xml(f"<secret><uuid>{uuid}</uuid><usage type='volume'>"
                               f"<volume>{target}/{uuid}</volume></usage></secret>")
        conn.secret_set_value(str(uuid), SECRET_VALUE)
    prealloc = "prealloc-metadata" in flags
    if outcome == "fail":
        with pytest.raises(VirtstoreError) as ei:
            conn.volume_create_xml("conf", xml, prealloc_metadata=prealloc)
        assert "\n" not in str(ei.value)
        assert list(target.iterdir()) == []
        return
    name = conn.volume_create_xml("conf", xml, prealloc_metadata=prealloc)
    path = target / name
    opts = _argv_options(expected)
    info = qemu_info(path)
    assert info["format"] == opts["-f"]
    cap_node = doc.find("capacity")
    if cap_node is not None:
        assert info["virtual-size"] == parse_size(cap_node.text or "0", cap_node.get("unit"))
    else:
        assert info["virtual-size"] == 0  # taken from the backing store, /dev/null
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
