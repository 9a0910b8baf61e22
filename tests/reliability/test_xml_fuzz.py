"""Property tests of the XML layer and of the engine's XML entry points.

Documents come from three places: strategies that build valid pool and volume
documents, mutations of libvirt's conformance corpus (elements dropped, duplicated,
reordered; attribute and text values replaced by odd ones; control characters and
unicode put into names), and hostile documents (entities, external entities, deep
nesting, more than 1 MiB).

The property: a document is either refused with XMLError / InvalidArgument, or it is
accepted, its output validates against libvirt's schema (whenever the input did:
libvirt's parser is more lenient than its schema), and parsing that output gives
back what was parsed (the fields libvirt does not print back are normalised,
see docs/reliability.md). Through the engine (pool_define_xml, volume_create_xml on
a root and a pool on tmpfs) nothing is ever written outside the pool directory and the
state root.
"""

from __future__ import annotations

import copy
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree

from conftest import CONFORMANCE
from reliability import summary
from reliability.harness import work_area
from virtstore.api.embedded import EmbeddedConnection
from virtstore.errors import InvalidArgument, VirtstoreError, XMLError
from virtstore.types import replace
from virtstore.xml import (
    PoolDef,
    VolDef,
    format_pool_xml,
    format_volume_xml,
    parse_pool_xml,
    parse_volume_xml,
    validate,
)

# Example counts keep the module near a minute on two cores; raise them with
# VIRTSTORE_FUZZ_SCALE for a longer local run.
SCALE = float(os.environ.get("VIRTSTORE_FUZZ_SCALE", "1"))


def fuzz_settings(n: int) -> settings:
    return settings(max_examples=max(1, int(n * SCALE)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much,
                                           HealthCheck.function_scoped_fixture])


# A marker in every path the documents point outside their pool, so a file written
# there could be found among other programs' files.
MARK = "vsfuzz"
POOL_IN = CONFORMANCE / "storagepoolxml2xmlin"
VOL_IN = CONFORMANCE / "storagevolxml2xmlin"
POOL_FILES = sorted(POOL_IN.glob("*.xml"))
VOL_FILES = sorted(VOL_IN.glob("*.xml"))
DIR_POOL = parse_pool_xml((POOL_IN / "pool-dir.xml").read_text())


def _vol_pools() -> dict[str, PoolDef]:
    """The pool each corpus volume is parsed in, as libvirt's test pairs them."""
    pairs: dict[str, PoolDef] = {}
    for line in (CONFORMANCE / "cases.tsv").read_text().splitlines():
        f = line.split("\t")
        if line.startswith("#") or len(f) < 3 or f[2] == "-":
            continue
        pairs.setdefault(f[2], parse_pool_xml((POOL_IN / f"{f[1]}.xml").read_text()))
    return pairs


VOL_POOLS = _vol_pools()

# -- the property ----------------------------------------------------------------------------


def _normal_vol(v: VolDef) -> VolDef:
    """What libvirt's format does not carry back: an absent capacity prints as 0, an
    absent allocation as the capacity, and <nocow/> is not printed."""
    v = copy.deepcopy(v)
    if not v.capacity_given:
        v.capacity, v.capacity_given = v.capacity or 0, True
    v.allocation_given = True
    v.target = replace(v.target, nocow=False)
    return v


def _schema_check(text: str | bytes, out: str, kind: str) -> None:
    """The output validates whenever the input did. libvirt's parser (and so ours) is
    more lenient than libvirt's schema (a blank host name, a relative path, a LUKS
    volume without a secret...): such an input is accepted and round-trips, and its
    output may fail the schema as the input did; those are counted, not failed."""
    try:
        validate(out, kind)
    except XMLError as exc:
        try:
            validate(text, kind)
        except XMLError:
            summary.add("lenient")
            return
        raise AssertionError(f"a schema-valid input gave schema-invalid output: {exc}") from exc


