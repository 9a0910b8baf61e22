"""libvirt's secret XML: parse, print, round trip."""

from __future__ import annotations

import pytest

from virtstore.errors import XMLError
from virtstore.xml import SecretDef, format_secret_xml, parse_secret_xml

UUID = "2ec115d7-3a88-3ceb-bc12-0ac909a6fd87"

CEPH = f"""<secret ephemeral='no' private='yes'>
  <uuid>{UUID}</uuid>
  <description>CEPH passphrase example</description>
  <usage type='ceph'>
    <name>ceph_example</name>
  </usage>
</secret>
"""


def test_ceph_secret_round_trip_is_exact() -> None:
    secret = parse_secret_xml(CEPH)
    assert secret == SecretDef(uuid=UUID, ephemeral=False, private=True,
                               description="CEPH passphrase example",
                               usage_type="ceph", usage_id="ceph_example")
    assert format_secret_xml(secret) == CEPH


@pytest.mark.parametrize("usage,element,value", [
    ("volume", "volume", "/var/lib/libvirt/images/luks.img"),
    ("ceph", "name", "client.admin secret"),
    ("iscsi", "target", "libvirtiscsi"),
    ("tls", "name", "TLS_example"),
    ("vtpm", "name", "VTPM_example"),
])
def test_every_usage_type(usage: str, element: str, value: str) -> None:
    doc = (f"<secret ephemeral='yes' private='no'><uuid>{UUID}</uuid>"
           f"<usage type='{usage}'><{element}>{value}</{element}></usage></secret>")
    secret = parse_secret_xml(doc)
    assert (secret.usage_type, secret.usage_id, secret.ephemeral) == (usage, value, True)
    out = format_secret_xml(secret)
    assert f"  <usage type='{usage}'>\n    <{element}>{value}</{element}>\n  </usage>\n" in out
    assert parse_secret_xml(out) == secret


def test_defaults_and_missing_uuid() -> None:
    secret = parse_secret_xml("<secret/>")
    assert secret == SecretDef()
    assert format_secret_xml(secret) == "<secret ephemeral='no' private='no'>\n</secret>\n"


def test_usage_none_is_not_printed() -> None:
    secret = parse_secret_xml(f"<secret><uuid>{UUID}</uuid><usage type='none'/></secret>")
    assert secret.usage_type == "none" and secret.usage_id is None
    assert "<usage" not in format_secret_xml(secret)


def test_text_is_escaped() -> None:
    secret = SecretDef(uuid=UUID, description="a <b> & 'c'", usage_type="iscsi",
                       usage_id="t&t")
    out = format_secret_xml(secret)
    assert "<description>a &lt;b&gt; &amp; &apos;c&apos;</description>" in out
    assert parse_secret_xml(out) == secret


def test_uuid_is_canonicalised() -> None:
    secret = parse_secret_xml("<secret><uuid>2EC115D73A883CEBBC120AC909A6FD87</uuid></secret>")
    assert secret.uuid == UUID


@pytest.mark.parametrize("doc,why", [
    ("<secret private='1'/>", "invalid value of 'private'"),
    ("<secret><usage/></secret>", "unknown secret usage type"),
    ("<secret><usage type='volume'/></secret>", "volume path is missing"),
    ("<secret><usage type='iscsi'><name>x</name></usage></secret>", "target is missing"),
    ("<secret><uuid>xyz</uuid></secret>", "malformed uuid element"),
    ("<pool/>", "unexpected root element <pool>, expecting <secret>"),
])
def test_refused(doc: str, why: str) -> None:
    with pytest.raises(XMLError) as info:
        parse_secret_xml(doc)
    assert why in str(info.value)
    assert "\n" not in str(info.value)
