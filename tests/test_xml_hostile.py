"""Hostile and malformed documents: each is refused with a one-line XMLError."""

from __future__ import annotations

import time
from collections.abc import Callable
from xml.sax.saxutils import escape

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtstore.errors import XMLError
from virtstore.xml import (
    PoolDef,
    PoolTarget,
    VolDef,
    format_pool_xml,
    format_volume_xml,
    parse_pool_xml,
    parse_secret_xml,
    parse_volume_xml,
    validate,
)

DIR_POOL = PoolDef(type="dir", name="p", target=PoolTarget(path="/var/lib/virtstore/p"))


def pool_doc(name: str = "p", extra: str = "", ptype: str = "dir") -> str:
    return (f"<pool type='{ptype}'><name>{name}</name>{extra}"
            f"<target><path>/srv/p</path></target></pool>")


def vol_doc(name: str = "v", capacity: str = "<capacity>1</capacity>") -> str:
    return f"<volume><name>{name}</name>{capacity}<target/></volume>"


def refused(fn: Callable[[], object], match: str | None = None) -> str:
    with pytest.raises(XMLError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message and "\r" not in message
    assert message.strip() == message and message
    if match is not None:
        assert match in message, message
    return message


BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<pool type='dir'><name>&lol9;</name><target><path>/srv/p</path></target></pool>
"""

XXE_FILE = """<?xml version="1.0"?>
<!DOCTYPE pool [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<pool type='dir'><name>&xxe;</name><target><path>/srv/p</path></target></pool>
"""

XXE_PARAM = """<!DOCTYPE pool [<!ENTITY % remote SYSTEM "http://127.0.0.1:1/x.dtd"> %remote;]>
<pool type='dir'><name>p</name><target><path>/srv/p</path></target></pool>
"""

EXTERNAL_DTD = """<!DOCTYPE pool SYSTEM "file:///etc/passwd">
<pool type='dir'><name>p</name><target><path>/srv/p</path></target></pool>
"""

INTERNAL_DOCTYPE = "<!DOCTYPE pool []>" + pool_doc()


@pytest.mark.parametrize("doc", [BILLION_LAUGHS, XXE_FILE, XXE_PARAM, EXTERNAL_DTD,
                                 INTERNAL_DOCTYPE],
                         ids=["billion-laughs", "xxe-file", "xxe-parameter", "external-dtd",
                              "internal-doctype"])
def test_doctypes_and_entities_are_refused(doc: str) -> None:
    start = time.monotonic()
    message = refused(lambda: parse_pool_xml(doc), "not allowed")
    assert "root:" not in message  # nothing of /etc/passwd leaks into the message
    assert time.monotonic() - start < 1.0
    refused(lambda: parse_volume_xml(doc.replace("pool", "volume"), DIR_POOL))
    refused(lambda: parse_secret_xml(doc.replace("pool", "secret")))
    refused(lambda: validate(doc, "pool"))


def test_undeclared_entity_is_refused() -> None:
    refused(lambda: parse_pool_xml(pool_doc("a&ent;b")), "Entity 'ent' not defined")


def test_predefined_entities_and_char_refs_are_fine() -> None:
    pool = parse_pool_xml(pool_doc("a&lt;b&gt;&amp;&apos;&quot;&#x41;&#66;"))
    assert pool.name == "a<b>&'\"AB"


def test_oversized_document() -> None:
    padding = "<!--" + "x" * (2 * 1024 * 1024) + "-->"
    refused(lambda: parse_pool_xml(pool_doc(extra=padding)), "too large")
    refused(lambda: parse_pool_xml(pool_doc(extra=padding).encode()), "too large")


def test_document_just_under_the_limit_parses() -> None:
    padding = "<!--" + "x" * (1024 * 1024 - 300) + "-->"
    assert parse_pool_xml(pool_doc(extra=padding)).name == "p"


@pytest.mark.parametrize("depth", [70, 300, 20000])
def test_deep_nesting(depth: int) -> None:
    doc = pool_doc(extra="<x>" * depth + "</x>" * depth)
    refused(lambda: parse_pool_xml(doc))


def test_invalid_utf8() -> None:
    doc = pool_doc("caf\xe9").encode("latin-1")
    refused(lambda: parse_pool_xml(doc), "UTF-8")
    refused(lambda: parse_pool_xml(b"<pool type='dir'><name>\xc3\x28</name></pool>"), "UTF-8")


def test_lone_surrogate_in_str() -> None:
    refused(lambda: parse_pool_xml(pool_doc("a\ud800b")), "UTF-8")


def test_other_encodings_are_refused() -> None:
    latin = ("<?xml version='1.0' encoding='ISO-8859-1'?>" + pool_doc("p")).encode("latin-1")
    refused(lambda: parse_pool_xml(latin), "encoding")
    refused(lambda: parse_pool_xml(pool_doc().encode("utf-16")))


def test_utf8_declaration_and_bom_are_fine() -> None:
    doc = "<?xml version='1.0' encoding='UTF-8'?>" + pool_doc("caf\u00e9")
    assert parse_pool_xml(doc).name == "caf\u00e9"
    assert parse_pool_xml(b"\xef\xbb\xbf" + doc.encode()).name == "caf\u00e9"


def test_nul_bytes() -> None:
    refused(lambda: parse_pool_xml(pool_doc("a\x00b")), "NUL")
    refused(lambda: parse_pool_xml(pool_doc("a\x00b").encode()), "NUL")
    refused(lambda: parse_pool_xml(pool_doc("a&#0;b")))


def test_malformed_documents() -> None:
    message = refused(lambda: parse_pool_xml("<pool type='dir'><name>x</pool>"))
    assert message.startswith("(storage_pool_definition):1:")
    refused(lambda: parse_pool_xml(""), "empty")
    refused(lambda: parse_pool_xml("   \n"), "empty")
    refused(lambda: parse_pool_xml("not xml"))
    refused(lambda: parse_pool_xml(pool_doc() + "<pool/>"))
    refused(lambda: parse_pool_xml(42))  # type: ignore[arg-type]


def test_processing_instructions_are_ignored() -> None:
    doc = "<?xml-stylesheet href='http://127.0.0.1:1/x.xsl'?>" + pool_doc(
        extra="<?evil stuff?>")
    assert parse_pool_xml(doc).name == "p"


def test_xinclude_is_not_processed() -> None:
    doc = pool_doc(extra="<xi:include xmlns:xi='http://www.w3.org/2001/XInclude' "
                         "href='/etc/passwd' parse='text'/>")
    assert parse_pool_xml(doc).name == "p"


def test_wrong_root_element() -> None:
    refused(lambda: parse_pool_xml(vol_doc()), "unexpected root element <volume>, expecting <pool>")
    refused(lambda: parse_volume_xml(pool_doc(), DIR_POOL), "expecting <volume>")
    refused(lambda: parse_secret_xml(pool_doc()), "expecting <secret>")
    refused(lambda: parse_pool_xml("<x:pool xmlns:x='urn:x' type='dir'/>"), "expecting <pool>")


def test_pool_types() -> None:
    refused(lambda: parse_pool_xml(pool_doc(ptype="xyz")), "unknown storage pool type 'xyz'")
    refused(lambda: parse_pool_xml(pool_doc(ptype="sheepdog")),
            "unknown storage pool type 'sheepdog'")
    refused(lambda: parse_pool_xml("<pool><name>p</name></pool>"), "Missing required attribute")


def test_missing_required_elements() -> None:
    refused(lambda: parse_pool_xml("<pool type='dir'><target><path>/x</path></target></pool>"),
            "missing pool source name element")
    refused(lambda: parse_pool_xml("<pool type='dir'><name>p</name></pool>"),
            "missing storage pool target path")
    refused(lambda: parse_pool_xml("<pool type='dir'><name></name></pool>"),
            "missing pool source name element")
    refused(lambda: parse_volume_xml("<volume><capacity>1</capacity></volume>", DIR_POOL),
            "missing volume name element")
    refused(lambda: parse_volume_xml(vol_doc(capacity=""), DIR_POOL), "missing capacity element")
    refused(lambda: parse_pool_xml("<pool type='netfs'><name>p</name><source/>"
                                   "<target><path>/m</path></target></pool>"),
            "missing storage pool source host name")
    refused(lambda: parse_pool_xml("<pool type='fs'><name>p</name>"
                                   "<target><path>/m</path></target></pool>"),
            "missing storage pool source device name")
    refused(lambda: parse_pool_xml("<pool type='rbd'><name>p</name><source>"
                                   "<host name='h'/></source></pool>"),
            "element 'name' is mandatory for RBD pool")
    refused(lambda: parse_pool_xml("<pool type='scsi'><name>p</name><source/>"
                                   "<target><path>/m</path></target></pool>"),
            "missing storage pool source adapter")


@pytest.mark.parametrize("uuid", ["not-a-uuid", "1234", "70a7eb15-6c34-ee9c-bf57-69e8e5ff3fb",
                                  "70a7eb15-6c34-ee9c-bf57-69e8e5ff3fb2x",
                                  "g0a7eb15-6c34-ee9c-bf57-69e8e5ff3fb2"])
def test_invalid_uuids(uuid: str) -> None:
    refused(lambda: parse_pool_xml(pool_doc(extra=f"<uuid>{uuid}</uuid>")),
            "malformed uuid element")
    refused(lambda: parse_secret_xml(f"<secret><uuid>{uuid}</uuid></secret>"),
            "malformed uuid element")


def test_liberal_uuid_forms_are_canonicalised() -> None:
    pool = parse_pool_xml(pool_doc(extra="<uuid> 70A7EB156C34EE9CBF5769E8E5FF3FB2 </uuid>"))
    assert pool.uuid == "70a7eb15-6c34-ee9c-bf57-69e8e5ff3fb2"


BAD_NAMES = [
    ("a/b", "cannot contain '/'"),
    ("/", "cannot contain '/'"),
    ("..", "not allowed"),
    (".", "not allowed"),
    ("a&#9;b", "control"),
    ("a&#10;b", "control"),
    ("a&#13;b", "control"),
    ("a&#x85;b", "control"),
    ("a&#x7f;b", "control"),
    ("a&#x202e;b", "control"),
    ("-rf", "cannot start with '-'"),
    ("x" * 256, "longer than 255 bytes"),
    ("\u00e9" * 128, "longer than 255 bytes"),
]


@pytest.mark.parametrize("name,why", BAD_NAMES, ids=[n[:12] for n, _ in BAD_NAMES])
def test_bad_pool_and_volume_names(name: str, why: str) -> None:
    refused(lambda: parse_pool_xml(pool_doc(name)), why)
    refused(lambda: parse_volume_xml(vol_doc(name), DIR_POOL), why)


def test_control_characters_never_reach_the_message() -> None:
    message = refused(lambda: parse_pool_xml(pool_doc("a&#10;b&#27;c")))
    assert "\x1b" not in message


def test_longest_allowed_name() -> None:
    assert parse_pool_xml(pool_doc("x" * 255)).name == "x" * 255
    assert parse_volume_xml(vol_doc("\u00e9" * 127), DIR_POOL).name == "\u00e9" * 127


def test_logical_source_name_cannot_escape_dev() -> None:
    for name in ("../etc", "vg/lv", "-vg", ".."):
        refused(lambda n=name: parse_pool_xml(  # type: ignore[misc]
            f"<pool type='logical'><name>p</name><source><name>{n}</name></source></pool>"))
    for name in ("../tank", "tank//x", "tank/..", "-tank"):
        refused(lambda n=name: parse_pool_xml(  # type: ignore[misc]
            f"<pool type='zfs'><name>p</name><source><name>{n}</name></source></pool>"))
    assert parse_pool_xml("<pool type='zfs'><name>p</name><source><name>tank/vms</name>"
                          "</source></pool>").target.path == "/dev/zvol/tank/vms"


@pytest.mark.parametrize("capacity,why", [
    ("<capacity>-1</capacity>", "malformed capacity element"),
    ("<capacity unit='G'>-5</capacity>", "malformed capacity element"),
    ("<capacity>1.5</capacity>", "malformed capacity element"),
    ("<capacity>abc</capacity>", "malformed capacity element"),
    ("<capacity>99999999999999999999999</capacity>", "malformed capacity element"),
    ("<capacity unit='EiB'>8</capacity>", "value too large"),
    ("<capacity>9223372036854775808</capacity>", "value too large"),
    ("<capacity unit='parsec'>1</capacity>", "unknown suffix 'parsec'"),
    ("<capacity unit='Zi'>1</capacity>", "unknown suffix"),
    ("<capacity>1</capacity><allocation>-1</allocation>", "malformed allocation element"),
    ("<capacity>1</capacity><allocation unit='XB'>1</allocation>", "unknown suffix"),
])
def test_bad_sizes(capacity: str, why: str) -> None:
    refused(lambda: parse_volume_xml(vol_doc(capacity=capacity), DIR_POOL), why)


def test_largest_capacity() -> None:
    vol = parse_volume_xml(vol_doc(capacity="<capacity>9223372036854775807</capacity>"),
                           DIR_POOL)
    assert vol.capacity == 2**63 - 1


@pytest.mark.parametrize("target,why", [
    ("<format type='bogus'/>", "unknown volume format type bogus"),
    ("<format type='none'/>", "unknown volume format type none"),
    ("<permissions><mode>1777</mode></permissions>", "malformed octal mode"),
    ("<permissions><mode>9</mode></permissions>", "malformed octal mode"),
    ("<permissions><owner>x</owner></permissions>", "malformed owner element"),
    ("<permissions><group>-2</group></permissions>", "malformed group element"),
    ("<permissions><owner>4294967296</owner></permissions>", "malformed owner element"),
    ("<compat>1.1.1</compat>", "forbidden characters in 'compat' attribute"),
    ("<features><bogus/></features>", "unsupported feature bogus"),
    ("<clusterSize>-1</clusterSize>", "malformed clusterSize element"),
    ("<encryption format='rot13'/>", "unknown volume encryption format type rot13"),
    ("<encryption format='luks'><secret type='passphrase'/></encryption>",
     "missing secret uuid or usage attribute"),
    ("<encryption format='luks'><secret type='passphrase' uuid='x'/></encryption>",
     "invalid secret uuid 'x'"),
    ("<encryption format='luks'><ivgen name='plain64'/></encryption>",
     "ivgen element found, but cipher is missing"),
])
def test_bad_volume_targets(target: str, why: str) -> None:
    doc = f"<volume><name>v</name><capacity>1</capacity><target>{target}</target></volume>"
    refused(lambda: parse_volume_xml(doc, DIR_POOL), why)


@pytest.mark.parametrize("extra,ptype,why", [
    ("<source><format type='ntfs'/><device path='/dev/x'/></source>", "fs",
     "unknown pool format type ntfs"),
    ("<features><cow state='yes'/></features><source><device path='/dev/x'/></source>",
     "disk", "cow feature may only be used"),
    ("<features><cow state='maybe'/></features>", "dir", "Invalid value for attribute 'state'"),
    ("<source><host name='h'/><dir path='/x'/><protocol ver='4,exec'/></source>", "netfs",
     "must not contain ','"),
    ("<source><host name='h'/><dir path='/x'/><format type='cifs'/><protocol ver='3'/>"
     "</source>", "netfs", "protocol ver unsupported for pool type 'cifs'"),
    ("<source><host name='h' port='x'/><dir path='/x'/></source>", "netfs",
     "Invalid value for attribute 'port'"),
    ("<source><adapter type='fc_host' wwnn='1' wwpn='2'/></source>", "scsi", "Malformed wwn"),
    ("<source><adapter name='host0' wwnn='20000000c9831b4b'/></source>", "scsi",
     "requires use of the adapter 'type'"),
])
def test_bad_pool_sources(extra: str, ptype: str, why: str) -> None:
    refused(lambda: parse_pool_xml(pool_doc(extra=extra, ptype=ptype)), why)


def test_secret_value_errors() -> None:
    refused(lambda: parse_secret_xml("<secret ephemeral='maybe'/>"), "invalid value of 'ephemeral'")
    refused(lambda: parse_secret_xml("<secret><usage type='ceph'/></secret>"),
            "Ceph usage specified, but name is missing")
    refused(lambda: parse_secret_xml("<secret><usage type='magic'/></secret>"),
            "unknown secret usage type magic")


def test_validate_refuses_hostile_documents_too() -> None:
    refused(lambda: validate(BILLION_LAUGHS, "pool"), "not allowed")
    with pytest.raises(ValueError):
        validate(pool_doc(), "domain")


# -- properties ------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=300))
def test_any_name_round_trips_or_is_refused(name: str) -> None:
    """Whatever a name holds, printing and re-reading it keeps it or refuses it cleanly."""
    try:
        doc = format_pool_xml(PoolDef(type="dir", name=name,
                                      target=PoolTarget(path="/srv/p")))
    except XMLError as err:
        assert "\n" not in str(err)
        refused(lambda: parse_volume_xml(vol_doc(escape(name)), DIR_POOL))
        return
    assert parse_pool_xml(doc).name == name
    vol_doc_text = format_volume_xml(VolDef(name=name, capacity=1), DIR_POOL)
    assert parse_volume_xml(vol_doc_text, DIR_POOL).name == name


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_never_escape_as_other_errors(data: bytes) -> None:
    try:
        parse_pool_xml(b"<pool type='dir'><name>" + data + b"</name>"
                       b"<target><path>/p</path></target></pool>")
    except XMLError as err:
        assert "\n" not in str(err)