def judge_pool(text: str | bytes) -> PoolDef | None:
    """None if refused as it should be; the parsed pool if accepted and sound."""
    summary.add("inputs")
    try:
        pool = parse_pool_xml(text)
    except (XMLError, InvalidArgument) as exc:
        assert "\n" not in str(exc), "error message is not one line"
        return None
    out = format_pool_xml(pool)
    _schema_check(text, out, "pool")
    again = parse_pool_xml(out)
    assert again == pool, f"round trip changed the pool:\n{out}"
    assert format_pool_xml(again) == out
    return pool


def judge_vol(text: str | bytes, pool: PoolDef = DIR_POOL) -> VolDef | None:
    summary.add("inputs")
    try:
        vol = parse_volume_xml(text, pool, capacity_optional=True)
    except (XMLError, InvalidArgument) as exc:
        assert "\n" not in str(exc), "error message is not one line"
        return None
    out = format_volume_xml(vol, pool)
    _schema_check(text, out, "volume")
    again = parse_volume_xml(out, pool, capacity_optional=True)
    assert _normal_vol(again) == _normal_vol(vol), f"round trip changed the volume:\n{out}"
    assert format_volume_xml(again, pool) == out
    return vol


# -- strategies: valid documents ------------------------------------------------------------

NAME_CHARS = st.characters(codec="utf-8", categories=("L", "N"), include_characters="_-.+:@")
names = st.text(NAME_CHARS, min_size=1, max_size=40).filter(
    lambda s: not s.startswith(("-", ".")) and len(s.encode()) <= 255)
UNITS = ["", "b", "bytes", "k", "K", "KiB", "KB", "M", "MiB", "MB", "G", "GiB", "GB", "T",
         "TiB", "P", "E"]
uuids = st.none() | st.uuids().map(str)
modes = st.none() | st.integers(0, 0o777).map(lambda m: f"0{m:o}")
ids = st.none() | st.integers(0, 2**32 - 2).map(str)


@st.composite
def perms(draw: st.DrawFn) -> str:
    parts = []
    for tag, strat in (("mode", modes), ("owner", ids), ("group", ids)):
        value = draw(strat)
        if value is not None:
            parts.append(f"<{tag}>{value}</{tag}>")
    if draw(st.booleans()):
        parts.append("<label>system_u:object_r:virt_image_t:s0</label>")
    return f"<permissions>{''.join(parts)}</permissions>" if parts else ""


@st.composite
def pool_docs(draw: st.DrawFn, base: str = "/srv") -> str:
    kind = draw(st.sampled_from(["dir", "fs", "netfs", "logical", "disk", "iscsi", "rbd",
                                 "zfs"]))
    name = draw(names)
    u = draw(uuids)
    leaf = draw(st.text("abcdefgh0123456789_", min_size=1, max_size=12))
    path = f"{base}/{MARK}-{leaf}"
    source = {
        "dir": "",
        "fs": f"<source><device path='/dev/{MARK}{leaf}'/><format type='ext4'/></source>",
        "netfs": (f"<source><host name='nfs.example.com'/><dir path='/export/{leaf}'/>"
                  "<format type='nfs'/></source>"),
        "logical": f"<source><name>vg{leaf}</name></source>",
        "disk": f"<source><device path='/dev/{MARK}{leaf}'/><format type='gpt'/></source>",
        "iscsi": ("<source><host name='iscsi.example.com'/>"
                  f"<device path='iqn.2024-01.com.example:{leaf}'/></source>"),
        "rbd": f"<source><host name='ceph.example.com' port='6789'/><name>rbd{leaf}</name>"
               "</source>",
        "zfs": f"<source><name>tank{leaf}</name></source>",
    }[kind]
    target = "" if kind in ("rbd", "zfs") else \
        f"<target><path>{path if kind != 'logical' else '/dev/vg' + leaf}</path>" \
        f"{draw(perms())}</target>"
    uuid = f"<uuid>{u}</uuid>" if u else ""
    return f"<pool type='{kind}'><name>{_esc(name)}</name>{uuid}{source}{target}</pool>"


def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


@st.composite
def sizes(draw: st.DrawFn, tag: str, top: int = 2**40) -> str:
    unit = draw(st.sampled_from(UNITS))
    value = draw(st.integers(0, top))
    attr = f" unit='{unit}'" if unit else ""
    return f"<{tag}{attr}>{value}</{tag}>"


@st.composite
def vol_docs(draw: st.DrawFn, small: bool = False) -> str:
    fmt = draw(st.sampled_from(["raw", "qcow2", "qed", "vmdk", "vdi", "vpc", "iso", None]))
    parts = [f"<name>{_esc(draw(names))}</name>"]
    parts.append(draw(sizes("capacity", 64 * 1024**2 if small else 2**40)))
    if draw(st.booleans()):
        parts.append(draw(sizes("allocation", 4 * 1024**2 if small else 2**40)))
    target = ""
    if fmt:
        target += f"<format type='{fmt}'/>"
    target += draw(perms())
    if fmt == "qcow2" and draw(st.booleans()):
        target += draw(st.sampled_from(["<compat>1.1</compat>", "<compat>0.10</compat>",
                                        "<compat>1.1</compat><features><lazy_refcounts/>"
                                        "</features>", "<clusterSize unit='KiB'>128"
                                        "</clusterSize>"]))
    parts.append(f"<target>{target}</target>")
    return f"<volume type='file'>{''.join(parts)}</volume>"


# -- strategies: mutations of the corpus ------------------------------------------------------

ODD_VALUES = ["", " ", "0", "-1", "-4096", "+5", " 7", "1e9", "0x10", "1.5", "NaN",
              "18446744073709551615", "18446744073709551616", "9223372036854775807",
              "9223372036854775808", "9" * 40, "..", "../..", "/..", f"../../{MARK}",
              f"/var/lib/{MARK}/../{MARK}", "/etc/passwd", "a/../b", "名前", "\u202eevil",
              "\U0001f600", "x" * 300, "-rf", "%s%n", "'\"<>&", "yes", "no", "on",
              "gpt", "qcow2", "vmdk", "none", "ZiB", "YB", "bytes", "KB", "kib", "eib"]
CONTROL = ["\x00", "\x01", "\x08", "\x1b", "\x7f", "\x85", "\u200f", "\ufeff", "\ud800",
           "\uffff", "\n", "\t"]


@st.composite
def mutated(draw: st.DrawFn, files: list[Path]) -> tuple[str, str]:
    """(corpus file name, mutated document text)."""
    f = draw(st.sampled_from(files))
    root = etree.fromstring(f.read_bytes())
    for _ in range(draw(st.integers(1, 4))):
        nodes = [n for n in root.iter() if isinstance(n.tag, str)]
        node = nodes[draw(st.integers(0, len(nodes) - 1))]
        op = draw(st.sampled_from(["drop", "dup", "reorder", "attr", "text", "unit",
                                   "size"]))
        parent = node.getparent()
        if op == "drop" and parent is not None:
            parent.remove(node)
        elif op == "dup" and parent is not None:
            parent.insert(parent.index(node), copy.deepcopy(node))
        elif op == "reorder" and len(node):
            kids = list(node)
            order = draw(st.permutations(range(len(kids))))
            for k in kids:
                node.remove(k)
            for i in order:
                node.append(kids[i])
        elif op == "attr" and node.attrib:
            key = draw(st.sampled_from(sorted(node.attrib)))
            node.set(key, draw(st.sampled_from(ODD_VALUES)).replace("\x00", ""))
        elif op == "text" and not len(node):
            node.text = draw(st.sampled_from(ODD_VALUES))
        elif op == "unit":
            node.set("unit", draw(st.sampled_from(ODD_VALUES + UNITS)))
        elif op == "size":
            node.text = str(draw(st.sampled_from([-1, -2**63, 2**63, 2**64, 2**64 - 1,
                                                  10**30, 0, 1])))
    text = etree.tostring(root, encoding="unicode")
    # Raw control and odd characters go into a name, where XML itself may refuse them.
    if draw(st.booleans()) and "<name>" in text:
        junk = draw(st.text(st.sampled_from(CONTROL) | st.characters(codec="utf-8"),
                            min_size=1, max_size=6))
        text = text.replace("<name>", "<name>" + junk, 1)
    return f.name, text


# -- strategies: hostile documents -------------------------------------------------------------

LAUGHS = "".join(f'<!ENTITY l{i} "{("&l" + str(i - 1) + ";") * 10}">' for i in range(1, 10))


@st.composite
def hostile(draw: st.DrawFn) -> tuple[str, str]:
    """(root element, document)."""
    root = draw(st.sampled_from(["pool", "volume"]))
    body = ("<name>x</name><target><path>/srv/p</path></target>" if root == "pool"
            else "<name>x</name><capacity>1</capacity><target/>")
    head = f"<{root} type='dir'>" if root == "pool" else f"<{root}>"
    kind = draw(st.sampled_from(["laughs", "external", "parameter", "internal", "deep",
                                 "huge", "xinclude", "encoding", "pi", "doctype-comment",
                                 "nul", "wide"]))
    if kind == "laughs":
        doc = (f'<!DOCTYPE {root} [<!ENTITY l0 "lol">{LAUGHS}]>'
               f"{head}<name>&l9;</name>{body[14:]}</{root}>")
    elif kind == "external":
        target = draw(st.sampled_from(["file:///etc/passwd", "file:///dev/zero",
                                       "http://127.0.0.1:9/x", f"/var/lib/{MARK}"]))
        doc = (f'<!DOCTYPE {root} [<!ENTITY e SYSTEM "{target}">]>'
               f"{head}<name>&e;</name>{body[14:]}</{root}>")
    elif kind == "parameter":
        doc = (f'<!DOCTYPE {root} [<!ENTITY % p SYSTEM "file:///etc/passwd"> %p;]>'
               f"{head}{body}</{root}>")
    elif kind == "internal":
        doc = f'<!DOCTYPE {root} [<!ENTITY n "x">]>{head}<name>&n;</name>{body[14:]}</{root}>'
    elif kind == "deep":
        depth = draw(st.integers(60, 5000))
        doc = f"{head}{body}{'<a>' * depth}{'</a>' * depth}</{root}>"
    elif kind == "huge":
        pad = draw(st.sampled_from(["<!--" + "x" * (1 << 20) + "-->", " " * (1 << 20),
                                    "<source/>" * (120_000)]))
        doc = f"{head}{body}{pad}</{root}>"
    elif kind == "xinclude":
        doc = (f"{head}<name>x</name><xi:include xmlns:xi='http://www.w3.org/2001/XInclude'"
               f" href='/etc/passwd' parse='text'/>{body[14:]}</{root}>")
    elif kind == "encoding":
        enc = draw(st.sampled_from(["UTF-16", "ISO-8859-1", "EBCDIC", "UTF-7", "bogus"]))
        doc = f"<?xml version='1.0' encoding='{enc}'?>{head}{body}</{root}>"
    elif kind == "pi":
        doc = f"<?xml-stylesheet href='file:///etc/passwd'?>{head}{body}<?x y?></{root}>"
    elif kind == "doctype-comment":
        doc = f"<!-- <!ENTITY x 'y'> -->{head}{body}</{root}>"
    elif kind == "nul":
        doc = f"{head}<name>a\x00b</name>{body[14:]}</{root}>"
    else:
        doc = "\ufeff" + f"{head}{body}</{root}>"
    return root, doc


# -- the parse-level tests -------------------------------------------------------------------


@fuzz_settings(1500)
@given(pool_docs())
def test_valid_pools_round_trip(doc: str) -> None:
    assert judge_pool(doc) is not None, doc


@fuzz_settings(1500)
@given(vol_docs())
def test_valid_volumes_round_trip(doc: str) -> None:
    judge_vol(doc)  # sizes above 2^63-1 after scaling are refused, the rest round-trips


@fuzz_settings(3000)
@given(mutated(POOL_FILES))
def test_mutated_pools(case: tuple[str, str]) -> None:
    judge_pool(case[1])
    judge_pool(case[1].encode("utf-8", "surrogatepass"))


@fuzz_settings(3000)
@given(mutated(VOL_FILES))
def test_mutated_volumes(case: tuple[str, str]) -> None:
    name, text = case
    judge_vol(text, VOL_POOLS.get(name[:-4], DIR_POOL))


@fuzz_settings(500)
@given(hostile())
def test_hostile_documents_are_refused(case: tuple[str, str]) -> None:
    root, doc = case
    judge = judge_pool if root == "pool" else judge_vol
    accepted = judge(doc)
    if accepted is not None:
        # Only harmless oddities may pass: never anything read from elsewhere.
        out = (format_pool_xml(accepted) if isinstance(accepted, PoolDef)
               else format_volume_xml(accepted, DIR_POOL))
        assert "root:" not in out and "lol" not in out
        assert len(out) < 1 << 20


# -- through the engine ------------------------------------------------------------------------


def _mount_tmpfs(where: Path) -> bool:
    where.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m,mode=0755", "tmpfs",
                           str(where)], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def engine_area() -> Iterator[Path]:
    """A tmpfs (full allocations fail fast and harmlessly there) holding the state root
    and a dir pool; the area around it is watched for stray files."""
    with work_area() as area:
        mnt = area / "fs"
        if not _mount_tmpfs(mnt):
            pytest.skip("cannot mount a tmpfs (needs root)")
        try:
            (mnt / "pool").mkdir()
            yield area
        finally:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def _snapshot(area: Path) -> set[str]:
    seen = set()
    for dirpath, dirnames, filenames in os.walk(area):
        for n in dirnames + filenames:
            seen.add(os.path.join(dirpath, n))
    for outside in (area.parent, Path("/"), Path("/srv"), Path("/etc")):
        if outside.is_dir():
            seen.update(str(outside / n) for n in os.listdir(outside) if MARK in n)
    return seen


def _allowed(path: str, area: Path) -> bool:
    fs = area / "fs"
    p = Path(path)
    if p.parent == fs / "pool":  # a volume, directly in the pool directory
        return True
    return p == fs / "state" or (fs / "state") in p.parents


def _through_engine(conn: EmbeddedConnection, area: Path, action: str, doc: str) -> None:
    summary.add("engine_inputs")
    before = _snapshot(area)
    made = None
    try:
        if action == "pool":
            made = conn.pool_define_xml(doc)
        else:
            made = conn.volume_create_xml("fz", doc)
    except VirtstoreError as exc:
        assert "\n" not in str(exc)
    after = _snapshot(area)
    stray = sorted(p for p in after - before if not _allowed(p, area))
    assert not stray, f"{action} wrote outside the pool and the state root: {stray}\n{doc}"
    if made is not None and action == "vol":
        assert (area / "fs" / "pool" / made).exists()
        conn.volume_delete("fz", made)
    elif made is not None and made not in ("fz", "default"):
        conn.pool_undefine(made)


@pytest.fixture(scope="module")
def engine(engine_area: Path) -> Iterator[EmbeddedConnection]:
    c = EmbeddedConnection(str(engine_area / "fs" / "state"))
    c.pool_define_xml(f"<pool type='dir'><name>fz</name><target><path>"
                      f"{engine_area / 'fs' / 'pool'}</path></target></pool>")
    c.pool_start("fz")
    yield c
    c.close()


@fuzz_settings(800)
@given(st.one_of(pool_docs(base=f"/var/lib/{MARK}/.."),
                 mutated(POOL_FILES).map(lambda c: c[1]))
       .filter(lambda d: "<name>fz<" not in d and "<name>default<" not in d))
def test_engine_pool_define(engine: EmbeddedConnection, engine_area: Path, doc: str) -> None:
    _through_engine(engine, engine_area, "pool", doc)


@fuzz_settings(1500)
@given(st.one_of(vol_docs(small=True),
                 mutated([VOL_IN / f"{n}.xml" for n in ("vol-file", "vol-file-naming",
                                                        "vol-qcow2", "vol-qcow2-1.1",
                                                        "vol-qcow2-lazy", "vol-file-iso",
                                                        "vol-qcow2-nobacking")])
                 .map(lambda c: c[1])))
def test_engine_volume_create(engine: EmbeddedConnection, engine_area: Path, doc: str) -> None:
    _through_engine(engine, engine_area, "vol", _shrink(doc))


def _shrink(doc: str) -> str:
    """Keep the corpus's gigabyte volumes small: the tmpfs holds 96 MiB."""
    return doc.replace("unit=\"G\"", "unit=\"M\"").replace("unit='G'", "unit='M'")
